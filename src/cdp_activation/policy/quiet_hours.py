"""Quiet hours in the recipient's own time zone: such recipients are deferred, not dropped.

`now` is one instant for the whole run, so the answer depends only on the time zone: it is
computed once per distinct zone with `zoneinfo` (which knows every DST rule) and joined back.
The zone is the customer's own when it is a valid IANA name, else their country's main zone,
else UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl
import pytz

from cdp_activation.policy.codes import enum_from_codes, map_strings
from cdp_activation.spec import QuietHoursSpec


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


def next_quiet(
    zone_name: str, after: datetime, spec: QuietHoursSpec
) -> tuple[datetime, datetime] | tuple[None, None]:
    """The first quiet hours in `zone_name` that begin after `after` (not quiet then): when
    they begin and when they end, in UTC. A message decided at `after` may go until the
    first, and waits for the second once it has passed (`ZoneTable.send_until`). A day whose
    quiet hours fall wholly in a clock change's gap has none: the next day's count."""
    zone = ZoneInfo(zone_name)
    local = after.astimezone(zone)
    start = _parse(spec.start)
    for days in range(8):
        begins = _local_to_utc(local + timedelta(days=days), start, zone, after=after)
        if begins <= after:
            continue
        ends = quiet_until(zone_name, begins, spec)
        if ends is not None:
            return begins, ends
    return None, None  # no quiet hours in a week: none to keep


@dataclass(frozen=True)
class ZoneTable:
    """Each recipient's zone and the end of its quiet hours, decided once per distinct value.

    `position()` gives each row an index into `zones` (its `timezone` when a valid IANA name,
    else its country's zone, else UTC); `name` and `not_before` turn an index into the zone
    (an enum) and the UTC end of its quiet hours now (null when not quiet); `send_until` and
    `reopens_at` into when the next quiet hours begin after the message may go (now, or at
    `not_before`) and when they end (null without quiet hours).
    """

    zones: tuple[str, ...]
    countries: tuple[str, ...]  # the distinct countries of the frame, as written there
    until: pl.Series
    by_timezone: dict[str, int]
    by_country: dict[str, int]
    closes: pl.Series
    reopens: pl.Series

    @classmethod
    def of(cls, frame: pl.DataFrame, now: datetime, spec: QuietHoursSpec) -> ZoneTable:
        countries = frame["country"].cast(pl.String).drop_nulls().unique().to_list()
        timezones = []
        if "timezone" in frame.columns:
            timezones = frame["timezone"].cast(pl.String).drop_nulls().unique().to_list()
        own = {t: zone for t in timezones if (zone := valid_zone(t))}
        national = {c: zone for c in countries if (zone := country_zone(c))}
        zones = tuple(sorted({*own.values(), *national.values(), "UTC"}))
        index = {zone: i for i, zone in enumerate(zones)}
        until = [quiet_until(zone, now, spec) for zone in zones]
        windows: list[tuple[datetime, datetime] | tuple[None, None]] = [
            next_quiet(zone, opens or now, spec) if spec.enabled else (None, None)
            for zone, opens in zip(zones, until, strict=True)
        ]
        utc = pl.Datetime("us", "UTC")
        return cls(
            zones=zones,
            countries=tuple(countries),
            until=pl.Series(until, dtype=utc),
            by_timezone={t: index[z] for t, z in own.items()},
            by_country={c: index[z] for c, z in national.items()},
            closes=pl.Series([w[0] for w in windows], dtype=utc),
            reopens=pl.Series([w[1] for w in windows], dtype=utc),
        )

    def position(self) -> pl.Expr:
        utc = pl.lit(self.zones.index("UTC"), dtype=pl.UInt32)
        own = map_strings(pl.col("timezone"), self.by_timezone) if self.by_timezone else None
        national = map_strings(pl.col("country"), self.by_country)
        return pl.coalesce([e for e in (own, national) if e is not None] + [utc])

    def name(self, position: pl.Expr) -> pl.Expr:
        return enum_from_codes(position, self.zones)

    def not_before(self, position: pl.Expr) -> pl.Expr:
        return pl.lit(self.until).gather(position)

    def send_until(self, position: pl.Expr) -> pl.Expr:
        return pl.lit(self.closes).gather(position)

    def reopens_at(self, position: pl.Expr) -> pl.Expr:
        return pl.lit(self.reopens).gather(position)
