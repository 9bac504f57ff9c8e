"""Phone normalisation benchmark: `normalise_frame` on 10,000,000 audience rows.

`python -m bench.policy_phones [--rows N]` from the repository root. The phone and country
columns come from the demo warehouse (`bench/data/demo_10m.duckdb`, generated once, ~45 s) and
are exported to Parquet so every measurement starts from the same frame. Each measurement runs
in its own subprocess, so its peak RSS (the child's `ru_maxrss`, from `os.wait4`) is its own:

- baseline: a bare polars filter on the same column (`phone` starts with "+");
- old: phonenumbers on every distinct (phone, country) — the code before the fast path; past
  5 minutes it is timed on a 200,000-pair sample and extrapolated (the table says so);
- new, no cache: the polars fast path for E.164 values, phonenumbers for the rest;
- new, cold: the same with an empty SQLite `PhoneCache` (fresh file) it fills;
- new, warm: the same cache, filled: no phonenumbers call at all.

Wall time is the work inside the child, after loading the frame; the ratio is against the
baseline measured in the same run. Figures go to bench/results_policy_phones.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.index import refresh as refresh_index

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"
RESULTS = ROOT / "bench" / "results_policy_phones.md"
DEFAULT_ROWS = 10_000_000
OLD_BUDGET_SECONDS = 300.0  # the old path runs in full only if it should finish within this
OLD_SAMPLE_PAIRS = 200_000
OLD_SECONDS_PER_PAIR = 80e-6  # DESIGN.md §8: phonenumbers costs ~80 µs a number
MODES = ("baseline", "old", "nocache", "cold", "warm")
LABELS = {
    "baseline": "baseline: bare polars filter",
    "old": "old: phonenumbers per distinct pair",
    "nocache": "new, no cache",
    "cold": "new, cold cache (SQLite)",
    "warm": "new, warm cache (SQLite)",
}


# ---------------------------------------------------------------------- data


# The demo's "now": every time in the warehouse is relative to it, so one fixed moment makes
# the same rows, and the same decisions, whenever the warehouse is generated (bench.policy
# decides at this moment too).
AS_OF = datetime(2026, 11, 23, 15, 0, tzinfo=UTC)


def warehouse_file(rows: int) -> Path:
    """The demo warehouse with `rows` customers as of `AS_OF`, generated unless already there."""
    from cdp_activation.demo.data import generate_demo_warehouse

    stamp = f"{AS_OF:%Y%m%dT%H}"
    names = (
        [f"demo_{rows // 1_000_000}m_{stamp}.duckdb", f"demo_{rows}_{stamp}.duckdb"]
        if rows % 1_000_000 == 0
        else [f"demo_{rows}_{stamp}.duckdb"]
    )
    for name in names:
        if (DATA / name).exists() and _customers(DATA / name) == rows:
            return DATA / name
    path = DATA / names[0]
    sys.stderr.write(f"generating {path} ({rows:,} customers as of {AS_OF:%Y-%m-%d %H:%M} UTC)…\n")
    generate_demo_warehouse(path, customers=rows, as_of=AS_OF)
    return path


def _customers(path: Path) -> int:
    import duckdb

    with duckdb.connect(str(path), read_only=True) as con:
        row = con.execute("SELECT count(*) FROM customers").fetchone()
    return int(row[0]) if row else 0


def audience_file(rows: int) -> Path:
    """Parquet of the (phone, country) columns, exported once from the warehouse."""
    import duckdb

    path = DATA / f"policy_phones_{rows}.parquet"
    if not path.exists():
        source = warehouse_file(rows)
        tmp = path.with_suffix(".parquet.tmp")
        with duckdb.connect(str(source), read_only=True) as con:
            con.execute("SET enable_progress_bar = false")
            con.execute(
                f"COPY (SELECT phone, country FROM customers ORDER BY customer_id) "
                f"TO '{tmp}' (FORMAT parquet)"
            )
        tmp.replace(path)
    return path


# ---------------------------------------------------------------------- measurements


def _old_normalise_frame(frame: Any) -> Any:
    """The path before this change: `normalise` on every distinct (phone, country), joined back."""
    import polars as pl

    from cdp_activation.policy.phones import normalise

    keys = ["phone", "country"]
    distinct = frame.select(keys).unique()
    results = [normalise(raw, region) for raw, region in distinct.iter_rows()]
    lookup = distinct.with_columns(
        pl.Series("phone_e164", [r[0] for r in results], dtype=pl.String),
        pl.Series("phone_status", [r[1] for r in results], dtype=pl.String),
    )
    return frame.join(lookup, on=keys, how="left", nulls_equal=True)


def child(mode: str, audience: Path, cache_file: Path) -> dict[str, Any]:
    """One measurement; returns its figures (the parent adds the peak RSS)."""
    import polars as pl

    from cdp_activation.policy.phone_cache import PhoneCache
    from cdp_activation.policy.phones import normalise_frame, phonenumbers_calls

    frame = pl.read_parquet(audience)
    out: dict[str, Any] = {"rows": len(frame)}
    if mode == "baseline":
        started = time.perf_counter()
        kept = frame.filter(pl.col("phone").str.starts_with("+"))
        out["seconds"] = time.perf_counter() - started
        out["kept"] = len(kept)
        return out
    if mode == "old":
        distinct = frame.select("phone", "country").unique()
        out["distinct_pairs"] = len(distinct)
        if len(distinct) * OLD_SECONDS_PER_PAIR <= OLD_BUDGET_SECONDS:
            started = time.perf_counter()
            _old_normalise_frame(frame)
            out["seconds"] = time.perf_counter() - started
            out["extrapolated"] = False
            return out
        sample = distinct.sample(OLD_SAMPLE_PAIRS, seed=1)
        rows = frame.join(sample, on=["phone", "country"], how="semi", nulls_equal=True)
        started = time.perf_counter()
        _old_normalise_frame(rows)
        sample_seconds = time.perf_counter() - started
        out["sample_pairs"] = len(sample)
        out["sample_seconds"] = sample_seconds
        out["seconds"] = sample_seconds * len(distinct) / len(sample)
        out["extrapolated"] = True
        return out
    cache = None
    if mode in ("cold", "warm"):
        if mode == "cold":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{cache_file}{suffix}").unlink(missing_ok=True)
        cache = PhoneCache(f"sqlite:///{cache_file}", key=b"bench-pii-hash-key")
    calls = phonenumbers_calls()
    started = time.perf_counter()
    result = normalise_frame(frame, cache=cache)
    out["seconds"] = time.perf_counter() - started
    out["phonenumbers_calls"] = phonenumbers_calls() - calls
    out["status"] = dict(result.group_by("phone_status").len().iter_rows())
    if cache is not None:
        out["cached_pairs"] = cache.count()
        cache.dispose()
    return out


def run_child(mode: str, audience: Path, cache_file: Path) -> dict[str, Any]:
    """Run `child` in a fresh interpreter; its peak RSS comes from `os.wait4`."""
    command = [sys.executable, "-m", "bench.policy_phones", "--child", mode]
    command += ["--audience", str(audience), "--cache-file", str(cache_file)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {mode!r} failed with exit code {proc.returncode}")
    figures: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    figures["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    return figures


# ---------------------------------------------------------------------- report


def _machine() -> str:
    memory = "?"
    cpu = platform.processor() or "?"
    try:
        meminfo = Path("/proc/meminfo").read_text()
        kib = int(
            next(line for line in meminfo.splitlines() if line.startswith("MemTotal")).split()[1]
        )
        memory = f"{kib / 1024 / 1024:.1f} GiB"
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.splitlines()
                if "model name" in line
            ),
            cpu,
        )
    except (OSError, StopIteration, ValueError):
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), {memory} RAM, {platform.system()} {platform.release()}"


def _versions() -> str:
    import duckdb
    import phonenumbers
    import polars as pl
    import sqlalchemy as sa

    return (
        f"Python {platform.python_version()}, polars {pl.__version__}, phonenumbers "
        f"{phonenumbers.__version__}, SQLAlchemy {sa.__version__}, DuckDB {duckdb.__version__}, "
        f"SQLite {__import__('sqlite3').sqlite_version}"
    )


def report(
    results: dict[str, dict[str, Any]], rows: int, command: str, load: tuple[float, ...]
) -> str:
    base = results["baseline"]["seconds"]
    lines = [
        f"## Phone normalisation on {rows:,} audience rows",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {_machine()}",
        f"- Versions: {_versions()}",
        f"- Command: `{command}`",
        f"- Load average (1 min) at start / end: {load[0]:.2f} / {os.getloadavg()[0]:.2f} "
        "(a shared machine: other work inflates wall times)",
        "",
        "| measurement | wall time | peak RSS | x baseline | phonenumbers calls |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        figures = results.get(mode)
        if figures is None:
            continue
        seconds = figures["seconds"]
        label = LABELS[mode]
        rss = f"{figures['peak_rss_mb']:,.0f} MB"
        if figures.get("extrapolated"):
            label += " (extrapolated)"
            rss += " (sample)"
        calls = figures.get("phonenumbers_calls", figures.get("distinct_pairs", ""))
        calls = f"{calls:,}" if isinstance(calls, int) else calls
        lines.append(f"| {label} | {seconds:,.2f} s | {rss} | {seconds / base:,.1f}x | {calls} |")
    old = results.get("old", {})
    lines.append("")
    if old.get("extrapolated"):
        lines.append(
            f"The old path was timed on {old['sample_pairs']:,} of its "
            f"{old['distinct_pairs']:,} distinct (phone, country) pairs "
            f"({old['sample_seconds']:.1f} s) and extrapolated linearly; its peak RSS is the "
            "sample run's, not a full run's."
        )
    cold = results.get("cold", {})
    if cold:
        lines.append(
            f"Cold run left {cold.get('cached_pairs', 0):,} pairs in the cache (only values not "
            "in E.164 form reach phonenumbers and the cache); statuses: "
            f"{cold.get('status')}."
        )
    lines.append(
        "Peak RSS includes the loaded frame (the same for every row); wall time excludes loading."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy_phones", description=__doc__)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--audience", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        figures = child(args.child, args.audience, args.cache_file)
        sys.stdout.write(json.dumps(figures, default=str) + "\n")
        return 0

    audience = audience_file(args.rows)
    cache_file = DATA / f"policy_phones_cache_{args.rows}.sqlite"
    results: dict[str, dict[str, Any]] = {}
    load = os.getloadavg()
    for mode in MODES:
        sys.stderr.write(f"measuring {LABELS[mode]}…\n")
        results[mode] = run_child(mode, audience, cache_file)
        sys.stderr.write(f"  {json.dumps(results[mode], default=str)}\n")
    command = "python -m bench.policy_phones" + (
        f" --rows {args.rows}" if args.rows != DEFAULT_ROWS else ""
    )
    text = report(results, args.rows, command, load)
    sys.stdout.write(text)
    RESULTS.write_text("# Benchmark results: policy phones\n\n" + text)
    refresh_index()
    return 0


if __name__ == "__main__":
    sys.exit(main())
