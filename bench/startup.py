"""Start-up: what a run costs before and around its first sends (issue 19's ≤ 2 s CPU goal).

`python -m bench startup [--customers 20000] [--repeats 5] [--baseline REV]` times, in fresh
processes, a 200-recipient `cdp-activation run winback_gateway` to the peers' bare endpoint
(bench/peer_endpoint.py, answering at once: the sends themselves are a few ms) and its parts:

- a bare interpreter (`python -c pass`): the floor every peer pays too;
- `import cdp_activation.cli.runner`: the imports a run needs (Dagster is most of them);
- the imports, then `load_definitions()`: the Dagster code location, every activation;

both as a command does them, with the collector off (`heap.start_up`) where the version has it;
- the whole run: imports, definitions, the run queue's look at the instance, the Dagster run
  (audience query, policy, ledger plan, 200 sends, the checks).

Beside them, Dagster alone (`DAGSTER_FLOOR`): `import dagster`, then its instance (the same
`dagster.yaml`, SQLite storage, a home that already holds runs, as the project's does), then
an in-process run of a chain of trivial assets as many as the run's steps. Every run of the
project pays at least that; it is what says whether the goal is reachable with Dagster at all.

With `--baseline REV` the same is measured, interleaved run by run, on the source of revision
REV (a git worktree put first on PYTHONPATH, the same virtual environment), so the table's
ratios compare two versions of the code on the same machine in the same minutes. CPU is the
child's user + system time (`getrusage` of children); medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from bench.delivery import _cpu_model
from bench.index import publish
from bench.peers import ROOT, Endpoint, Project, cpu_and_wall

RESULTS = ROOT / "bench" / "results_startup.md"

# The steps of a 200-recipient run: audience, decisions, its template check, the deliveries'
# prepare, one claim worker, finish.
RUN_STEPS = 6
# Dagster by itself, in three depths (`DAGSTER_FLOOR.format(depth=…)`): 1 imports it, 2 also
# opens the instance, 3 also runs a chain of RUN_STEPS trivial assets in process, as a run does.
DAGSTER_FLOOR = """
import gc; gc.disable()
import dagster as dg
if {depth} >= 2:
    instance = dg.DagsterInstance.get()
if {depth} >= 3:
    gc.enable()
    previous = None
    assets = []
    for index in range({steps}):
        deps = [previous] if previous is not None else []
        previous = dg.asset(name=f"step_{{index}}", deps=deps)(lambda: None)
        assets.append(previous)
    job = dg.Definitions(assets=assets).get_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance).success
"""
GOAL_CPU_S = 2.0

# As a command starts up (heap.start_up: the collector off until the definitions are loaded),
# on a version that has it.
START_UP = "from cdp_activation import heap; getattr(heap, 'start_up', lambda: None)(); "
IMPORTS = START_UP + "import cdp_activation.cli.runner"
# The `cdp-activation` script of the version measured (its entry point has changed name).
COMMAND = (
    "import sys; from cdp_activation.cli import main as m; "
    "sys.exit((getattr(m, 'entry', None) or m.main)())"
)
LOAD = START_UP + (
    "from cdp_activation.cli.runner import load_definitions; load_definitions(tolerant=True)"
)


class Version:
    """One version of the source: this checkout, or REV in a worktree."""

    def __init__(self, name: str, source: Path, project: Project, endpoint: Endpoint) -> None:
        self.name, self.source, self.project, self.endpoint = name, source, project, endpoint

    def env(self) -> dict[str, str]:
        env = self.project.env(self.endpoint, 200)
        env["PYTHONPATH"] = str(self.source / "src")  # before the editable install's path
        env["CDP_PROJECT_ROOT"] = str(self.source)
        return env

    def parts(self) -> dict[str, Callable[[], tuple[float, float]]]:
        python = sys.executable
        run = [python, "-c", COMMAND, *self.project.command("run", 200)[1:]]

        def fresh_run() -> tuple[float, float]:
            ledger = self.project.fresh_ledger()
            env = self.env() | {"CDP_LEDGER_URL": f"sqlite:///{ledger}"}
            self.endpoint.reset()
            result = cpu_and_wall(run, env, self.source)
            arrived = self.endpoint.count()["messages"]
            if arrived != 200:
                raise RuntimeError(f"{self.name}: {arrived} recipients arrived, not 200")
            return result

        return {
            "bare interpreter (`python -c pass`)": lambda: cpu_and_wall(
                [python, "-c", "pass"], self.env(), self.source
            ),
            "imports (`import cdp_activation.cli.runner`)": lambda: cpu_and_wall(
                [python, "-c", IMPORTS], self.env(), self.source
            ),
            "imports + `load_definitions()`": lambda: cpu_and_wall(
                [python, "-c", LOAD], self.env(), self.source
            ),
            "a 200-recipient `cdp-activation run`": fresh_run,
        }


def dagster_floor(project: Project) -> dict[str, Callable[[], tuple[float, float]]]:
    """Dagster alone, in fresh processes, on an instance of its own beside the project's."""
    home = project.home.parent / "dagster_floor_home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text((project.home / "dagster.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "DAGSTER_"))}
    env["DAGSTER_HOME"] = str(home)
    labels = {
        1: "`import dagster`",
        2: "`import dagster`, its instance",
        3: f"`import dagster`, its instance, an in-process run of {RUN_STEPS} trivial assets",
    }

    def part(depth: int) -> Callable[[], tuple[float, float]]:
        code = DAGSTER_FLOOR.format(depth=depth, steps=RUN_STEPS)
        return lambda: cpu_and_wall([sys.executable, "-c", code], env, ROOT)

    part(3)()  # the instance's storage is created once, as the project's already is
    return {labels[depth]: part(depth) for depth in labels}


