"""The code location: everything under `defs/` (one folder per activation, plus resources)."""

from pathlib import Path

import dagster as dg

from cdp_activation import logs
from cdp_activation.settings import export_dotenv

# CDP_LOG_FORMAT=json (here or in .env): every process that loads the code location (step
# processes, the daemon, the webserver) writes its lines as JSON.
export_dotenv()
logs.configure()


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
