"""The ledger's tables, its history triggers and `migrate()`: created or upgraded once per
process (or by `cdp-activation migrate`), never on every opening."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from cdp_activation.db import lock_schema
from cdp_activation.errors import SettingsError
from cdp_activation.masking import masked
from cdp_activation.vocabulary import (
    PLANNED,
)

metadata = sa.MetaData()


def _pricing_columns() -> list[sa.Column[Any]]:
    """A provider's word on a message's cost (`contracts.Pricing`), as `sends` and
    `status_events` both keep it."""
    return [
        sa.Column("billable", sa.Boolean),
        sa.Column("pricing_category", sa.String(40)),
        sa.Column("pricing_model", sa.String(20)),
        sa.Column("price", sa.Float),
        sa.Column("price_currency", sa.String(3)),
    ]


sends = sa.Table(
    "sends",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("idempotency_key", sa.String(300), nullable=False, unique=True),
    sa.Column("activation", sa.String(120), nullable=False),
    sa.Column("partition_key", sa.String(40), nullable=False),
    sa.Column("customer_id", sa.String(120), nullable=False),
    sa.Column("step", sa.String(40), nullable=False),
    sa.Column("channel", sa.String(20), nullable=False),
    sa.Column("purpose", sa.String(20), nullable=False, default="marketing"),
    sa.Column("connector", sa.String(40), nullable=False),
    sa.Column("recipient", sa.String(40), nullable=False),
    sa.Column("message", sa.Text, nullable=False),  # JSON: template + variables, or body
    sa.Column("state", sa.String(20), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("provider_message_id", sa.String(200)),
    sa.Column("error_code", sa.String(40)),
    sa.Column("error_message", sa.String(500)),
    # The provider's own word on an accepted message, where it gives one (Meta's
    # `message_status`: accepted, held_for_quality_assessment, paused).
    sa.Column("provider_status", sa.String(40)),
    sa.Column("run_id", sa.String(64)),
    sa.Column("not_before", sa.DateTime(timezone=True)),  # deferred (quiet hours) until then
    # When the customer's next quiet hours begin after it may go, and when they end: a
    # message still unsent by then is given back at its claim until they end (null: no
    # quiet hours, or planned by an earlier version).
    sa.Column("send_until", sa.DateTime(timezone=True)),
    sa.Column("reopens_at", sa.DateTime(timezone=True)),
    # A free-form WhatsApp message may go only before the customer's 24-hour care window
    # closes (their last message + 24 h): one still planned then is cancelled at its claim,
    # `whatsapp_outside_window` (`SendStates.claim`). Null: any other message, or an
    # earlier version's.
    sa.Column("window_until", sa.DateTime(timezone=True)),
    sa.Column("sent_at", sa.DateTime(timezone=True)),  # when the provider accepted it
    sa.Column("planned_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # Through a provider that de-duplicates a whole request on one key (LINE's retry key, the
    # webhook's Idempotency-Key): the number of the request this row last went in (random,
    # see `_claim_request`), kept while the provider may have that request, so the row goes
    # out again with exactly the same companions and therefore the same key. Null for
    # one-recipient providers, unsent rows, and requests the provider surely did not take.
    sa.Column("request_id", sa.BigInteger().with_variant(sa.Integer, "sqlite")),
    # What the provider reported after accepting it (status webhooks): sent, delivered, read
    # or failed, only ever moving forward (`statuses.STATUS_RANK`), with the latest report's time.
    sa.Column("delivery_status", sa.String(20)),
    sa.Column("delivery_status_at", sa.DateTime(timezone=True)),
    sa.Column("delivery_error_code", sa.String(40)),
    # A fallback send: the id of the send it stands in for, and why it was due.
    sa.Column("fallback_of", sa.BigInteger().with_variant(sa.Integer, "sqlite")),
    sa.Column("fallback_reason", sa.String(40)),
    # The delivery worker (`delivery_workers.id`) that claimed it: only that worker sends it,
    # and only while that worker's lease lives (see `claim`, `recover_interrupted`).
    sa.Column("claimed_by", sa.String(64)),
    # The experiment variant the customer is in (`experiment` in defs.yaml; null without
    # one): `variant_assignments` keeps it across partitions, the results compare arms by it.
    sa.Column("variant", sa.String(40)),
    # The customer's country as the audience gave it (ISO 3166 alpha-2): what the estimate
    # priced the message at, and what the provider's rate card prices it at.
    sa.Column("country", sa.String(8)),
    # What the message cost, as its provider reported it (status reports, `Pricing`): the
    # amount where it says one, else whether it is billable and under which category and
    # pricing model (Meta: the rate card's price for that category). Null: nothing reported.
    *_pricing_columns(),
    # A partition's rows by state use ix_sends_due's first columns (below, `_add_missing_
    # columns`): a narrower index of its own on them was one more for every write to maintain.
    sa.Index("ix_sends_state_sent_at", "state", "sent_at"),
    sa.Index("ix_sends_provider_message_id", "provider_message_id"),
    sa.Index("ix_sends_updated_at", "updated_at"),  # the send log's incremental export
    sa.Index("ix_sends_fallback_of", "fallback_of"),
    # Who wrote back (`Replies._customers_of`): the send to that address on that channel.
    sa.Index("ix_sends_recipient_channel", "recipient", "channel"),
    # A customer's sends: an opt-out cancels their planned ones (`Replies._opt_out`, inside
    # the receiver's write transaction: without it, a scan of every planned row that held the
    # ledger's write lock from the senders for milliseconds a reply), erasure finds them.
    sa.Index("ix_sends_customer_channel", "customer_id", "channel"),
)

# Each customer's experiment variant, per activation and salt, from the first time they were
# planned: later runs reuse it (`policy/variants.py`), so changing the weights or the audience
# never moves a customer from one arm to another. Written before the plan that uses it.
variant_assignments = sa.Table(
    "variant_assignments",
    metadata,
    sa.Column("activation", sa.String(120), primary_key=True),
    sa.Column("salt", sa.String(120), primary_key=True),
    sa.Column("customer_id", sa.String(120), primary_key=True),
    sa.Column("variant", sa.String(40), nullable=False),
    sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
)

# What each real run decided, counted: customers per country, channel, decision and reason
# of one activation, partition and step (the latest run's; a combination a re-run no longer
# has is kept at 0). The funnel's first stages (sql/reporting/funnel.sql): the ledger keeps
# only the customers it plans, not the audience they were chosen from.
decision_counts = sa.Table(
    "decision_counts",
    metadata,
    sa.Column("count_key", sa.String(400), primary_key=True),
    sa.Column("activation", sa.String(120), nullable=False),
    sa.Column("partition_key", sa.String(40), nullable=False),
    sa.Column("step", sa.String(40), nullable=False),
    sa.Column("country", sa.String(8)),
    sa.Column("channel", sa.String(20)),
    sa.Column("decision", sa.String(20), nullable=False),
    sa.Column("reason", sa.String(200)),
    sa.Column("customers", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_decision_counts_partition", "activation", "partition_key", "step"),
    sa.Index("ix_decision_counts_updated_at", "updated_at"),
)

# Status webhooks as they arrived, once each: `event_key` identifies a report (provider, its
# message id, the status and the provider's own time or event id), so a duplicate delivery of
# the same webhook is ignored. Written before the receiver answers 200, in the same
# transaction as the statuses they move forward.
status_events = sa.Table(
    "status_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("event_key", sa.String(300), nullable=False, unique=True),
    sa.Column("provider", sa.String(40), nullable=False),
    sa.Column("provider_message_id", sa.String(200)),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("error_code", sa.String(40)),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("payload", sa.Text),  # the event as the provider sent it (JSON), for audits
    # Whether it has found its send: a report may arrive before the send's answer is recorded.
    sa.Column("applied", sa.Boolean, nullable=False, default=False),
    # Why a stored report was left unapplied for good: `older_than_send` (its time is before
    # the send was planned: a replay, or a report of another ledger's message).
    sa.Column("ignored", sa.String(40)),
    # Where it came from: null for a webhook, the status source's name for events read from
    # the warehouse (`status_sources.py`), whose newest `occurred_at` is that source's cursor.
    sa.Column("source", sa.String(80)),
    # The customer the report is about, where the provider's id covers a whole batch (a Braze
    # dispatch id): the report then moves only that customer's send.
    sa.Column("customer_id", sa.String(120)),
    # The send's reference the provider echoed (`connectors.base.send_reference`): reconciles
    # a send whose own answer was lost (`unknown`) with what the provider reports about it.
    sa.Column("reference", sa.String(40)),
    # The report's word on the message's cost (`contracts.Pricing`), copied to its send.
    *_pricing_columns(),
    sa.Index("ix_status_events_applied_received", "applied", "received_at"),
    sa.Index("ix_status_events_source_occurred", "source", "occurred_at"),
)


# One row per state change of a send, written by the database itself (triggers on `sends`), so
# no code path can change a state without leaving its trace, in the same transaction.
send_events = sa.Table(
    "send_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("send_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
    sa.Column("from_state", sa.String(20)),  # null: the row was planned (inserted)
    sa.Column("to_state", sa.String(20), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("error_code", sa.String(40)),
    sa.Column("run_id", sa.String(64)),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_send_events_send_id", "send_id"),
)

# Every process that sends registers here and renews its lease (`heartbeat_at`) while it lives;
# the rows it claimed are recovered only once it is gone: stopped, its lease expired, or (on this
# host) its process no longer running. One small UPDATE renews the lease of all its rows.
delivery_workers = sa.Table(
    "delivery_workers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("run_id", sa.String(64)),
    sa.Column("activation", sa.String(120), nullable=False),
    sa.Column("partition_key", sa.String(40), nullable=False),
    sa.Column("step", sa.String(40), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("state", sa.String(20), nullable=False),  # alive | stopped | expired
    sa.Column("lease_seconds", sa.Float, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_delivery_workers_state", "state"),
)
WORKER_ALIVE, WORKER_STOPPED, WORKER_EXPIRED = "alive", "stopped", "expired"

# The newest word on each provider template (`template_states.py`): a status webhook (Meta's
# `message_template_status_update`) or a catalog sync. A template whose newest word is PAUSED
# or DISABLED is not sent: its rows stay planned until it is approved again.
template_states = sa.Table(
    "template_states",
    metadata,
    sa.Column("connector", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(512), primary_key=True),
    sa.Column("language", sa.String(20), primary_key=True),
    sa.Column("status", sa.String(40), nullable=False),
    sa.Column("reason", sa.String(300)),
    sa.Column("source", sa.String(20), nullable=False),  # webhook | catalog
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
)

# What customers sent us (replies, button taps, STOP), once each by the provider's message id
# (`event_key`), matched to a customer through the number the ledger last sent to. No message
# body is kept: `summary` is the kind and, for an opt-out or -in, the word that made it one.
inbound_events = sa.Table(
    "inbound_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("event_key", sa.String(300), nullable=False, unique=True),
    sa.Column("provider", sa.String(40), nullable=False),
    sa.Column("channel", sa.String(20), nullable=False),
    sa.Column("customer_id", sa.String(120)),  # null: a number the ledger never sent to
    sa.Column("kind", sa.String(20), nullable=False),
    sa.Column("summary", sa.String(120), nullable=False),
    sa.Column("opt", sa.String(8)),  # out | in | null
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_inbound_events_customer_channel", "customer_id", "channel", "occurred_at"),
)

# Customers who told us to stop, by channel and purpose (`marketing`, or `all`): from an
# opt-out keyword or button (`source` the inbound event's key) or a provider's refusal of a
# send (`source` "send:<id>", `reason` its code). The policy applies them on the next run,
# before and regardless of the warehouse's consent columns. An opt-in keyword lifts only what a
# keyword set (`lifted_at`).
opt_outs = sa.Table(
    "opt_outs",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("customer_id", sa.String(120), nullable=False),
    sa.Column("channel", sa.String(20), nullable=False),
    sa.Column("purpose", sa.String(20), nullable=False),
    sa.Column("reason", sa.String(40), nullable=False),  # keyword | button | a provider code
    sa.Column("source", sa.String(300), nullable=False, unique=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("lifted_at", sa.DateTime(timezone=True)),
    sa.Index("ix_opt_outs_customer_channel", "customer_id", "channel"),
)

# Status webhooks the receiver refused for their signature, counted per provider route and
# minute (UTC), by every receiver of the deployment: the alert on a misconfigured secret or
# forged reports reads them (alerts/). Nothing of the request is kept.
webhook_refusals = sa.Table(
    "webhook_refusals",
    metadata,
    sa.Column("route", sa.String(40), primary_key=True),
    sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("refusals", sa.Integer, nullable=False),
    sa.Index("ix_webhook_refusals_minute", "minute"),
)

_EVENT_COLUMNS = "send_id, from_state, to_state, attempts, error_code, run_id, at"
_SQLITE_TRIGGERS = (
    f"""CREATE TRIGGER IF NOT EXISTS sends_planned AFTER INSERT ON sends BEGIN
        INSERT INTO send_events ({_EVENT_COLUMNS})
        VALUES (NEW.id, NULL, NEW.state, NEW.attempts, NEW.error_code, NEW.run_id,
                NEW.updated_at);
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS sends_changed AFTER UPDATE OF state ON sends
    WHEN OLD.state IS NOT NEW.state BEGIN
        INSERT INTO send_events ({_EVENT_COLUMNS})
        VALUES (NEW.id, OLD.state, NEW.state, NEW.attempts, NEW.error_code, NEW.run_id,
                NEW.updated_at);
    END""",
)
_POSTGRES_TRIGGERS = (
    f"""CREATE OR REPLACE FUNCTION record_send_event() RETURNS trigger AS $$
    BEGIN
        IF TG_OP = 'INSERT' OR OLD.state IS DISTINCT FROM NEW.state THEN
            INSERT INTO send_events ({_EVENT_COLUMNS})
            VALUES (NEW.id, CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.state END,
                    NEW.state, NEW.attempts, NEW.error_code, NEW.run_id, NEW.updated_at);
        END IF;
        RETURN NULL;
    END $$ LANGUAGE plpgsql""",
    "CREATE OR REPLACE TRIGGER sends_events AFTER INSERT OR UPDATE OF state ON sends "
    "FOR EACH ROW EXECUTE FUNCTION record_send_event()",
)


class LedgerUnavailable(SettingsError):
    """The ledger cannot be opened or created where CDP_LEDGER_URL points: said in one line,
    naming the setting and what to check, before anything is planned or sent."""

    @classmethod
    def of(cls, url: str, err: BaseException) -> LedgerUnavailable:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        if isinstance(err, OSError) and err.filename:
            reason = f"{err.strerror or type(err).__name__}: {err.filename}"
        hint = (
            "the folder must exist or be creatable, and be writable, by this user"
            if url.startswith("sqlite")
            else "the database must answer and accept these credentials"
        )
        return cls(f"CDP_LEDGER_URL={masked(url)}: cannot open the ledger ({reason}); {hint}")


_MIGRATED: set[str] = set()  # ledger URLs this process brought up to this schema


def _has_sends(engine: sa.Engine) -> bool:
    """The `sends` table is there (a catalog read, no lock): the schema was not dropped."""
    with engine.connect() as con:
        return sa.inspect(con).has_table("sends")


def _add_missing_columns(con: sa.Connection) -> None:
    """Bring a ledger made by an earlier version up to this schema: `create_all` makes missing
    tables, not missing columns or indexes. Only nullable columns are ever added, so old rows
    stay valid. On PostgreSQL only what is missing is created: even `CREATE INDEX IF NOT
    EXISTS` takes a lock that waits behind every open write, so opening a ledger would queue
    behind running deliveries."""
    inspector = sa.inspect(con)
    postgres = con.dialect.name == "postgresql"
    existing: set[str] | None = None
    if postgres:
        existing = set(
            con.exec_driver_sql(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            ).scalars()
        )
    indexes: list[tuple[str, str]] = []
    for table in (sends, status_events):
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in [c for c in table.columns if c.name not in present]:
            kind = column.type.compile(dialect=con.dialect)
            con.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}")
        for index in table.indexes:
            columns = ", ".join(c.name for c in index.columns)
            indexes.append((str(index.name), f"ON {table.name} ({columns})"))
    # The claim's walk (`Ledger._claim_rows`): one partition's planned rows of a step and
    # connector, those with no `not_before` first, then by it, so the rows due now come first
    # and deferred ones are never read. SQLite sorts NULLs first already; PostgreSQL must be
    # told. Not declared on the Table: `create_all` cannot say NULLS FIRST.
    nulls_first = " NULLS FIRST" if postgres else ""
    indexes.append(
        (
            "ix_sends_due",
            "ON sends (activation, partition_key, state, step, connector, "
            f"not_before{nulls_first})",
        )
    )
    # Requests that must go out again whole (`Ledger._claim_request`): few rows, found fast.
    indexes.append(
        (
            "ix_sends_requests",
            "ON sends (activation, partition_key, request_id) "
            f"WHERE state = '{PLANNED}' AND request_id IS NOT NULL",
        )
    )
    # Planned free-form WhatsApp messages by when their window closes (`SendStates.claim`
    # looks for closed ones at every claim): only those rows, so no other write maintains it.
    indexes.append(
        (
            "ix_sends_window",
            "ON sends (activation, partition_key, step, window_until) "
            f"WHERE window_until IS NOT NULL AND state = '{PLANNED}'",
        )
    )
    # Refusals that mean "opted out" or "back off" (`Replies._refusals`): failures are few, so
    # only failed rows are indexed.
    indexes.append(
        ("ix_sends_error_code", "ON sends (error_code, connector) WHERE error_code IS NOT NULL")
    )
    indexes.append(
        (
            "ix_sends_delivery_error_code",
            "ON sends (delivery_error_code, connector) WHERE delivery_error_code IS NOT NULL",
        )
    )
    for name, definition in indexes:
        if existing is None or name not in existing:
            con.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS {name} {definition}")
    if not postgres:
        # Superseded by ix_sends_due's prefix. SQLite drops it under the write lock every
        # writer takes anyway; PostgreSQL's DROP INDEX would lock `sends` against running
        # deliveries, so an operator drops it there CONCURRENTLY (docs/operations.md).
        con.exec_driver_sql(f"DROP INDEX IF EXISTS {RETIRED_INDEX}")


RETIRED_INDEX = "ix_sends_activation_partition_state"  # (activation, partition_key, state)


def _has_trigger(con: sa.Connection) -> bool:
    """Whether the history trigger exists (PostgreSQL; SQLite's are `IF NOT EXISTS`):
    replacing it would lock `sends` against every running delivery."""
    if con.dialect.name != "postgresql":
        return False
    return bool(
        con.exec_driver_sql(
            "SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname = 'sends_events' "
            "AND c.relname = 'sends' AND n.nspname = current_schema()"
        ).first()
    )


def migrate(engine: sa.Engine) -> None:
    """Create or upgrade the schema: tables, added columns, indexes, the history triggers.
    One process at a time: runs and workers that start together would otherwise race to create
    the same tables and triggers."""
    triggers = {"sqlite": _SQLITE_TRIGGERS, "postgresql": _POSTGRES_TRIGGERS}
    with engine.begin() as con:
        lock_schema(con)
        metadata.create_all(con)
        _add_missing_columns(con)
        if not _has_trigger(con):
            for statement in triggers.get(engine.dialect.name, ()):
                con.exec_driver_sql(statement)