def worktree(rev: str, into: Path) -> Path:
    path = into / f"baseline-{rev}"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return path


@contextlib.contextmanager
def sources(baseline: str | None, into: Path) -> Iterator[dict[str, Path]]:
    """{"now": this checkout} and, with `baseline`, {baseline: its source in a git worktree
    under `into`}, removed again on the way out."""
    found = {"now": ROOT}
    try:
        if baseline:
            found[baseline] = worktree(baseline, into)
        yield found
    finally:
        for name, tree in found.items():
            if name != "now":
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False
                )


def version_options(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The options every before-and-after benchmark takes."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--baseline", help="a git revision to measure beside this checkout")


Results = dict[str, dict[str, list[tuple[float, float]]]]  # version -> part -> (CPU, wall)


def report(
    results: Results, floor: dict[str, list[tuple[float, float]]], args: argparse.Namespace
) -> str:
    names = list(results)
    head = ["part"]
    for name in names:
        head += [f"{name} CPU", f"{name} wall"]
    if len(names) == 2:
        head.append(f"CPU {names[0]} ÷ {names[1]}")
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    parts = list(results[names[0]])
    for part in parts:
        row = [part]
        cpus = []
        for name in names:
            runs = results[name][part]
            cpu = statistics.median(c for c, _ in runs)
            wall = statistics.median(w for _, w in runs)
            cpus.append(cpu)
            row += [f"{cpu:.2f} s", f"{wall:.2f} s"]
        if len(names) == 2:
            row.append(f"{cpus[0] / cpus[1]:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    command = "python -m bench startup " + " ".join(args.argv)
    run_cpu = statistics.median(c for c, _ in results[names[0]][parts[-1]])
    verdict = "met" if run_cpu <= GOAL_CPU_S else "not met"
    floor_lines = ["| Dagster alone | CPU | wall |", "|---|---:|---:|"]
    for part, runs in floor.items():
        cpu = statistics.median(c for c, _ in runs)
        wall = statistics.median(w for _, w in runs)
        floor_lines.append(f"| {part} | {cpu:.2f} s | {wall:.2f} s |")
    dagster_cpu = statistics.median(c for c, _ in list(floor.values())[-1])
    return "\n".join(
        [
            "# Start-up: a 200-recipient run and its parts",
            "",
            f"Measured {now} UTC with `{command.strip()}` on {os.cpu_count()} CPUs "
            f"({_cpu_model()}), Python {sys.version.split()[0]}; {args.customers:,} customers, "
            f"medians of {args.repeats} fresh processes, versions interleaved run by run.",
            "",
            *lines,
            "",
            *floor_lines,
            "",
            f"Goal (issue 19): a run's start-up ≤ {GOAL_CPU_S:.0f} s CPU — {names[0]}: "
            f"{run_cpu:.2f} s, {verdict}. Dagster alone, before any of the project's work, "
            f"takes {dagster_cpu:.2f} s ({dagster_cpu / GOAL_CPU_S:.0%} of the goal); the run "
            f"takes {run_cpu - dagster_cpu:.2f} s more.",
            "",
        ]
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench startup")
    parser.add_argument("--customers", type=int, default=20_000)
    version_options(parser, repeats=5)
    args = parser.parse_args(argv)
    args.argv = argv
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        project = Project(work, args.customers)
        endpoint = Endpoint(0.0)
        try:
            with sources(args.baseline, work) as found:
                versions = [Version(n, src, project, endpoint) for n, src in found.items()]
                results: Results = {v.name: {part: [] for part in v.parts()} for v in versions}
                floor_parts = dagster_floor(project)
                floor: dict[str, list[tuple[float, float]]] = {part: [] for part in floor_parts}
                for _ in range(args.repeats):
                    for version in versions:
                        for part, measure in version.parts().items():
                            results[version.name][part].append(measure())
                    for part, measure in floor_parts.items():
                        floor[part].append(measure())
        finally:
            endpoint.close()
    publish(RESULTS, report(results, floor, args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
