"""The collector's setting while a process sends or receives at volume (`heap.py`), each in a
fresh interpreter: it is process-wide, and this test process has been set already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cdp_activation.heap import YOUNG_THRESHOLD

TESTS = Path(__file__).resolve().parent


def _run(code: str, tmp_path: Path) -> dict:
    """What `code` printed last, as JSON, run in a fresh interpreter beside these tests."""
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r})\n{code}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    found: dict = json.loads(done.stdout.splitlines()[-1])
    return found


_STATE = "[gc.get_threshold()[0], gc.get_freeze_count() > 10_000]"


def test_a_delivery_sends_with_start_up_frozen_and_rare_young_passes_then_gives_them_back(
    tmp_path: Path,
) -> None:
    code = f"""
import gc, json
from test_delivery import SCOPE, FAST, connectors, decisions, numbers
from conftest import settings_for_sandbox
from cdp_activation.delivery.engine import deliver
from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import SandboxServer

seen = []
with SandboxServer() as sandbox:
    found = connectors(settings_for_sandbox(sandbox))
    for connector in found.values():
        send = connector.send_batch
        async def watched(client, messages, send=send):
            seen.append({_STATE})
            return await send(client, messages)
        connector.send_batch = watched
    ledger = Ledger("sqlite:///{tmp_path}/ledger.sqlite")
    ledger.plan("winback", "p", decisions(numbers(6)))
    before = {_STATE}
    report = deliver(ledger, SCOPE, found, FAST)
print(json.dumps({{"before": before, "seen": seen, "after": {_STATE}, "sent": report.sent}}))
"""
    found = _run(code, tmp_path)

    assert found["sent"] == 6
    assert found["before"] == [700, False]
    assert found["seen"] == [[YOUNG_THRESHOLD, True]] * 6
    assert found["after"] == found["before"]


def test_the_status_receiver_sets_its_process_for_good(tmp_path: Path) -> None:
    code = f"""
import gc, json
from cdp_activation.feedback.receiver import create_app
from cdp_activation.ledger import Ledger
from cdp_activation.plugins import WebhookSecrets
create_app(Ledger("sqlite:///{tmp_path}/ledger.sqlite"), WebhookSecrets({{}}))
print(json.dumps({_STATE}))
"""
    assert _run(code, tmp_path) == [YOUNG_THRESHOLD, True]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("gc.disable()", [700, False]), ("gc.set_threshold(100_000)", [100_000, True])],
    ids=["collector disabled", "a higher threshold"],
)
def test_a_collector_set_otherwise_is_left_as_it_is(
    setting: str, expected: list, tmp_path: Path
) -> None:
    code = f"""
import gc, json
from cdp_activation import heap
{setting}
state = lambda: [gc.get_threshold()[0], gc.get_freeze_count() > 0]
with heap.delivering():
    during = state()
