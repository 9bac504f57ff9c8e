"""bench/results.md ends with an index of every benchmark's own results file.

Each benchmark writes its full tables to `bench/results_<name>.md` (the audience benchmark to
`bench/results.md` itself) and then calls `refresh()`, so bench/results.md always lists every
benchmark with the line that says when and how it was last measured.
"""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results.md"
MARKER = "<!-- index of every benchmark: written by bench/index.py -->"


def _summary(path: Path) -> tuple[str, str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    title = next((line.lstrip("# ") for line in lines if line.startswith("#")), path.stem)
    measured = next((line for line in lines if line.startswith("Measured")), "")
    # "Measured <date> UTC with `<command>` on <machine>…": the date and the command.
    return title, measured.removeprefix("Measured ").split("` on ", 1)[0].rstrip(".") + (
        "`" if "` on " in measured else ""
    )


def publish(path: Path, text: str) -> None:
    """A benchmark's report: printed, written to its results file, and indexed."""
    print(text)
    path.write_text(text)
    refresh()


def refresh() -> None:
    """Rewrite the index at the end of bench/results.md (kept above the marker: the rest)."""
    head = RESULTS.read_text(encoding="utf-8").split(MARKER)[0].rstrip() if RESULTS.exists() else ""
    rows = ["| file | benchmark | last measured |", "|---|---|---|"]
    for path in sorted(BENCH.glob("results_*.md")):
        title, measured = _summary(path)
        rows.append(f"| [{path.name}]({path.name}) | {title} | {measured} |")
    index = "\n".join([MARKER, "", "## Every benchmark", "", *rows])
    RESULTS.write_text((head + "\n\n" if head else "") + index + "\n", encoding="utf-8")
