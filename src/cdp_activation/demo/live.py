"""A live event stream for the demo warehouse: abandoned carts arriving as they happen.

`cdp-activation demo --live` appends `cart_events` rows every couple of seconds, as a
streaming loader would, so the `abandoned_cart` activation's sensor has something to react to.
It runs in a process of its own (`python -m cdp_activation.demo.live`, one JSON line per batch
on stdout), like a real loader: each write opens the DuckDB file for the milliseconds of one
insert, and DuckDB lets one process write or several read, so the warehouse's readers (the
sensor, the audience) wait for it, and it for them.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa

from cdp_activation.audience.warehouse import connect_duckdb

ITEMS = ("running shoes", "rain jacket", "espresso machine", "headphones", "backpack", "yoga mat")


@dataclass(frozen=True)
class CartEvent:
    event_id: str
    customer_id: int
    event_type: str
    occurred_at: datetime
    loaded_at: datetime  # when the row was written: what the sensor watches


def append_cart_events(
    path: Path,
    count: int,
    rng: random.Random,
    *,
    checkout_share: float = 0.2,
    customers: list[int] | None = None,
    loader_delay: float = 20.0,
) -> list[CartEvent]:
    """Append `count` abandoned carts of random customers (occurred up to `loader_delay`
    seconds ago, loaded now), a checkout right away for about `checkout_share` of them."""
    if count <= 0:
        return []
    con = connect_duckdb(path, read_only=False)
    try:
        ids = customers or [
            int(row[0])
            for row in con.execute(
                f"SELECT customer_id FROM customers USING SAMPLE {int(count)} ROWS"
            ).fetchall()
        ]
        now = datetime.now(UTC)
        rows: list[CartEvent] = []
        for customer in rng.sample(ids, min(count, len(ids))):
            rows.append(
                CartEvent(
                    f"live-{uuid.uuid4().hex}",
                    customer,
                    "cart_abandoned",
                    now - timedelta(seconds=rng.uniform(0, loader_delay)),
                    now,
                )
            )
            if rng.random() < checkout_share:  # came back at once: no reminder is due
                rows.append(
                    CartEvent(f"live-{uuid.uuid4().hex}", customer, "checkout_completed", now, now)
                )
        table = pa.table(
            {
                "event_id": [r.event_id for r in rows],
                "customer_id": pa.array([r.customer_id for r in rows], pa.int64()),
                "cart_id": [f"cart-live-{r.customer_id}" for r in rows],
                "event_type": [r.event_type for r in rows],
                "item_name": [rng.choice(ITEMS) for _ in rows],
                "cart_value": [round(rng.uniform(19, 199), 2) for _ in rows],
                "occurred_at": pa.array([r.occurred_at for r in rows], pa.timestamp("us", "UTC")),
                "loaded_at": pa.array([r.loaded_at for r in rows], pa.timestamp("us", "UTC")),
            }
        )
        con.register("new_events", table)
        con.execute(
            "INSERT INTO cart_events SELECT event_id, customer_id, cart_id, event_type, "
            "item_name, CAST(cart_value AS DECIMAL(10, 2)), occurred_at, loaded_at "
            "FROM new_events"
        )
    finally:
        con.close()
    return rows


def stream_cart_events(
    path: Path,
    per_minute: float,
    *,
    seconds: float | None = None,
    every: float = 2.0,
    seed: int | None = None,
    on_batch: Callable[[list[CartEvent]], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Append about `per_minute` abandoned carts a minute, a batch every `every` seconds,
    for `seconds` (None: until `stop()`); returns how many carts were abandoned."""
    rng = random.Random(seed)
    started = time.monotonic()
    owed = 0.0
    abandoned = 0
    while not stop() and (seconds is None or time.monotonic() - started < seconds):
        owed += per_minute * every / 60
        count = int(owed)
        owed -= count
        batch = append_cart_events(path, count, rng)
        abandoned += sum(1 for e in batch if e.event_type == "cart_abandoned")
        if on_batch is not None and batch:
            on_batch(batch)
        time.sleep(every)
    return abandoned


def main(argv: list[str]) -> int:
    """`python -m cdp_activation.demo.live PATH PER_MINUTE [SECONDS]`: stream, one JSON line
    per batch (`{"abandoned": n, "checked_out": m}`), until SECONDS pass or it is stopped."""
    import json
    import signal

    path, per_minute = Path(argv[0]), float(argv[1])
    seconds = float(argv[2]) if len(argv) > 2 else None
    stopping = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))

    def report(batch: list[CartEvent]) -> None:
        carts = sum(1 for e in batch if e.event_type == "cart_abandoned")
        sys.stdout.write(json.dumps({"abandoned": carts, "checked_out": len(batch) - carts}) + "\n")
        sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):
        stream_cart_events(
            path, per_minute, seconds=seconds, on_batch=report, stop=lambda: stopping["now"]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
