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


def report(results: Results, args: argparse.Namespace) -> str:
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
            f"Goal (issue 19): a run's start-up ≤ {GOAL_CPU_S:.0f} s CPU — {names[0]}: "
            f"{run_cpu:.2f} s, {verdict}.",
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
                for _ in range(args.repeats):
                    for version in versions:
                        for part, measure in version.parts().items():
                            results[version.name][part].append(measure())
        finally:
            endpoint.close()
    publish(RESULTS, report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
