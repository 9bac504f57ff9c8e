"""The collector setting of processes that send or receive at volume (`heap.py`), each checked
in a fresh interpreter: it is process-wide, and this test process has been set already."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cdp_activation.heap import YOUNG_THRESHOLD

_REPORT = "import gc, json; print(json.dumps([gc.get_threshold()[0], gc.get_freeze_count()]))"


def _after(setup: str, tmp_path: Path) -> tuple[int, int]:
    """The young threshold and the frozen objects' count once `setup` has run."""
    code = f"{setup}\n{_REPORT}"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    young, frozen = json.loads(done.stdout.splitlines()[-1])
    return young, frozen


def test_a_delivery_freezes_what_start_up_left_and_collects_young_garbage_less_often(
    tmp_path: Path,
) -> None:
    setup = (
        "from cdp_activation.delivery.engine import DeliveryScope, deliver\n"
        "from cdp_activation.ledger import Ledger\n"
        f"deliver(Ledger('sqlite:///{tmp_path}/ledger.sqlite'), DeliveryScope('a', 'p'), {{}})"
    )
    young, frozen = _after(setup, tmp_path)

    assert young == YOUNG_THRESHOLD
    assert frozen > 10_000  # the modules and classes loaded to get there


def test_the_status_receiver_sets_its_process_alike(tmp_path: Path) -> None:
    setup = (
        "from cdp_activation.feedback.receiver import create_app\n"
        "from cdp_activation.ledger import Ledger\n"
        "from cdp_activation.plugins import WebhookSecrets\n"
        f"create_app(Ledger('sqlite:///{tmp_path}/ledger.sqlite'), WebhookSecrets({{}}))"
    )
    assert _after(setup, tmp_path)[0] == YOUNG_THRESHOLD


@pytest.mark.parametrize(
    "before",
    ["import gc; gc.disable()", f"import gc; gc.set_threshold({YOUNG_THRESHOLD * 2})"],
    ids=["collector disabled", "a higher threshold"],
)
def test_a_process_whose_collector_was_set_otherwise_is_left_as_it_is(
    before: str, tmp_path: Path
) -> None:
    young_before, _ = _after(before, tmp_path)

    young, frozen = _after(
        f"{before}\nfrom cdp_activation import heap\nheap.tune_for_volume()", tmp_path
    )

    assert (young, frozen) == (young_before, 0)


def test_it_is_done_once_a_process(tmp_path: Path) -> None:
    setup = (
        "import gc\nfrom cdp_activation import heap\nheap.tune_for_volume()\n"
        "first = gc.get_freeze_count()\nkept = [[i] for i in range(1000)]\n"
        "gc.set_threshold(700)\nheap.tune_for_volume()\nassert gc.get_freeze_count() == first"
    )
    assert _after(setup, tmp_path)[0] == 700
