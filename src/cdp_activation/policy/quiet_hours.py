"""Quiet hours in the recipient's own time zone: such recipients are deferred, not dropped.

`now` is one instant for the whole run, so the answer depends only on the time zone: it is
computed once per distinct zone with `zoneinfo` (which knows every DST rule) and joined back.
The zone is the customer's own when it is a valid IANA name, else their country's main zone,
else UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl
import pytz

from cdp_activation.specs import QuietHoursSpec


@cache
def valid_zone(name: str | None) -> str | None:
    if not name:
        return None
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None
    return name


@cache
def country_zone(country: str | None) -> str | None:
    """The country's most populous zone (first in the tz database's list for it)."""
    zones = pytz.country_timezones.get((country or "").upper())
    return zones[0] if zones else None


def resolve_zone(timezone: str | None, country: str | None) -> str:
    return valid_zone(timezone) or country_zone(country) or "UTC"


def _parse(hhmm: str) -> time:
    hours, minutes = hhmm.split(":")
    return time(int(hours), int(minutes))


def _local_to_utc(day: datetime, at: time, zone: ZoneInfo, after: datetime) -> datetime:
    """The first UTC instant after `after` at which the wall clock in `zone` shows `at` on `day`.

    Usually that is simply `at`. On a fall-back day a wall time happens twice: the first one
    after `after` counts. On a spring-forward day a wall time inside the gap never shows: the
    answer is the instant the clock jumps past it.
    """
    local = datetime.combine(day.date(), at, tzinfo=zone)
    first, second = local.astimezone(UTC), local.replace(fold=1).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == local.replace(tzinfo=None):
        if first != second and first <= after:
            return second  # the repeated hour: the earlier reading has already passed
        return first
    # Inside a gap: walk from the earlier reading minute by minute to the jump (gaps < 3 h).
    candidate = second
    while candidate.astimezone(zone).time() < at:
        candidate += timedelta(minutes=1)
    return candidate.replace(second=0, microsecond=0)


def quiet_until(zone_name: str, now: datetime, spec: QuietHoursSpec) -> datetime | None:
    """When quiet hours end for someone in `zone_name`, or None if it is not quiet there now."""
    if not spec.enabled:
        return None
    zone = ZoneInfo(zone_name)
    local = now.astimezone(zone)
    start, end = _parse(spec.start), _parse(spec.end)
    clock = local.time().replace(tzinfo=None)
    if start < end:  # e.g. 13:00-14:00 within one day
        quiet = start <= clock < end
        end_day = local
    else:  # wraps midnight, e.g. 21:00-09:00
        quiet = clock >= start or clock < end
        end_day = local + timedelta(days=1) if clock >= start else local
    if not quiet:
        return None
    return _local_to_utc(end_day, end, zone, after=now)


def not_before(frame: pl.DataFrame, now: datetime, spec: QuietHoursSpec) -> pl.DataFrame:
    """Add `zone` and `not_before` (UTC, null when the recipient may be messaged now)."""
    timezone = (
        frame["timezone"] if "timezone" in frame.columns else pl.Series([None] * frame.height)
    )
    pairs = pl.DataFrame(
        {"timezone": timezone.cast(pl.String), "country": frame["country"].cast(pl.String)}
    )
    distinct = pairs.unique()
    zones = [resolve_zone(t, c) for t, c in distinct.iter_rows()]
    until = {zone: quiet_until(zone, now, spec) for zone in set(zones)}
    lookup = distinct.with_columns(
        pl.Series("zone", zones, dtype=pl.String),
        pl.Series("not_before", [until[z] for z in zones], dtype=pl.Datetime("us", "UTC")),
    )
    joined = (
        pairs.with_row_index("_i")
        .join(lookup, on=["timezone", "country"], how="left", nulls_equal=True)
        .sort("_i")
    )
    return frame.with_columns(joined["zone"], joined["not_before"])
