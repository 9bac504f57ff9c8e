"""Phone formats: the same numbers written three ways, through `phone_codes`, cold and warm.

`python -m bench phone_formats [--numbers N] [--baseline-sample N]` from the repository root.
The numbers are the benchmark audience's (`bench.policy`'s, from the 10,000,000-customer demo
warehouse) that are in E.164 form, the first N of them, written:

- compact, as stored ("+447400123456"): the fast path's own form, the floor;
- with separators, as CRMs and suppression lists often keep them ("+44 7400 123456": the
  calling code, then groups of three digits);
- the same, through phonenumbers one distinct (raw, country) pair at a time, on every core
  (`phone_parsing.classify_all`): what the code did with them before they were judged as
  their compact form. Timed on `--baseline-sample` pairs and scaled to N (said so).

Each is timed in one fresh process per measurement with an empty phone cache (cold: what a
first run pays) and then again with the cache it filled (warm: every later run); wall and
CPU (this process and its helpers) per number, and the phonenumbers calls made. Figures go
to bench/results_phone_formats.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.delivery import _cpu_model
from bench.index import publish

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results_phone_formats.md"
AUDIENCE_ROWS = 10_000_000
FORMATS = ("compact", "separated")


def numbers(count: int, written: str) -> Any:
    """(phone, country) of the first `count` E.164 numbers of the benchmark audience."""
    import polars as pl

    from bench.policy import audience_file

    frame = (
        pl.scan_parquet(audience_file(AUDIENCE_ROWS))
        .select("phone", "country")
        .filter(pl.col("phone").str.contains(r"^\+[1-9][0-9]{6,14}$"))
        .head(count)
        .collect()
    )
    if written == "separated":
        phone = pl.col("phone")
        # "+CC" then groups of three digits (a 1-, 2- or 3-digit code read as 2: close enough
        # for a format; the digits are the number's own, in order).
        grouped = (
            phone.str.slice(0, 3) + " " + phone.str.slice(3).str.replace_all(r"(\d{3})", "$1 ")
        )
        frame = frame.with_columns(grouped.str.strip_chars().alias("phone"))
    return frame


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    helpers = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + helpers.ru_utime + helpers.ru_stime


def child(written: str, count: int, sample: int) -> dict[str, Any]:
    from cdp_activation import phone_parsing
    from cdp_activation.policy import phones
    from cdp_activation.policy.phone_cache import PhoneCache

    frame = numbers(count, "separated" if written == "phonenumbers" else written)
    result: dict[str, Any] = {"written": written, "numbers": frame.height}
    if written == "phonenumbers":
        pairs = list(dict.fromkeys(frame.head(sample).iter_rows()))
        wall, cpu = time.perf_counter(), _cpu()
        phone_parsing.classify_all(pairs)
        scale = frame.height / len(pairs)
        result |= {
            "cold_wall": (time.perf_counter() - wall) * scale,
            "cold_cpu": (_cpu() - cpu) * scale,
            "cold_calls": frame.height,
            "sample": len(pairs),
        }
        return result
    with tempfile.TemporaryDirectory() as tmp:
        cache = PhoneCache(f"sqlite:///{tmp}/cache.sqlite", key=b"bench-phone-formats")
        for run in ("cold", "warm"):
            calls, wall, cpu = phones.phonenumbers_calls(), time.perf_counter(), _cpu()
            codes = phones.phone_codes(frame["phone"], frame["country"], cache=cache)
            result[f"{run}_wall"] = time.perf_counter() - wall
            result[f"{run}_cpu"] = _cpu() - cpu
            result[f"{run}_calls"] = phones.phonenumbers_calls() - calls
            result[f"{run}_valid"] = int((codes["code"] < phones.INVALID_CODE).sum())
        cache.dispose()
    return result


def measure(written: str, count: int, sample: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench", "phone_formats", "_child", written]
    command += [str(count), str(sample)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def report(rows: list[dict[str, Any]], argv: list[str]) -> str:
    floor = rows[0]
    lines = [
        "| written | numbers | cold wall | cold CPU a number | cold phonenumbers calls "
        "| warm wall | warm CPU a number | cold wall ÷ compact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "compact": "compact E.164 (`+447400123456`)",
        "separated": "with separators (`+44 740 012 345 6`), this code",
        "phonenumbers": "with separators, through phonenumbers a pair at a time",
    }
    for row in rows:
        n = row["numbers"]
        warm_wall = f"{row['warm_wall']:.2f} s" if "warm_wall" in row else ""
        warm_cpu = f"{1e6 * row['warm_cpu'] / n:.2f} µs" if "warm_cpu" in row else ""
        lines.append(
            f"| {labels[row['written']]} | {n:,} | {row['cold_wall']:.2f} s "
            f"| {1e6 * row['cold_cpu'] / n:.2f} µs | {row['cold_calls']:,} "
            f"| {warm_wall} | {warm_cpu} | {row['cold_wall'] / floor['cold_wall']:.1f}x |"
        )
    sampled = next((r for r in rows if r["written"] == "phonenumbers"), None)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    command = ("python -m bench phone_formats " + " ".join(argv)).strip()
    notes = [
        "The phonenumbers row is what a cold run paid for these numbers before they were "
        "judged as their compact form: parse() on each distinct (number, country), on every "
        f"core; timed on {sampled['sample']:,} pairs and scaled to {sampled['numbers']:,}."
        if sampled
        else "",
        "Both this code's rows give the same answers (tests/test_phones.py proves the "
        "separated form against phonenumbers); warm runs read nothing from the cache for "
        "numbers judged in polars.",
    ]
    return "\n".join(
        [
            "# Phone formats: E.164 with and without separators",
            "",
            f"Measured {now} UTC with `{command}` on {os.cpu_count()} CPUs ({_cpu_model()}), "
            f"Python {sys.version.split()[0]}; each row a fresh process, an empty SQLite phone "
            "cache for the cold run, the same cache for the warm one. CPU counts phonenumbers' "
            "helper processes too.",
            "",
            *lines,
            "",
            *(n for n in notes if n),
            "",
        ]
    )


def main(argv: list[str]) -> int:
    if argv and argv[0] == "_child":
        print(json.dumps(child(argv[1], int(argv[2]), int(argv[3]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench phone_formats")
    parser.add_argument("--numbers", type=int, default=1_000_000)
    parser.add_argument("--baseline-sample", type=int, default=100_000)
    args = parser.parse_args(argv)
    rows = [measure(w, args.numbers, args.baseline_sample) for w in (*FORMATS, "phonenumbers")]
    publish(RESULTS, report(rows, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
