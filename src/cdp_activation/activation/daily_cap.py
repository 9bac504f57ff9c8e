"""One message a day across activations: with `CDP_DAILY_CAP` = N, a customer gets at most
N messages per channel and day from the activations that declare a `priority`, and those
from the highest priorities (equal priorities: the first name in alphabetical order).

The outcome must not depend on which activation runs first, so an activation does not wait
to see what a higher one sends: when it decides a day, it asks, for each activation that
outranks it, whom that one takes that day —

- the ledger's answer once that activation has run the day (its first messages planned,
  sent or being sent: `decision_counts` says it ran, written only once its plan is);
- otherwise that activation's own decisions for the day, worked out here as its run would
  (its audience SQL, its policy, the caps above it in turn), with its templates taken as
  approved (their catalogs are its connectors' to read).

and leaves those customers that channel (`<channel>_daily_cap`). Messages lower activations
already sent that day count too: a message sent cannot be taken back. A lower activation that
decided before the warehouse changed may still hold a customer a higher one now wants; the
higher one then sees the day's slot used (its reason says so) rather than sending twice.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import polars as pl
import yaml

from cdp_activation.ledger import (
    IN_FLIGHT,
    INITIAL_STEP,
    PLANNED,
    SENT,
    UNKNOWN,
    Ledger,
)
from cdp_activation.spec import ActivationSpec

# Where the project's activations are declared (the Dagster code location's folder).
ACTIVATIONS = Path(__file__).resolve().parents[1] / "defs" / "activations"
CLAIMS = pl.DataFrame(
    schema={
        "customer_id": pl.String,
        "channel": pl.String,
        "purpose": pl.String,
        "pending": pl.Boolean,
    }
)
# A higher activation's row holds the slot while it may still be, or has been, sent.
_HOLDING = (PLANNED, IN_FLIGHT, SENT, UNKNOWN)
_USED = (IN_FLIGHT, SENT, UNKNOWN)


def participants() -> dict[str, ActivationSpec]:
    """Every daily activation of the project that declares a priority, by name."""
    found = {}
    for path in sorted(ACTIVATIONS.glob("*/defs.yaml")):
        attributes = (yaml.safe_load(path.read_text()) or {}).get("attributes") or {}
        if attributes.get("priority") is None or attributes.get("events"):
            continue
        found[path.parent.name] = ActivationSpec.model_validate(attributes)
    return found


def outranks(name: str, spec: ActivationSpec, other: str, other_spec: ActivationSpec) -> bool:
    """Whether `name` comes before `other` for the day's messages."""
    mine, theirs = spec.priority or 0, other_spec.priority or 0
    return mine > theirs or (mine == theirs and name < other)


def day_of(partition_key: str) -> str:
    return partition_key[:10]


def daily_claims(
    name: str,
    spec: ActivationSpec,
    partition_key: str,
    ledger: Ledger,
    decide_other: Callable[[str, ActivationSpec, str], pl.DataFrame],
) -> pl.DataFrame:
    """The day's messages already taken from `name`, one row each: customer_id, channel,
    purpose, and `pending` (not sent yet). By the activations that outrank it (the ledger's
    rows once they ran the day, else `decide_other(name, spec, day)`: their chosen customers
    and channels), and by the others' messages already on their way or sent."""
    day = day_of(partition_key)
    frames = [CLAIMS]
    for other, other_spec in participants().items():
        if other == name:
            continue
        purpose = other_spec.channel_plan.purpose
        higher = outranks(other, other_spec, name, spec)
        if higher and not _ran(ledger, other, day):
            chosen = decide_other(other, other_spec, day)
            frames.append(
                chosen.select(
                    pl.col("customer_id").cast(pl.String),
                    pl.col("channel").cast(pl.String),
                    pl.lit(purpose).alias("purpose"),
                    pl.lit(True).alias("pending"),
                )
            )
            continue
        rows = _rows(ledger, other, day, _HOLDING if higher else _USED)
        frames.append(
            rows.select(
                "customer_id",
                "channel",
                pl.lit(purpose).alias("purpose"),
                (pl.col("state") != SENT).alias("pending"),
            )
        )
    return pl.concat(frames, how="vertical")


def taken_per_channel(claims: pl.DataFrame) -> pl.DataFrame:
    """(customer_id, channel, messages): the day's messages taken, counted."""
    return claims.group_by("customer_id", "channel").agg(pl.len().alias("messages"))


def as_recent_sends(claims: pl.DataFrame, now: datetime) -> pl.DataFrame:
    """The claims not sent yet, as sends at `now` for the frequency caps: a message a higher
    activation will send counts as if sent, so a cap across channels gives the same outcome
    whichever activation runs first (its sent ones are in the ledger's recent sends already)."""
    return claims.filter("pending").select(
        "customer_id",
        "channel",
        "purpose",
        pl.lit(now, dtype=pl.Datetime("us", "UTC")).alias("sent_at"),
    )


def _ran(ledger: Ledger, activation: str, day: str) -> bool:
    with ledger.engine.connect() as con:
        found = con.exec_driver_sql(
            f"SELECT 1 FROM decision_counts WHERE activation = {ledger._mark} "
            f"AND partition_key = {ledger._mark} AND step = {ledger._mark} LIMIT 1",
            (activation, day, INITIAL_STEP),
        ).first()
    return found is not None


def _rows(ledger: Ledger, activation: str, day: str, states: tuple[str, ...]) -> pl.DataFrame:
    marks = ", ".join([ledger._mark] * len(states))
    with ledger.engine.connect() as con:
        rows = con.exec_driver_sql(
            f"SELECT customer_id, channel, state FROM sends WHERE activation = {ledger._mark} "
            f"AND partition_key = {ledger._mark} AND state IN ({marks})",
            (activation, day, *states),
        ).all()
    return pl.DataFrame(
        [tuple(r) for r in rows],
        schema={"customer_id": pl.String, "channel": pl.String, "state": pl.String},
        orient="row",
    )
