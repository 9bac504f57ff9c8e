"""Status sources: delivery statuses a platform exports to the warehouse instead of posting
webhooks (a CEP's event export, such as Braze Currents), read with SQL on a schedule into the
same ledger states as webhooks.

Each `sql/statuses/<name>.sql` is one read-only SELECT returning one row per event:

| column | type | meaning |
|---|---|---|
| `connector` | text | the connector that sent the message, as the activation names it (`braze`) |
| `provider_message_id` | text | the provider's id of the message (Braze: the dispatch id) |
| `customer_id` | text, optional | narrows the match when the id covers a batch (Braze) |
| `status` | text | `sent`, `delivered`, `read` or `failed` (map the platform's words in SQL) |
| `occurred_at` | timestamp | when it happened, by the platform's clock |
| `error_code` | text, optional | the platform's failure code |

`:since` (a timestamp), when the SQL uses it, is bound to the newest event already read from
this source, less an hour for exports that land late (a week back on the first read); events
already stored are recognised by their key and ignored, so overlap never counts twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from cdp_activation.audience.sql import AudienceQuery, load_audience_sql
from cdp_activation.audience.warehouse import Warehouse
from cdp_activation.connectors import CONNECTORS
from cdp_activation.contracts import STATUS_RANK, StatusEvent
from cdp_activation.db import as_utc
from cdp_activation.errors import CdpError
from cdp_activation.ledger import Ledger

STATUS_SQL_DIR = Path("sql") / "statuses"
REQUIRED_COLUMNS = ("connector", "provider_message_id", "status", "occurred_at")
FIRST_LOOKBACK = timedelta(days=7)
OVERLAP = timedelta(hours=1)


class StatusSourceError(CdpError, ValueError):
    """A status source's rows break its contract; nothing was written."""


@dataclass(frozen=True)
class StatusSource:
    name: str
    query: AudienceQuery

    @classmethod
    def load(cls, path: Path, dialect: str = "duckdb") -> StatusSource:
        return cls(name=path.stem, query=load_audience_sql(path, dialect))


@dataclass(frozen=True)
class StatusSourceRead:
    rows: int  # events the SQL returned
    new: int  # stored for the first time
    advanced: int  # sends whose delivery status moved forward
    since: datetime  # the cursor the SQL was given


def status_sources(root: Path, dialect: str = "duckdb") -> list[StatusSource]:
    """Every `sql/statuses/*.sql` under the project root, checked in the warehouse's dialect."""
    return [
        StatusSource.load(path, dialect) for path in sorted((root / STATUS_SQL_DIR).glob("*.sql"))
    ]


def read_status_source(
    source: StatusSource, warehouse: Warehouse, ledger: Ledger, now: datetime | None = None
) -> StatusSourceRead:
    """Read the source's new events and record them in the ledger (as webhooks are)."""
    now = now or datetime.now(UTC)
    newest = ledger.newest_status_time(source.name)
    since = newest - OVERLAP if newest is not None else now - FIRST_LOOKBACK
    frame = warehouse.query(source.query, {"since": since})
    events = status_events(source, frame)
    write = ledger.record_statuses(events)
    return StatusSourceRead(
        rows=frame.height,
        new=write.received - write.duplicates,
        advanced=write.advanced,
        since=since,
    )


def status_events(source: StatusSource, frame: pl.DataFrame) -> list[StatusEvent]:
    """The rows as status events; `StatusSourceError` listing every problem otherwise."""
    problems = _problems(source, frame)
    if problems:
        raise StatusSourceError("\n".join(problems))
    optional = [
        (pl.col(c).cast(pl.String) if c in frame.columns else pl.lit(None, pl.String)).alias(c)
        for c in ("customer_id", "error_code")
    ]
    rows = frame.select(
        pl.col("connector").cast(pl.String),
        pl.col("provider_message_id").cast(pl.String),
        pl.col("status").cast(pl.String).str.to_lowercase(),
        as_utc(frame, "occurred_at"),
        *optional,
    )
    return [
        StatusEvent(
            provider=r["connector"],
            provider_message_id=r["provider_message_id"],
            status=r["status"],
            occurred_at=r["occurred_at"],
            event_key=f"{source.name}|{r['connector']}|{r['provider_message_id']}|"
            f"{r['customer_id'] or ''}|{r['status']}|{r['occurred_at'].isoformat()}",
            error_code=r["error_code"],
            customer_id=r["customer_id"],
            source=source.name,
        )
        for r in rows.iter_rows(named=True)
    ]


def _problems(source: StatusSource, frame: pl.DataFrame) -> list[str]:
    where = f"{source.query.path} (status source {source.name})"
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        return [
            f"{where}: lacks column(s) {', '.join(missing)}; it returned "
            f"{', '.join(frame.columns)} (see docs/connectors.md, status sources)"
        ]
    problems = []
    for column in REQUIRED_COLUMNS:
        nulls = frame[column].null_count()
        if nulls:
            problems.append(f"{where}: {nulls:,} row(s) have a null {column}")
    if not isinstance(frame.schema["occurred_at"], pl.Datetime):
        problems.append(
            f"{where}: occurred_at must be a timestamp, got {frame.schema['occurred_at']}"
        )
    statuses = frame["status"].cast(pl.String).str.to_lowercase()
    bad = _sample(statuses.filter(~statuses.is_in(list(STATUS_RANK)) & statuses.is_not_null()))
    if bad:
        problems.append(
            f"{where}: status must be one of {', '.join(STATUS_RANK)}; got {bad} "
            "(map the platform's event names with CASE in the SQL)"
        )
    connectors = frame["connector"].cast(pl.String)
    unknown = _sample(
        connectors.filter(~connectors.is_in(list(CONNECTORS)) & connectors.is_not_null())
    )
    if unknown:
        problems.append(
            f"{where}: unknown connector(s) {unknown}; known: {', '.join(sorted(CONNECTORS))}"
        )
    return problems


def _sample(values: pl.Series, n: int = 5) -> str:
    distinct: Sequence[str] = values.unique().sort().head(n).to_list()
    return ", ".join(repr(v) for v in distinct)
