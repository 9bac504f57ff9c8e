"""What a partition key means: a day (`2026-12-05`) or, for an event-driven activation, a
window of a few minutes (`2026-12-05T10:15`, the window's start in UTC).

One definition for the Dagster partitions, the audience's bound times and the CLI's default,
so a key means the same everywhere.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

WINDOW_FORMAT = "%Y-%m-%dT%H:%M"  # Dagster's `fmt` for the window partitions, and ours
FRAMEWORK_PARAMETERS = frozenset({"as_of", "partition_date", "window_start", "window_end"})


def window_cron(minutes: int) -> str:
    """The cron of windows of `minutes` (a divisor of 60): every 15 minutes is `*/15 * * * *`."""
    return "0 * * * *" if minutes == 60 else f"*/{minutes} * * * *"


def window_start(moment: datetime, minutes: int) -> datetime:
    """The start (UTC) of the window of `minutes` holding `moment`."""
    moment = moment.astimezone(UTC)
    return moment.replace(minute=moment.minute - moment.minute % minutes, second=0, microsecond=0)


def window_key(moment: datetime, minutes: int) -> str:
    """The partition key of the window holding `moment`."""
    return window_start(moment, minutes).strftime(WINDOW_FORMAT)


def bounds(partition_key: str, window_minutes: int | None = None) -> tuple[datetime, datetime]:
    """[start, end) of a partition in UTC: a day, or a window of `window_minutes`."""
    if window_minutes is None:
        day = date.fromisoformat(partition_key)
        start = datetime.combine(day, time.min, tzinfo=UTC)
        return start, start + timedelta(days=1)
    try:
        start = datetime.strptime(partition_key, WINDOW_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(
            f"partition {partition_key!r} is not a window start like 2026-12-05T10:15"
        ) from None
    if start != window_start(start, window_minutes):
        raise ValueError(
            f"partition {partition_key!r} does not start a {window_minutes}-minute window"
        )
    return start, start + timedelta(minutes=window_minutes)


def bound_parameters(
    partition_key: str, window_minutes: int | None = None, now: datetime | None = None
) -> dict[str, object]:
    """What the framework binds in an audience's SQL for a partition: `partition_date`,
    `as_of` (the partition's end, or now while it is still open) and, for a window,
    `window_start` and `window_end`."""
    start, end = bounds(partition_key, window_minutes)
    bound: dict[str, object] = {
        "partition_date": start.date(),
        "as_of": min(end, now or datetime.now(UTC)),
    }
    if window_minutes is not None:
        bound["window_start"], bound["window_end"] = start, end
    return bound


def windows_between(first: datetime, last: datetime, minutes: int) -> list[str]:
    """Keys of every window from the one holding `first` to the one holding `last`."""
    keys = []
    at = window_start(first, minutes)
    while at <= last:
        keys.append(at.strftime(WINDOW_FORMAT))
        at += timedelta(minutes=minutes)
    return keys
