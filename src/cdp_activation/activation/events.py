"""Event-driven activations: which window partitions new events call for.

An activation with an `events` block (`spec.EventsSpec`) is partitioned in windows of a few
minutes. Its sensor asks the warehouse, through the activation's events SQL, what was loaded
since the last load time it saw (its cursor), and runs every window from the earliest new
event's to the current one, never older than `max_event_age`. A window runs again whenever
more of its events arrive; the ledger's key (activation, window, customer, step) makes each
customer of a window messaged once however often it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from cdp_activation.audience.sql import AudienceQuery
from cdp_activation.audience.warehouse import Warehouse
from cdp_activation.errors import CdpError
from cdp_activation.partitions import windows_between
from cdp_activation.spec import EventsSpec

COLUMNS = ("first_event_at", "last_event_at", "loaded_until")


class EventsSQLError(CdpError, ValueError):
    """The events SQL's answer is not the one row of two times it must be."""


@dataclass(frozen=True)
class NewEvents:
    """What arrived since the cursor: the earliest and latest event times, the latest load."""

    first_event_at: datetime
    last_event_at: datetime
    loaded_until: datetime


def new_events(query: AudienceQuery, warehouse: Warehouse, since: datetime) -> NewEvents | None:
    """Run the events SQL for rows loaded after `since`; None when nothing new arrived."""
    return read_new_events(warehouse.query(query, {"since": since}), str(query.path))


def read_new_events(frame: pl.DataFrame, where: str) -> NewEvents | None:
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing or frame.height != 1:
        raise EventsSQLError(
            f"{where}: must return exactly one row with columns {', '.join(COLUMNS)} (the "
            f"earliest and latest event times and the latest load time of the events loaded "
            f"after :since); got "
            f"{frame.height} row(s) with columns {', '.join(frame.columns) or 'none'}"
        )
    values = [frame[c][0] for c in COLUMNS]
    if any(value is None for value in values):
        return None
    for column, value in zip(COLUMNS, values, strict=True):
        if not isinstance(value, datetime):
            raise EventsSQLError(
                f"{where}: {column} must be a timestamp, got {type(value).__name__} {value!r}"
            )
    first, last, loaded = (_utc(v) for v in values)
    return NewEvents(first, last, loaded)


def windows_to_run(found: NewEvents, now: datetime, events: EventsSpec) -> list[str]:
    """The window partitions to run for `found`: from the earliest new event's window to the
    latest one's, leaving out events older than `max_event_age` (and any from the future)."""
    first = max(found.first_event_at, now - events.event_age())
    last = min(found.last_event_at, now)
    return windows_between(first, last, events.window_minutes) if first <= last else []


def _utc(value: datetime) -> datetime:
    """A naive time from the warehouse is UTC (sessions run in UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class Tick:
    """One look at the events: the windows to run, the new cursor and, when there is nothing
    to run, why."""

    windows: list[str]
    cursor: str | None
    skip: str | None = None


def tick(
    query: AudienceQuery,
    warehouse: Warehouse,
    spec: EventsSpec,
    cursor: str | None,
    now: datetime | None = None,
) -> Tick:
    """What the `<name>_events` sensor does each time: new events since the cursor (the latest
    load time seen; none yet: the last `max_event_age`), the windows they call for, and the
    cursor to keep (unchanged when nothing arrived, so nothing is missed)."""
    now = now or datetime.now(UTC)
    since = datetime.fromisoformat(cursor) if cursor else now - spec.event_age()
    found = new_events(query, warehouse, since)
    if found is None:
        return Tick([], cursor, f"no event loaded since {since.isoformat(timespec='seconds')}")
    windows = windows_to_run(found, now, spec)
    skip = None if windows else f"the new events are older than {spec.max_event_age}"
    return Tick(windows, found.loaded_until.isoformat(), skip)
