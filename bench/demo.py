"""`make demo` timed: issue 19's goal of ≤ 20 s for the demo of 100,000 customers.

`python -m bench demo [--customers 100000] [--repeats 3] [--baseline REV]
[--send-window HH:MM-HH:MM]` runs `cdp-activation demo --json` to the end in fresh
processes, each with a fresh Dagster home holding only the project's `dagster.yaml` (as a
fresh clone has it: no runs, no warehouse, no ledger) and its own sandbox port: everything
the command does — the warehouse, the sandbox and the status receiver, the preview, the
Dagster run with its sends and the status reports coming back, the SMS fallback. Wall
seconds, and CPU seconds of the demo process and the processes it started and waited for (the
sandbox and the receiver, `getrusage` of children).

How many messages go out depends on the hour: the activation's quiet hours hold back the
customers whose local time is night. `--send-window 00:00-23:59` sends to every eligible
customer whatever the hour (~20,000), as at the busiest hour of the day.

With `--baseline REV` the same is measured, interleaved run by run, on the source of revision
REV (a git worktree first on PYTHONPATH, the same virtual environment). Figures go to
bench/results_demo.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.delivery import _cpu_model
from bench.index import publish
from bench.peers import ROOT, measured_run
from bench.startup import sources, version_options
from bench.webhooks import _free_port

RESULTS = ROOT / "bench" / "results_demo.md"
GOAL_S = 20.0


def run_demo(source: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """One `cdp-activation demo` of `source`, from nothing: wall, CPU, what it sent."""
    home = Path(tempfile.mkdtemp(prefix="home-", dir=work))
    # As a fresh clone has it: the project's instance settings, no runs, no ledger.
    shutil.copy(source / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "DAGSTER_"))}
    env |= {
        "DAGSTER_HOME": str(home),
        "PYTHONPATH": str(source / "src"),  # before the editable install's path
        "CDP_PROJECT_ROOT": str(source),
    }
    command = [
        str(Path(sys.executable).parent / "cdp-activation"),
        "demo",
        "--json",
        "--customers",
        str(args.customers),
        "--port",
        str(_free_port()),
    ]
    if args.send_window:
        command += ["--send-window", args.send_window]
    cpu, wall, out = measured_run(command, env, source)
    summary = json.loads(out.strip().splitlines()[-1])
    fallback = summary.get("fallback") or {}
    return {
        "wall": wall,
        "cpu": cpu,
        "sent": summary["sent"] + summary["failed"],
        "deferred": summary["deferred"],
        "fallback": fallback.get("sent", 0) + fallback.get("failed", 0),
    }


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    names = list(results)
    lines = [
        "| version | wall (median) | wall (each run) | CPU (median) | first messages sent "
        "| deferred by quiet hours | SMS fallback sent |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    medians = {}
    for name in names:
        runs = results[name]
        wall = statistics.median(r["wall"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        medians[name] = (wall, cpu)
        each = ", ".join(f"{r['wall']:.1f}" for r in runs)
        lines.append(
            f"| {name} | {wall:.1f} s | {each} | {cpu:.1f} s | {runs[-1]['sent']:,.0f} | "
            f"{runs[-1]['deferred']:,.0f} | {runs[-1]['fallback']:,.0f} |"
        )
    if len(names) == 2:
        (wall0, cpu0), (wall1, cpu1) = medians[names[0]], medians[names[1]]
        lines += [
            "",
            f"{names[0]} ÷ {names[1]}: wall {wall0 / wall1:.2f}, CPU {cpu0 / cpu1:.2f}.",
        ]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    command = ("python -m bench demo " + " ".join(args.argv)).strip()
    wall_now = medians[names[0]][0]
    verdict = "met" if wall_now <= GOAL_S else "not met"
    window = (
        f"send window {args.send_window} (every eligible customer now)"
        if args.send_window
        else "the activation's quiet hours (what `make demo` does at this hour)"
    )
    return "\n".join(
        [
            "# `make demo`: the whole demo, timed",
            "",
            f"Measured {now} UTC with `{command}` on {os.cpu_count()} CPUs ({_cpu_model()}), "
            f"Python {sys.version.split()[0]}; {args.customers:,} customers, {window}; "
            f"each run from nothing (a fresh Dagster home), versions interleaved run by run. "
            "CPU is the demo's and the processes it started (sandbox, status receiver).",
            "",
            *lines,
            "",
            f"Goal (issue 19): `make demo` ≤ {GOAL_S:.0f} s — {names[0]}: {wall_now:.1f} s, "
            f"{verdict}.",
            "",
        ]
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench demo")
    parser.add_argument("--customers", type=int, default=100_000)
    version_options(parser, repeats=3)
    parser.add_argument("--send-window", help="HH:MM-HH:MM, passed to the demo")
    args = parser.parse_args(argv)
    args.argv = argv
    with (
        tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp,
        sources(args.baseline, Path(tmp)) as versions,
    ):
        results: dict[str, list[dict[str, float]]] = {name: [] for name in versions}
        for _ in range(args.repeats):
            for name, source in versions.items():
                results[name].append(run_demo(source, Path(tmp), args))
                print(name, results[name][-1], file=sys.stderr)
    publish(RESULTS, report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
