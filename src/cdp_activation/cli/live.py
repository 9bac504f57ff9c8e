"""`cdp-activation demo --live`: abandoned carts arriving in the demo warehouse, and with
`--activate` the abandoned_cart activation reacting to them in this process.

Without `--activate` it only appends events: the sensor `abandoned_cart_events` of `make dev`
(switched on in the Dagster UI, Automation) does the rest. With it, this process looks for new
events every `events.interval_seconds`, as the sensor does (`activation.events.tick`), and runs
each window they call for through Dagster (`run_activation`), against the local sandbox.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import yaml

from cdp_activation.activation.events import tick
from cdp_activation.activation.run import Activation
from cdp_activation.audience.warehouse import Warehouse
from cdp_activation.spec import ActivationSpec

ACTIVATION = "abandoned_cart"


def load_activation(name: str = ACTIVATION) -> Activation:
    from cdp_activation import definitions

    path = Path(definitions.__file__).parent / "defs" / "activations" / name / "defs.yaml"
    spec = ActivationSpec.model_validate(yaml.safe_load(path.read_text())["attributes"])
    return Activation.from_spec(name, spec)


def live(
    warehouse_path: Path,
    per_minute: float,
    minutes: float | None,
    say: Callable[[str], None],
    run_window: Callable[[str], str] | None = None,
) -> int:
    """Append abandoned carts for `minutes` (None: until interrupted), from a loader process;
    with `run_window`, look for new events every `events.interval_seconds` and run each window
    they call for, saying what each run did. Returns the number of carts abandoned."""
    command = [sys.executable, "-m", "cdp_activation.demo.live", str(warehouse_path)]
    command.append(str(per_minute))
    if minutes is not None:
        command.append(str(minutes * 60))
    loader = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    abandoned = [0]

    def read() -> None:
        assert loader.stdout is not None
        for line in loader.stdout:
            batch = json.loads(line)
            abandoned[0] += batch["abandoned"]
            say(
                f"{_now()} +{batch['abandoned']} abandoned cart(s), "
                f"{batch['checked_out']} checked out at once"
            )

    reader = threading.Thread(target=read, name="cart-events", daemon=True)
    reader.start()
    try:
        if run_window is None:
            loader.wait()
        else:
            activation = load_activation()
            spec, query = activation.spec.events, activation.events_query
            assert spec is not None and query is not None
            warehouse = Warehouse(f"duckdb:///{warehouse_path}")
            cursor: str | None = None
            while loader.poll() is None:
                looked = tick(query, warehouse, spec, cursor)
                cursor = looked.cursor
                if looked.skip:
                    say(f"{_now()} sensor: {looked.skip}")
                for window in looked.windows:
                    say(f"{_now()} sensor: window {window} → {run_window(window)}")
                deadline = time.monotonic() + spec.interval_seconds
                while loader.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.5)
    finally:
        if loader.poll() is None:
            loader.terminate()
        loader.wait(timeout=30)
        reader.join(timeout=5)
    return abandoned[0]


def _now() -> str:
    return datetime.now(UTC).strftime("%H:%M:%S")
