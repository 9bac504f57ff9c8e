"""A rate limit shared by every worker: Redis (what the project uses) against PostgreSQL.

`python -m bench limiter [--admissions N] [--concurrency C]` from the repository root, with
Redis at BENCH_REDIS_URL (default redis://127.0.0.1:6379/0) and PostgreSQL at
BENCH_POSTGRES_URL / TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test).

What a shared limiter costs each message, measured with the rate set far above what is
asked (so nobody waits and only the limiter's own work is timed), C coroutines in one
process asking at once:

- Redis: `rate_limits.SharedLimiter.acquire`, the project's limiter (the `limits` library's
  moving window: one Lua script round trip per admission);
- PostgreSQL: a token bucket in one row, one `UPDATE … RETURNING` per admission in its own
  transaction (C psycopg connections): refill by the time since the last
  admission, take one token if there is one. The row lock serialises every admission of a
  sender, which is the point of the comparison.

Figures go to bench/results_limiter.md (and bench/results.md's index).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from bench.delivery import ROOT, _cpu_model
from bench.index import publish

RESULTS = ROOT / "bench" / "results_limiter.md"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(acquire: Any, admissions: int, concurrency: int) -> tuple[float, float]:
    """Wall seconds and CPU seconds of `admissions` acquisitions by `concurrency` tasks."""
    left = admissions

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await acquire()

    cpu = _cpu()
    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - began, _cpu() - cpu


async def redis_run(admissions: int, concurrency: int) -> tuple[float, float]:
    from cdp_activation.delivery.rate_limits import SharedLimiter

    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    limiter = SharedLimiter(url, f"bench-{uuid.uuid4().hex[:8]}", rate=10_000_000)
    await limiter.acquire()  # connected
    return await _drive(limiter.acquire, admissions, concurrency)


async def postgres_run(admissions: int, concurrency: int) -> tuple[float, float]:
    import psycopg

    url = (
        os.environ.get("BENCH_POSTGRES_URL")
        or os.environ.get("TEST_POSTGRES_URL")
        or "postgresql://postgres@127.0.0.1:5432/test"
    )
    table = f"bench_bucket_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute(
            f"CREATE TABLE {table} (sender text PRIMARY KEY, tokens double precision, "
            "rate double precision, cap double precision, at double precision)"
        )
        await admin.execute(
            f"INSERT INTO {table} VALUES ('s', 1e7, 1e7, 1e7, extract(epoch from now()))"
        )
    take = (
        f"UPDATE {table} SET "
        "tokens = LEAST(cap, tokens + (extract(epoch from clock_timestamp()) - at) * rate) - 1, "
        "at = extract(epoch from clock_timestamp()) "
        "WHERE sender = 's' AND "
        "LEAST(cap, tokens + (extract(epoch from clock_timestamp()) - at) * rate) >= 1 "
        "RETURNING tokens"
    )
    connections = [
        await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(concurrency)
    ]
    idle: asyncio.Queue[Any] = asyncio.Queue()
    for connection in connections:
        idle.put_nowait(connection)

    async def acquire() -> None:
        con = await idle.get()
        try:
            row = await (await con.execute(take)).fetchone()
            assert row is not None  # the rate is far above what is asked
        finally:
            idle.put_nowait(con)

    try:
        return await _drive(acquire, admissions, concurrency)
    finally:
        for connection in connections:
            await connection.close()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
            await admin.execute(f"DROP TABLE {table}")


def report(rows: list[dict[str, Any]], command: str) -> str:
    now = datetime.now(UTC)
    redis = {r["concurrency"]: r for r in rows if r["store"] == "Redis"}
    lines = [
        "# A shared rate limit: Redis against PostgreSQL",
        "",
        f"Measured {now:%Y-%m-%d %H:%M} UTC with `{command}` on {os.cpu_count()} CPUs "
        f"({_cpu_model()}), Python {sys.version.split()[0]}; Redis and PostgreSQL on the same "
        "machine. The rate is set far above what is asked, so only the limiter's own work is "
        "timed: what every message pays for a limit shared across workers.",
        "",
        "| store | admissions | concurrent | admissions/s | ÷ Redis | µs per admission "
        "(wall) | client CPU per admission |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['store']} | {r['admissions']:,} | {r['concurrency']} | {r['rate']:,.0f} | "
            f"{r['rate'] / redis[r['concurrency']]['rate']:.2f} | "
            f"{1e6 * r['wall'] / r['admissions']:.0f} | "
            f"{1e6 * r['cpu'] / r['admissions']:.0f} µs |"
        )
    top = max(redis)
    pg = next(r for r in rows if r["store"] == "PostgreSQL" and r["concurrency"] == top)
    lines += [
        "",
        f"With {top} asking at once, PostgreSQL admits {pg['rate']:,.0f}/s against Redis's "
        f"{redis[top]['rate']:,.0f}/s ({pg['rate'] / redis[top]['rate']:.2f} times), and every "
        "admission is a transaction on one row that all of a sender's workers queue on, on the "
        "server that also takes every claim and settle of the ledger. Redis keeps that load "
        "off the ledger's database, with a store built for counters and expiring keys (the "
        "shared Retry-After pause is one): that, and these figures, are why the project's "
        "shared limiter (`CDP_RATE_LIMIT_URL`) is Redis.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench limiter")
    parser.add_argument("--admissions", type=int, default=20_000)
    parser.add_argument("--concurrency", default="1,32")
    args = parser.parse_args(argv)
    rows = []
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        for store, run in (("Redis", redis_run), ("PostgreSQL", postgres_run)):
            wall, cpu = asyncio.run(run(args.admissions, concurrency))
            row = {
                "store": store,
                "admissions": args.admissions,
                "concurrency": concurrency,
                "wall": wall,
                "cpu": cpu,
                "rate": args.admissions / wall,
            }
            print(row, file=sys.stderr)
            rows.append(row)
    text = report(rows, ("python -m bench limiter " + " ".join(argv)).strip())
    publish(RESULTS, text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
