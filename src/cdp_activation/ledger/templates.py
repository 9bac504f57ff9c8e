"""The newest word on each provider template, kept in the ledger's `template_states` table.

Meta tells a business when one of its WhatsApp templates changes status with a signed
`message_template_status_update` webhook (APPROVED, PAUSED for low quality, DISABLED, …); the
template catalog sync (`templates/<connector>`) reads the same statuses from the catalog. Each
word is kept with the time it was true, and only a newer one replaces it, whichever source
said it.

The delivery engine reads these before it sends (`TemplateGate`): a template whose newest word
is PAUSED or DISABLED is not sent at all, and its rows stay `planned` until a newer word
approves it again. Meta's own refusal of a paused template (error 132015) stops a step too;
the webhook stops it before the first refusal, in every worker at once, and says why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from cdp_activation.contracts import (  # noqa: F401  # re-exported: the template words
    BLOCKING,
    CATALOG,
    WEBHOOK,
    TemplateState,
)
from cdp_activation.ledger import PlannedSend, template_states


def record_states(engine: sa.Engine, states: Sequence[TemplateState]) -> None:
    """Keep each state unless a newer word on that template is kept already."""
    if not states:
        return
    received = datetime.now(UTC)
    rows = [
        {
            "connector": s.connector,
            "name": s.name[:512],
            "language": s.language[:20],
            "status": s.status.upper()[:40],
            "reason": (s.reason or "")[:300] or None,
            "source": s.source,
            "occurred_at": s.occurred_at,
            "received_at": received,
        }
        for s in states
    ]
    insert = postgres_insert if engine.dialect.name == "postgresql" else sqlite_insert
    statement = insert(template_states)
    statement = statement.on_conflict_do_update(
        index_elements=["connector", "name", "language"],
        set_={
            column: statement.excluded[column]
            for column in ("status", "reason", "source", "occurred_at", "received_at")
        },
        where=statement.excluded.occurred_at >= template_states.c.occurred_at,
    )
    with engine.begin() as con:
        for row in sorted(rows, key=lambda r: (r["connector"], r["name"], r["language"])):
            con.execute(statement, row)  # one at a time: a batch may name a template twice


def latest_states(engine: sa.Engine, connector: str | None = None) -> list[TemplateState]:
    """The newest word on every template (of `connector`), by name and language."""
    query = sa.select(template_states).order_by(template_states.c.name, template_states.c.language)
    if connector is not None:
        query = query.where(template_states.c.connector == connector)
    with engine.connect() as con:
        rows = con.execute(query).mappings().all()
    return [
        TemplateState(
            connector=r["connector"],
            name=r["name"],
            language=r["language"],
            status=r["status"],
            occurred_at=_utc(r["occurred_at"]),
            reason=r["reason"],
            source=r["source"],
        )
        for r in rows
    ]


def blocked_templates(engine: sa.Engine) -> dict[tuple[str, str, str], TemplateState]:
    """(connector, name, language) -> the state that forbids sending it."""
    return {(s.connector, s.name, s.language): s for s in latest_states(engine) if s.blocked}


def _utc(value: datetime) -> datetime:
    """SQLite gives back naive datetimes (written in UTC)."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


class TemplateGate:
    """What the delivery engine asks before each request: is any of these rows' templates
    paused or disabled? Re-reads the table at most every `refresh_seconds` (a small SELECT),
    so a webhook stops every worker within that time."""

    def __init__(self, engine: sa.Engine, refresh_seconds: float = 2.0) -> None:
        self.engine = engine
        self.refresh_seconds = refresh_seconds
        self._blocked: dict[tuple[str, str, str], TemplateState] = {}
        self._read_at = -float("inf")
        self._lock = asyncio.Lock()

    async def _current(self) -> dict[tuple[str, str, str], TemplateState]:
        if time.monotonic() - self._read_at >= self.refresh_seconds:
            async with self._lock:
                if time.monotonic() - self._read_at >= self.refresh_seconds:
                    self._blocked = await asyncio.to_thread(blocked_templates, self.engine)
                    self._read_at = time.monotonic()
        return self._blocked

    async def blocking(self, connector: str, rows: Iterable[PlannedSend]) -> TemplateState | None:
        """The state that forbids sending one of `rows` through `connector`, or None."""
        blocked = await self._current()
        if not blocked:
            return None
        for row in rows:
            template = row.message.get("template")
            if template is not None:
                state = blocked.get((connector, template, row.message.get("language", "")))
                if state is not None:
                    return state
        return None
