"""The marketer's path in a real browser: Debian's Chromium, driven by Playwright, against
`dagster dev` on 127.0.0.1 with the project's own definitions, a DuckDB demo warehouse and the
sandbox provider.

It opens the win-back activation's asset graph, launches a dry run from the Launchpad with a
changed threshold, waits for the run to succeed, and reads the preview on the decisions
asset's page, checking its audience size against the audience SQL run independently. Nothing
may be sent. Screenshots go to docs/screenshots/tmp/ (docs/screenshots/ with
CDP_UPDATE_SCREENSHOTS=1, which is how the README's were made).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as dtime
from pathlib import Path

import httpx
import pytest
import yaml

from cdp_activation.activation.run import Activation, compute_audience
from cdp_activation.audience.warehouse import Warehouse
from cdp_activation.demo.data import generate_demo_warehouse
from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import SandboxServer
from cdp_activation.settings import project_root
from cdp_activation.spec import ActivationSpec

pytestmark = pytest.mark.e2e

ROOT = project_root()
CHROMIUM = os.environ.get("CDP_CHROMIUM") or shutil.which("chromium")
playwright = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs Playwright's Python package"
)
if CHROMIUM is None:
    pytest.skip(
        "no Chromium here (apt-get install chromium, or set CDP_CHROMIUM); .ci/run installs it",
        allow_module_level=True,
    )

TODAY = datetime.now(UTC).date().isoformat()
SHOTS = ROOT / "docs" / "screenshots"


def _shot_dir() -> Path:
    target = SHOTS if os.environ.get("CDP_UPDATE_SCREENSHOTS") == "1" else SHOTS / "tmp"
    target.mkdir(parents=True, exist_ok=True)
    return target


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DagsterDev:
    url: str
    env: dict[str, str]
    sandbox: SandboxServer


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterDev]:
    """`dagster dev` in its own process group, on the demo warehouse and a sandbox."""
    tmp = tmp_path_factory.mktemp("ui")
    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    warehouse = tmp / "warehouse.duckdb"
    as_of = datetime.combine(datetime.now(UTC).date(), dtime.min, tzinfo=UTC)
    generate_demo_warehouse(warehouse, customers=4_000, seed=11, as_of=as_of)
    with SandboxServer() as sandbox:
        port = _free_port()
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home),
            "CDP_WAREHOUSE_URL": f"duckdb:///{warehouse}",
            "CDP_LEDGER_URL": f"sqlite:///{tmp / 'ledger.sqlite'}",
            "CDP_META_BASE_URL": f"{sandbox.url}/meta",
            "CDP_TWILIO_BASE_URL": f"{sandbox.url}/twilio",
            "CDP_TWILIO_CONTENT_BASE_URL": f"{sandbox.url}/twilio",
        }
        for secret in ("CDP_META_ACCESS_TOKEN", "CDP_TWILIO_AUTH_TOKEN"):
            env.pop(secret, None)
        log = tmp / "dagster_dev.log"
        with log.open("wb") as out:
            command = [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml"]
            process = subprocess.Popen(
                [*command, "-h", "127.0.0.1", "-p", str(port)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its webserver, daemon and code server stop together
            )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_up(url, process, log)
            yield DagsterDev(url, env, sandbox)
        finally:
            _stop_group(process)


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dagster dev exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"dagster dev did not answer on {url}: {log.read_text()[-2000:]}")


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _dismiss_welcome(page: playwright.Page) -> None:
    """A fresh instance greets with a newsletter dialog; a new user would skip it."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(timeout=3000)
        skip.click()
    except playwright.TimeoutError:
        pass


def test_a_marketer_previews_the_winback_from_the_launchpad(dagster_dev: DagsterDev) -> None:
    shots = _shot_dir()
    expect = playwright.expect
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30_000)

        # The campaign map: the win-back's assets, one group.
        page.goto(f"{dagster_dev.url}/locations/cdp_activation/asset-groups/winback_whatsapp")
        _dismiss_welcome(page)
        for asset in ("audience", "decisions", "deliveries", "fallback"):
            expect(page.get_by_text(asset, exact=True).first).to_be_visible()
        page.screenshot(path=str(shots / "asset-graph.png"))

        # The Launchpad of its job: today's partition, a stricter threshold, a dry run.
        page.goto(
            f"{dagster_dev.url}/locations/cdp_activation/jobs/winback_whatsapp_job/playground"
        )
        _dismiss_welcome(page)
        partition = page.get_by_placeholder("Partition")
        partition.click()
        partition.fill(TODAY)
        page.keyboard.press("Enter")
        expect(page.get_by_text(f"partition: {TODAY}")).to_be_visible()
        editor = "document.querySelector('.CodeMirror').CodeMirror"
        config = page.evaluate(f"() => {editor}.getValue()")
        assert "lapse_threshold: 0.7" in config
        assert re.search(r"dry_run: true", config), "the Launchpad's default must be a dry run"
        page.evaluate(
            f"(v) => {editor}.setValue(v)",
            config.replace("lapse_threshold: 0.7", "lapse_threshold: 0.8"),
        )
        expect(page.get_by_text("No errors")).to_be_visible()
        page.screenshot(path=str(shots / "launchpad.png"))
        page.get_by_role("button", name="Launch Run").click()
        page.wait_for_url(re.compile(r".*/runs/[0-9a-f-]+"))
        expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=300_000)

        # The preview, on the decisions asset: read as a marketer reads it (a tall window, so
        # the screenshot holds the whole metadata table).
        page.set_viewport_size({"width": 1400, "height": 2000})
        page.goto(f"{dagster_dev.url}/assets/winback_whatsapp/decisions?partition={TODAY}")
        metadata = page.locator("table").filter(has_text="audience_size").first
        expect(metadata).to_be_visible()
        for key in ("eligible_by_channel", "excluded_by_reason", "reason_meanings"):
            expect(metadata.get_by_text(key, exact=True)).to_be_visible()
        expect(metadata.get_by_text("estimated_cost", exact=True)).to_be_visible()
        expect(metadata.get_by_text("sample_messages", exact=True)).to_be_visible()
        # Sample messages show masked numbers only: no run of 6+ digits on the page.
        assert not re.search(r"\+\d{6,}", metadata.inner_text())
        audience_row = metadata.locator("tr").filter(has_text="audience_size").first
        shown = int(re.sub(r"\D", "", audience_row.locator("td").last.inner_text()))
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(shots / "preview.png"))
        browser.close()

    # The number on the page is the audience at threshold 0.8, computed here independently.
    defs_yaml = ROOT / "src/cdp_activation/defs/activations/winback_whatsapp/defs.yaml"
    attributes = yaml.safe_load(defs_yaml.read_text())["attributes"]
    activation = Activation.from_spec("winback_whatsapp", ActivationSpec.model_validate(attributes))
    audience = compute_audience(
        activation,
        Warehouse(dagster_dev.env["CDP_WAREHOUSE_URL"]),
        TODAY,
        {"lapse_threshold": 0.8},
    )
    assert shown == audience.height
    # A dry run: nothing sent, nothing in the ledger.
    assert dagster_dev.sandbox.messages() == []
    ledger = Ledger(dagster_dev.env["CDP_LEDGER_URL"])
    try:
        assert ledger.rows("winback_whatsapp").is_empty()
    finally:
        ledger.dispose()
