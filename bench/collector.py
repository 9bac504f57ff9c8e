"""The garbage collector's share of the hot paths, as shipped and with its setting undone.

`python -m bench collector [--recipients N] [--events N] [--repeats R]` from the repository
root. Two paths, each in fresh processes, the two versions alternated R times:

- the delivery engine: N Meta template messages, one a request, 256 in flight, through
  `deliver()` and a fresh SQLite ledger to the sandbox answering after 100 ms in its own
  process (`bench.throughput`'s run);
- the status receiver: N signed Meta status webhooks, 100 in flight, into a SQLite ledger
  (`bench.webhooks`' run), the receiver's process measured.

*before* is the same code set back to what the project shipped until this benchmark
(`_set_mode`): a delivery froze what start-up left but kept CPython's young threshold, the
receiver did neither, and every request went through httpx's own send, whose answers hold a
reference cycle (`transport._DeliveryClient.send` back to httpx's). The engine's CPU ratio
therefore also counts the shorter send path (`_DeliveryClient`); its collector columns are
the collector's alone. The collector's time is read from `gc.callbacks` in the measured process; the
objects it freed are the cyclic garbage the path left. Figures go to
bench/results_collector.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

from bench.delivery import ROOT, Sandbox, _cpu_model
from bench.index import publish

RESULTS = ROOT / "bench" / "results_collector.md"
_BENCH = (sys.executable, "-m", "bench", "collector")
_MODES = ("before", "now")


class _Collections:
    """Time spent in, passes of, and objects freed by the collector, from `gc.callbacks`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.passes = 0
        self.freed = 0
        self._began = 0.0
        gc.callbacks.append(self._on)

    def _on(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        self.seconds += time.perf_counter() - self._began
        self.passes += 1
        self.freed += info["collected"]

    def snapshot(self) -> tuple[float, int, int]:
        return self.seconds, self.passes, self.freed


def _since(began: Any, now: Any) -> tuple[float, int, int]:
    seconds, passes, freed = (b - a for a, b in zip(began, now, strict=True))
    return seconds, int(passes), int(freed)


def _set_mode(mode: str) -> None:
    """*before*: what the project shipped until this benchmark. A delivery froze start-up and
    left the threshold at CPython's; the receiver did neither; every request went through
    httpx's own send, and its cycle stayed."""
    if mode == "now":
        return
    import httpx

    from cdp_activation import heap
    from cdp_activation.delivery import transport

    heap.YOUNG_THRESHOLD = 0  # `delivering` freezes, never raises the threshold
    heap.tune_for_serving = lambda: None
    transport._DeliveryClient.send = httpx.AsyncClient.send


def _engine_child(mode: str, url: str, count: int) -> dict[str, Any]:
    from bench.throughput import run_engine
    from cdp_activation.delivery import engine

    _set_mode(mode)
    collections = _Collections()
    during: list[tuple[float, int, int]] = []
    deliver = engine.deliver

    def measured(*args: Any, **kwargs: Any) -> Any:  # the collector's work while sending only
        began = collections.snapshot()
        try:
            return deliver(*args, **kwargs)
        finally:
            during.append(_since(began, collections.snapshot()))

    engine.deliver = measured
    result = run_engine("batch1", url, count, 256)  # its CPU and wall: the sending only
    # Both include the one full pass that freezing start-up costs a delivery.
    seconds, passes, freed = during[0]
    return result | {"gc_s": seconds, "passes": passes, "freed": freed}


def _serve(mode: str, port: str, ledger_url: str, out: str) -> int:
    """The receiver as `bench.webhooks` serves it, writing its collector figures to `out` on
    SIGUSR1 (`out`.start: before the webhooks) and when it stops (uvicorn raises the SIGINT it
    stopped on again once it has)."""
    from bench.webhooks import _serve as serve

    _set_mode(mode)
    collections = _Collections()
    start = Path(f"{out}.start")
    signal.signal(signal.SIGUSR1, lambda *_: start.write_text(json.dumps(collections.snapshot())))
    try:
        return serve(["receiver", port, ledger_url])
    finally:
        Path(out).write_text(json.dumps(collections.snapshot()))


def _receiver(mode: str, bodies: list, concurrency: int) -> dict[str, Any]:
    import psutil

    from bench.webhooks import _fire, _free_port, _sent_to, wait_healthy

    with tempfile.TemporaryDirectory() as tmp:
        url, out, port = f"sqlite:///{tmp}/ledger.sqlite", f"{tmp}/gc.json", _free_port()
        _sent_to(url, len(bodies))
        process = subprocess.Popen([*_BENCH, "_serve", mode, str(port), url, out], cwd=ROOT)
        try:
            wait_healthy(port)
            server = psutil.Process(process.pid)
            process.send_signal(signal.SIGUSR1)  # the collector's figures so far: start-up's
            while not Path(f"{out}.start").exists():
                time.sleep(0.01)
            cpu_before = sum(server.cpu_times()[:2])
            wall = asyncio.run(_fire(f"http://127.0.0.1:{port}/webhooks/meta", bodies, concurrency))
            cpu = sum(server.cpu_times()[:2]) - cpu_before
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(30)
        began = json.loads(Path(f"{out}.start").read_text())
        gc_s, passes, freed = _since(began, json.loads(Path(out).read_text()))
    n = len(bodies)
    return {"wall": wall, "cpu": cpu, "done": n, "gc_s": gc_s, "passes": passes, "freed": freed}


def _engine(mode: str, sandbox: Sandbox, count: int) -> dict[str, Any]:
    done = subprocess.run(
        [*_BENCH, "_engine", mode, sandbox.url, str(count)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"engine {mode} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _row(path: str, mode: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def mid(key: str) -> float:
        return median(r[key] for r in runs)

    done = runs[0]["done"]
    return {
        "path": path,
        "mode": mode,
        "done": done,
        "rate": median(r["done"] / r["wall"] for r in runs),
        "cpu_us": median(r["cpu"] * 1e6 / r["done"] for r in runs),
        "gc_us": median(r["gc_s"] * 1e6 / r["done"] for r in runs),
        "gc_share": median(r["gc_s"] / r["cpu"] for r in runs),
        "passes": mid("passes"),
        "freed": median(r["freed"] / r["done"] for r in runs),
    }


def report(rows: list[dict[str, Any]], command: str, repeats: int) -> str:
    now = datetime.now(UTC)
    lines = [
        "# The garbage collector on the hot paths",
        "",
        f"Measured {now:%Y-%m-%d %H:%M} UTC with `{command}` on {os.cpu_count()} CPUs "
        f"({_cpu_model()}), Python {sys.version.split()[0]}; medians of {repeats} fresh "
        "processes a row, the two versions alternated.",
        "",
        "| path | version | items | items/s | CPU an item | collector an item | collector "
        "share of CPU | passes | objects it freed an item | CPU now ÷ before |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in ("engine", "receiver"):
        before = next(r for r in rows if r["path"] == path and r["mode"] == "before")
        for r in (r for r in rows if r["path"] == path):
            label = (
                "`deliver()` + SQLite ledger, batch 1, 100 ms sandbox"
                if path == "engine"
                else "status receiver + SQLite ledger"
            )
            ratio = f"{r['cpu_us'] / before['cpu_us']:.2f}" if r is not before else ""
            lines.append(
                f"| {label} | {r['mode']} | {r['done']:,} | {r['rate']:,.0f} | "
                f"{r['cpu_us']:.0f} µs | {r['gc_us']:.1f} µs | {r['gc_share']:.0%} | "
                f"{r['passes']:,.0f} | {r['freed']:.1f} | {ratio} |"
            )
    lines += [
        "",
        "*before*: CPython's young threshold (a pass every 700 net new objects; a delivery "
        "froze what start-up left, the receiver did not, so its old passes walked all of it) "
        "and httpx's own send for every request (each answer's stream holds the response: "
        "request, URL and headers wait for the collector). *now*: `heap.delivering` and "
        "`heap.tune_for_serving` (start-up frozen, a young pass every 50,000 net new objects) "
        "and `transport._DeliveryClient` (a plain request goes straight to the transport, and "
        "no answer holds a cycle): the engine's CPU ratio counts both, its collector columns "
        "the collector alone. "
        "The receiver leaves next to no cyclic garbage: its passes before were all churn, "
        "each walking every object of start-up as it reached the old generation.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv and argv[0] == "_engine":
        print(json.dumps(_engine_child(argv[1], argv[2], int(argv[3]))))
        return 0
    if argv and argv[0] == "_serve":
        return _serve(*argv[1:5])
    parser = argparse.ArgumentParser(prog="python -m bench collector")
    parser.add_argument("--recipients", type=int, default=20_000, help="engine messages")
    parser.add_argument("--events", type=int, default=20_000, help="receiver webhooks")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from bench.throughput import LATENCY_MS
    from bench.webhooks import _bodies

    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    sandbox = Sandbox(LATENCY_MS, 1)
    try:
        for _ in range(args.repeats):
            for mode in _MODES:
                result = _engine(mode, sandbox, args.recipients)
                runs.setdefault(("engine", mode), []).append(result)
                print("engine", mode, json.dumps(result)[:200], file=sys.stderr)
    finally:
        sandbox.close()
    bodies = _bodies(args.events)
    for _ in range(args.repeats):
        for mode in _MODES:
            result = _receiver(mode, bodies, 100)
            runs.setdefault(("receiver", mode), []).append(result)
            print("receiver", mode, json.dumps(result), file=sys.stderr)
    rows = [_row(path, mode, found) for (path, mode), found in runs.items()]
    command = "python -m bench collector " + " ".join(argv)
    publish(RESULTS, report(rows, command.strip(), args.repeats))
    return 0