heap.tune_for_serving()
print(json.dumps(during + state()))
"""
    assert _run(code, tmp_path) == expected * 2


def test_deliveries_overlapping_in_one_process_keep_it_set_until_the_last_ends(
    tmp_path: Path,
) -> None:
    """Two deliveries in threads (Dagster's in-process executor, a threaded worker): the first
    to end leaves the other's setting alone; the last, failing here, gives back the first's
    'before'."""
    code = """
import gc, json, threading
from cdp_activation import heap
state = lambda: [gc.get_threshold()[0], gc.get_freeze_count() > 0]
seen = {"before": state()}
a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

def a():
    with heap.delivering():
        a_in.set()
        b_in.wait()
    a_out.set()

def b():
    a_in.wait()
    try:
        with heap.delivering():
            b_in.set()
            a_out.wait()
            seen["b after a ended"] = state()
            raise RuntimeError("the provider went away")
    except RuntimeError:
        seen["after both"] = state()

threads = [threading.Thread(target=a), threading.Thread(target=b)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(seen))
"""
    seen = _run(code, tmp_path)

    assert seen["before"] == [700, False]
    assert seen["b after a ended"] == [YOUNG_THRESHOLD, True]
    assert seen["after both"] == [700, False]


def test_a_delivery_in_the_receiver_s_process_leaves_its_setting_in_place(tmp_path: Path) -> None:
    code = """
import gc, json
from cdp_activation import heap
heap.tune_for_serving()
with heap.delivering():
    pass
print(json.dumps([gc.get_threshold()[0], gc.get_freeze_count() > 0]))
"""
    assert _run(code, tmp_path) == [YOUNG_THRESHOLD, True]


_COMMAND_STATE = "[gc.isenabled(), gc.get_threshold()[0], gc.get_freeze_count() > 100_000]"
_STATE_10K = "[gc.isenabled(), gc.get_threshold()[0], gc.get_freeze_count() > 10_000]"


def test_a_command_starts_up_without_the_collector_then_sets_its_process_for_good(
    tmp_path: Path,
) -> None:
    """`cdp-activation run` (its entry point, in a fresh interpreter): no collector pass
    while it imports and loads the definitions; then start-up is frozen (Dagster, polars,
    SQLAlchemy: far more than 100,000 objects) for good, the thresholds as they were; a
    delivery raises the young one while it runs and gives back the threshold, not the
    freeze."""
    (tmp_path / "home").mkdir()
    code = f"""
import gc, json, os
os.environ.update(DAGSTER_HOME={str(tmp_path / "home")!r}, CDP_SANDBOX="0",
                  CDP_LEDGER_URL="sqlite:///{tmp_path}/ledger.sqlite")
import click
from cdp_activation import heap
from cdp_activation.cli import main as cli
seen = {{"before": {_COMMAND_STATE}}}
import cdp_activation.cli.runner as runner
load = runner.load_definitions
def watched(*args, **kwargs):
    seen["loading"] = {_COMMAND_STATE}
    loaded = load(*args, **kwargs)
    seen["loaded"] = {_COMMAND_STATE}
    return loaded
runner.load_definitions = watched
try:
    cli.entry(["run", "no_such_activation", "--no-wait"], standalone_mode=False)
except click.ClickException as err:
    seen["error"] = err.message
seen["after"] = {_COMMAND_STATE}
with heap.delivering():
    seen["delivering"] = {_COMMAND_STATE}
seen["after delivering"] = {_COMMAND_STATE}
print(json.dumps(seen))
"""
    seen = _run(code, tmp_path)

    assert "no activation named 'no_such_activation'" in seen["error"]
    assert seen["before"] == [True, 700, False]
    assert seen["loading"] == [False, 700, False]
    assert seen["loaded"] == [True, 700, True]  # before the run itself
    assert seen["after"] == seen["loaded"]
    assert seen["delivering"] == [True, YOUNG_THRESHOLD, True]
    assert seen["after delivering"] == seen["after"]  # start-up still frozen


@pytest.mark.parametrize(
    ("ends_it", "expected"),
    [
        ("with heap.delivering(): pass", [True, 700, True]),
        ("heap.tune_for_serving()", [True, YOUNG_THRESHOLD, True]),
        ("heap.started(); heap.started()", [True, 700, True]),
    ],
    ids=["a delivery", "the receiver", "started twice"],
)
def test_a_start_up_ends_at_the_first_delivery_or_the_receiver_if_not_before(
    ends_it: str, expected: list, tmp_path: Path
) -> None:
    code = f"""
import gc, json
from cdp_activation import heap
heap.start_up()
import dagster, polars, sqlalchemy
during = {_COMMAND_STATE}
{ends_it}
print(json.dumps([during, {_COMMAND_STATE}]))
"""
    assert _run(code, tmp_path) == [[False, 700, False], expected]


def test_started_without_a_start_up_and_a_start_up_with_the_collector_off_change_nothing(
    tmp_path: Path,
) -> None:
    code = """
import gc, json
from cdp_activation import heap
state = lambda: [gc.isenabled(), gc.get_threshold()[0], gc.get_freeze_count() > 0]
heap.started()  # a library caller's load_definitions()
seen = [state()]
gc.disable()
heap.start_up()
heap.started()
seen.append(state())
print(json.dumps(seen))
"""
    assert _run(code, tmp_path) == [[True, 700, False], [False, 700, False]]


@pytest.mark.parametrize("command", [["sandbox"], ["webhooks", "serve"]])
def test_the_serving_commands_start_up_without_the_collector_and_serve_set_for_good(
    command: list[str], tmp_path: Path
) -> None:
    """`cdp-activation sandbox` and `webhooks serve` (their entry point, in a fresh
    interpreter, uvicorn's `run` stood in for): the collector off while they import, then
    start-up frozen and young passes rare by the time they serve."""
    code = f"""
import gc, json, os
os.environ["CDP_LEDGER_URL"] = "sqlite:///{tmp_path}/ledger.sqlite"
import uvicorn
seen = {{}}
uvicorn.run = lambda app, **options: seen.update(serving={_STATE_10K})
from cdp_activation import heap
from cdp_activation.cli import main as cli
load = heap.start_up
def watched():
    load()
    seen["starting"] = {_STATE_10K}
heap.start_up = watched
cli.entry({command!r}, standalone_mode=False)
print(json.dumps(seen))
"""
    seen = _run(code, tmp_path)

    assert seen["starting"] == [False, 700, False]
    assert seen["serving"] == [True, YOUNG_THRESHOLD, True]


def test_a_command_that_waits_behind_another_run_waits_with_the_collector_on(
    tmp_path: Path,
) -> None:
    """`wait_for_turn` (the instance's answer stood in for: one run in progress, then none):
    a wait may last hours, polling the instance, so start-up ends before the first pause."""
    code = f"""
import gc, json
from datetime import UTC, datetime
from cdp_activation import heap
from cdp_activation.cli import runner
heap.start_up()
busy = [runner.ActiveRun("r1", "winback", "winback_job", "STARTED", None, datetime.now(UTC), "x")]
answers = iter([busy, busy, []])
seen = []
def active_runs(instance, name, on_stale=None):
    seen.append({_STATE_10K})
    return next(answers)
runner.active_runs = active_runs
runner.wait_for_turn("winback", runner.RunQueue(poll_seconds=0.01), instance=object())
print(json.dumps(seen))
"""
    assert _run(code, tmp_path) == [[False, 700, False], [True, 700, True], [True, 700, True]]


def test_a_command_that_fails_before_its_definitions_load_leaves_the_collector_on(
    tmp_path: Path,
) -> None:
    """A bad `--param` fails `run` after its start-up began: the collector is on again."""
    code = f"""
import gc, json, click
from cdp_activation.cli import main as cli
try:
    cli.entry(["run", "winback_whatsapp", "--param", "no-equals-sign"], standalone_mode=False)
except click.BadParameter as err:
    failed = err.format_message()
print(json.dumps([failed, {_STATE_10K}]))
"""
    failed, state = _run(code, tmp_path)

    assert "is not NAME=VALUE" in failed
    assert state == [True, 700, True]


def test_a_program_calling_the_command_itself_keeps_its_collector_as_it_is(
    tmp_path: Path,
) -> None:
    """The click command called from another program (Airflow, a notebook): its definitions
    load, it fails or not, and that program's collector is as it was, nothing frozen."""
    (tmp_path / "home").mkdir()
    code = f"""
import gc, json, os, click
os.environ.update(DAGSTER_HOME={str(tmp_path / "home")!r},
                  CDP_LEDGER_URL="sqlite:///{tmp_path}/ledger.sqlite")
from cdp_activation.cli import main as cli
import cdp_activation.cli.runner as runner
seen = []
load = runner.load_definitions
def watched(*args, **kwargs):
    seen.append({_STATE_10K})
    return load(*args, **kwargs)
runner.load_definitions = watched
for args in (["run", "no_such_activation", "--no-wait"], ["run", "x", "--param", "bad"]):
    try:
        cli.main(args, standalone_mode=False)
    except click.ClickException:
        pass
seen.append({_STATE_10K})
print(json.dumps(seen))
"""
    assert _run(code, tmp_path) == [[True, 700, False]] * 2


def test_a_second_start_up_in_a_process_set_for_good_changes_nothing(tmp_path: Path) -> None:
    code = """
import gc, json
from cdp_activation import heap
heap.start_up()
heap.started()
frozen = gc.get_freeze_count()
heap.start_up()  # a second command in the same process
print(json.dumps([gc.isenabled(), gc.get_freeze_count() == frozen]))
"""
    assert _run(code, tmp_path) == [True, True]


def test_a_run_that_starts_the_local_sandbox_waits_for_it_with_the_collector_on(
    tmp_path: Path,
) -> None:
    """In sandbox mode a run starts the sandbox its connectors point at, and waits up to 20 s
    for it to answer (the wait stood in for here): start-up ends before that wait."""
    (tmp_path / "home").mkdir()
    code = f"""
import gc, json, os
for name in [name for name in os.environ if name.startswith("CDP_")]:
    del os.environ[name]
os.environ.update(DAGSTER_HOME={str(tmp_path / "home")!r}, CDP_SANDBOX="1",
                  CDP_LEDGER_URL="sqlite:///{tmp_path}/ledger.sqlite")
from cdp_activation.cli import main as cli
import cdp_activation.cli.runner as runner
seen = {{}}
def sandbox_url(stack, port, step=""):
    seen["waiting for the sandbox"] = {_STATE_10K}
    return "http://127.0.0.1:9"
cli._sandbox_url = sandbox_url
class Stop(Exception):
    pass
def load_definitions(*args, **kwargs):
    raise Stop
runner.load_definitions = load_definitions
try:
    cli.entry(["run", "winback_whatsapp", "--no-wait"], standalone_mode=False)
except Stop:
    pass
print(json.dumps(seen))
"""
    assert _run(code, tmp_path) == {"waiting for the sandbox": [True, 700, True]}
