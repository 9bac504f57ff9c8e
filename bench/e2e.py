"""One activation end to end on N customers (10,000,000 by default): memory and where the time goes.

`python -m bench e2e [--customers N] [--batch 200]` from the repository root. As a user runs it:
the demo warehouse of N customers (DuckDB), then `cdp-activation preview winback_gateway` and
`cdp-activation run winback_gateway` (every lapsed customer with an order and SMS consent, the
`webhook` connector, batches of `--batch`, 32 requests in flight, a SQLite ledger, a Dagster
instance; the activation's `limits.max_recipients` stops a run at 1,000,000) to the peers
benchmark's bare endpoint on 127.0.0.1 (bench/peer_endpoint.py, its own process, answering at
once). For each command: wall time, CPU and peak resident memory of that process alone
(`wait4`), and per Dagster step (audience SQL, its checks, the policy, its checks, the ledger
plan, the claim worker's sending, the summary) its time and the highest resident memory
sampled while it ran. Every recipient must arrive exactly once (checked). Figures go to
bench/results_e2e.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.delivery import _cpu_model
from bench.index import publish
from bench.peers import ROOT, Endpoint, Project

RESULTS = ROOT / "bench" / "results_e2e.md"
GOAL_PEAK_MB = 4096  # issue 19: one activation on 10M customers within 4 GB


def _sample_rss(pid: int, samples: list[tuple[float, float]], stop: threading.Event) -> None:
    """(time, resident MB) of process `pid` every 0.2 s until `stop`."""
    status = Path(f"/proc/{pid}/status")
    while not stop.wait(0.2):
        try:
            line = next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        samples.append((time.time(), int(line.split()[1]) / 1024))


def _process(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `command` to the end: its own wall time, CPU and peak RSS (not its siblings'),
    and its resident memory sampled over time (to tell which step held how much)."""
    began = time.perf_counter()
    child = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(child.pid, samples, stop), daemon=True)
    sampler.start()
    assert child.stdout is not None
    output = child.stdout.read()
    stop.set()
    sampler.join()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - began
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{output[-3000:]}")
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "peak_mb": usage.ru_maxrss / 1024,
        "samples": samples,
    }


def _steps(home: Path, samples: list[tuple[float, float]]) -> list[tuple[str, float, float | None]]:
    """Dagster's timing of each step of the last run under `home`, and the highest resident
    memory sampled while it ran."""
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    instance = dg.DagsterInstance.get()
    try:
        run = instance.get_runs(limit=1)[0]
        stats = instance.get_run_step_stats(run.run_id)
    finally:
        instance.dispose()
    steps = []
    for step in sorted(stats, key=lambda s: s.start_time or 0.0):
        start, end = step.start_time or 0.0, step.end_time or 0.0
        during = [mb for when, mb in samples if start <= when <= end]
        name = step.step_key.rsplit(".", 1)[-1].split("__", 1)[-1]
        steps.append((name, end - start, max(during, default=None)))
    return steps


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench e2e")
    parser.add_argument("--customers", type=int, default=10_000_000)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args(argv)
    endpoint = Endpoint(0.0)
    data = ROOT / "bench" / "data"
    data.mkdir(parents=True, exist_ok=True)  # a fresh checkout has none
    try:
        with tempfile.TemporaryDirectory(prefix="cdp-e2e-", dir=data) as tmp:
            project = Project(Path(tmp), args.customers, preview=False)
            env = project.env(endpoint, args.batch)
            preview = _process([*project.command("preview"), "--json"], env)
            preview_steps = _steps(project.home, preview["samples"])
            endpoint.reset()
            run = _process(project.command("run"), env)
            arrived = endpoint.count()
            if arrived["messages"] != arrived["keys"]:
                raise RuntimeError(f"{arrived['messages'] - arrived['keys']} arrived twice")
            rows = {
                "warehouse_s": project.warehouse_seconds,
                "preview": preview,
                "run": run,
                "recipients": arrived["keys"],
                "preview_steps": preview_steps,
                "steps": _steps(project.home, run["samples"]),
                "ledger_mb": project.ledger.stat().st_size / 2**20,
            }
    finally:
        endpoint.close()
    publish(RESULTS, _report(rows, args))
    return 0


def _report(rows: dict[str, Any], args: argparse.Namespace) -> str:
    run, preview, n = rows["run"], rows["preview"], rows["recipients"]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    peak = max(run["peak_mb"], preview["peak_mb"])
    lines = [
        f"# One activation end to end on {args.customers:,} customers",
        "",
        f"Measured {when} UTC with `python -m bench e2e --customers {args.customers} "
        f"--batch {args.batch}` on {os.cpu_count()} CPUs ({_cpu_model()}), Python "
        f"{sys.version.split()[0]}: `winback_gateway` (SMS through the `webhook` connector, "
        f"batches of {args.batch}, 32 in flight) to a bare endpoint on 127.0.0.1 answering at "
        "once; DuckDB warehouse, SQLite ledger, a Dagster instance. Each command is its own "
        "process; its peak memory is its own.",
        "",
        "| command | wall | CPU | peak memory | recipients/s |",
        "|---|---:|---:|---:|---:|",
        f"| demo warehouse ({args.customers:,} customers, generated) | "
        f"{rows['warehouse_s']:.1f} s | | | |",
        f"| `cdp-activation preview` (audience, policy, cold phone cache) | "
        f"{preview['wall']:.1f} s | {preview['cpu']:.1f} s | {preview['peak_mb']:,.0f} MB | |",
        f"| `cdp-activation run` ({n:,} recipients sent, each once) | {run['wall']:.1f} s | "
        f"{run['cpu']:.1f} s | {run['peak_mb']:,.0f} MB | {n / run['wall']:,.0f} |",
        "",
        f"Peak memory {peak:,.0f} MB against the goal of {GOAL_PEAK_MB:,} MB (issue 19): "
        f"**{'met' if peak <= GOAL_PEAK_MB else 'not met'}**. The ledger file ends at "
        f"{rows['ledger_mb']:,.0f} MB.",
        "",
        "Where the time and the memory go (Dagster's step timings; the highest resident memory",
        "of the process sampled every 0.2 s while the step ran: memory a step freed may stay",
        "with the process and show in the next; the audience and decisions checks run inside",
        "their steps, template_approved is a step of its own):",
        "",
        "| step | preview: seconds | preview: memory | run: seconds | run: memory |",
        "|---|---:|---:|---:|---:|",
    ]

    def memory(mb: float | None) -> str:
        return "n/a" if mb is None else f"{mb:,.0f} MB"  # n/a: over before a sample was taken

    previewed = {name: (seconds, mb) for name, seconds, mb in rows["preview_steps"]}
    for name, seconds, mb in rows["steps"]:
        before = previewed.get(name)
        shown = f"{before[0]:.1f} | {memory(before[1])}" if before else " | "
        lines.append(f"| {name} | {shown} | {seconds:.1f} | {memory(mb)} |")
    lines += [
        "",
        "The rest of a command's wall time is the process: imports, loading the definitions, "
        "starting the Dagster run, the summary.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
