"""What every part of the ledger shares: the engine, the dialect's placeholders and clock,
and the time helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import tenacity

from cdp_activation.db import open_engine, sqlite_locked
from cdp_activation.ledger.schema import (
    _MIGRATED,
    WORKER_ALIVE,
    LedgerUnavailable,
    _has_sends,
    delivery_workers,
    migrate,
    sends,
)
from cdp_activation.processes import process_gone


def driver_rows(con: sa.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    """`sql`'s rows, run on the driver's own cursor in `con`'s transaction: a claim runs a
    statement or two per request, and SQLAlchemy's result set-up (~25 µs a statement) would
    cost more than SQLite's own work. Errors as `driver_cursor` raises them."""
    with driver_cursor(con, sql, params) as cursor:
        return list(cursor.fetchall())


def driver_slices(
    con: sa.Connection, sql: str, params: Sequence[Any], size: int
) -> Iterator[list[Any]]:
    """`sql`'s rows `size` at a time, as `driver_rows` reads them: one scan, never every row
    at once in Python."""
    with driver_cursor(con, sql, params) as cursor:
        while rows := cursor.fetchmany(size):
            yield list(rows)


@contextlib.contextmanager
def driver_cursor(con: sa.Connection, sql: str, params: Sequence[Any]) -> Iterator[Any]:
    """The driver's own cursor in `con`'s transaction, `sql` executed on it. A driver error
    (executing or fetching) is raised as SQLAlchemy would raise it (`sa.exc.OperationalError`
    for a lock timeout, which callers retry on), and a connection the database dropped is
    invalidated, not handed back to the pool."""
    dbapi_error = con.dialect.loaded_dbapi.Error
    cursor = con.connection.cursor()
    try:
        cursor.execute(sql, params)
        yield cursor
    except dbapi_error as err:
        if con.dialect.is_disconnect(err, con.connection.dbapi_connection, cursor):
            con.invalidate(err)
        raise sa.exc.DBAPIError.instance(sql, params, err, dbapi_error) from err
    finally:
        with contextlib.suppress(Exception):  # a dropped connection's cursor may not close
            cursor.close()


def utc_now() -> datetime:
    return datetime.now(UTC)


def of_step(step: str | None) -> tuple[sa.ColumnElement[bool], ...]:
    """The WHERE condition keeping one step's rows (none when `step` is None)."""
    return () if step is None else (sends.c.step == step,)


def as_time(value: datetime | str) -> datetime:
    """A stored time, aware: SQLite's rows read back hold the text it was written as."""
    return aware(value if isinstance(value, datetime) else datetime.fromisoformat(value))


def aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything the ledger stores is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def db_time(value: datetime, dialect: str) -> datetime | str:
    """A UTC time as the driver takes it: SQLite as the text SQLAlchemy writes and reads."""
    if dialect == "sqlite":
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


_DAY = timedelta(days=1)
# A clock change between the plan and a later day moves a zone's quiet hours by up to an
# hour in UTC: a window repeated on a later day is kept that much wider on both sides.
_CLOCK_CHANGE = timedelta(hours=1)


def quiet_hours_end(send_until: datetime, reopens_at: datetime, now: datetime) -> datetime | None:
    """When the customer's quiet hours end, if they are quiet at `now`; else None (a time
    after `now` whenever one is given). Planned are the first ones after the message could
    go, [`send_until`, `reopens_at`); a send still going days later meets the same hours on
    each later day, an hour wider either side, or less where the hours leave less than four
    hours a day to send in (a quarter of what is left on each side: never all of it)."""
    if now < send_until:
        return None
    margin = min(_CLOCK_CHANGE, (_DAY - (reopens_at - send_until)) / 4)
    days = (now - send_until) // _DAY
    for day in (days, days + 1):
        widen = margin if day else timedelta(0)
        if send_until + day * _DAY - widen <= now < reopens_at + day * _DAY + widen:
            return reopens_at + day * _DAY + widen
    return None


def awake_together(
    windows: Iterable[tuple[datetime, datetime]], now: datetime, within: timedelta
) -> datetime | None:
    """The first moment from `now`, and before `now + within`, at which none of these
    customers (each a planned quiet-hours window, as `quiet_hours_end` takes it) is in their
    quiet hours; None if there is none. Until the last of those quiet at a moment wake up
    nobody can be awake with all the others, so the search jumps there."""
    pairs = set(windows)
    moment = now
    while moment < now + within:
        ends = [end for s, r in pairs if (end := quiet_hours_end(s, r, moment)) is not None]
        if not ends:
            return moment
        moment = max(ends)
    return None


def chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def worker_process_gone(worker: Any) -> bool:
    """Whether a `delivery_workers` row's process is certainly gone (on this host)."""
    started = aware(worker.started_at).timestamp()
    return process_gone(worker.host, worker.pid, started) is not None


def worker_gone(worker: Any | None, now: datetime) -> bool:
    """Whether `recover_interrupted` would take a `delivery_workers` row (None: no row) for
    gone at `now`: not alive, silent past its lease, or its process gone. Reads only."""
    if worker is None or worker.state != WORKER_ALIVE:
        return True
    lapsed = aware(worker.heartbeat_at) + timedelta(seconds=worker.lease_seconds)
    return lapsed < now or worker_process_gone(worker)


class LedgerBase:
    """The engine and the dialect's helpers that every part of the ledger uses."""

    url: str
    engine: sa.Engine

    def __init__(self, url: str) -> None:
        self.url = url
        # The lease of each delivery worker this process registered (state_machine.py).
        self._leases: dict[str, float] = {}
        try:
            self.engine = open_engine(url)
            self._bring_up()
        except (sa.exc.OperationalError, OSError) as err:
            raise LedgerUnavailable.of(url, err) from None

    def _bring_up(self) -> None:
        """Migrate the schema on the first opening in this process. Processes that open a new
        SQLite ledger at the same instant can find it locked while another one creates its
        tables, beyond the busy timeout's reach: that is waited out (a minute at most), never
        reported as a ledger that cannot be opened (the switch to WAL is waited out as every
        connection opens: `db.open_engine`)."""
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception(sqlite_locked),
            wait=tenacity.wait_random_exponential(multiplier=0.05, max=2.0),
            stop=tenacity.stop_after_delay(60.0 if self.engine.dialect.name == "sqlite" else 0.0),
            before_sleep=lambda _: self.engine.dispose(),
            reraise=True,
        ):
            with attempt:
                if self.url not in _MIGRATED or not _has_sends(self.engine):
                    self.migrate()

    def migrate(self) -> None:
        """Create or upgrade the schema (tables, added columns, indexes, triggers). Done on a
        ledger's first opening in each process (or by `cdp-activation migrate`), not on every
        one: a sensor opening the ledger every minute takes no schema lock."""
        migrate(self.engine)
        _MIGRATED.add(self.url)

    def dispose(self) -> None:
        self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def _mark(self) -> str:
        return "?" if self.dialect == "sqlite" else "%s"

    def _marks(self, count: int) -> str:
        """`count` placeholders, comma-separated: an `IN (…)` list or a row of values."""
        return ", ".join([self._mark] * count)

    def _gone_workers(
        self, con: sa.Connection, worker_ids: Iterable[str | None]
    ) -> set[str | None]:
        """Of these `claimed_by` values, those whose worker is gone now (`worker_gone`; None,
        no worker at all, always is). Reads only."""
        ids = sorted({w for w in worker_ids if w is not None})
        workers = {
            w.id: w
            for w in con.execute(sa.select(delivery_workers).where(delivery_workers.c.id.in_(ids)))
        }
        now = utc_now()
        return {None} | {w for w in ids if worker_gone(workers.get(w), now)}

    def _db_now(self) -> Any:
        """The time leases are stamped and judged by: PostgreSQL's own clock, so workers on
        hosts whose clocks differ agree; SQLite's file lives on one host, whose clock it is."""
        return sa.func.now() if self.dialect == "postgresql" else utc_now()

    def _lapsed(self, lease_seconds: float, now: datetime) -> Any:
        """The heartbeat time before which a lease of `lease_seconds` has lapsed."""
        if self.dialect == "postgresql":
            return sa.func.now() - sa.func.make_interval(0, 0, 0, 0, 0, 0, lease_seconds)
        return now - timedelta(seconds=lease_seconds)

    def _lock_for_write(self, con: sa.Connection) -> None:
        """SQLite: take the write lock now (waiting out the busy timeout), so a transaction
        that reads before it writes cannot fail to upgrade its lock under concurrency."""
        if self.dialect == "sqlite":
            con.exec_driver_sql("UPDATE delivery_workers SET state = state WHERE 0")
