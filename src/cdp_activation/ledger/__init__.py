"""The ledger: the durable record of every planned and attempted send.

It is the source of truth for "never twice, never lost". Each send has an idempotency key made
of activation, partition, customer and step, unique in the table; planned rows are written in
bulk before the first request, and every state change is a bulk UPDATE guarded by the state it
leaves, so a re-run, a retry or a backfill can never plan or send the same key twice.

States: planned -> in_flight -> sent | failed | unknown | dead_letter; a planned row may carry
`not_before` (quiet hours: deferred, sent by a later run) or end `cancelled` (a later run's
policy no longer chooses it); a holdout row is written as `holdout` and never sent.

Steps: a customer's first message of a partition is step `initial`; where the channel plan has
a fallback, a second row, step `fallback`, links to it (`fallback_of`) with the reason it was
due (`fallback_reason`); a fallback the policy refuses is written `excluded` with the reason
code in `error_code`, so it is decided once.
A row is sent only by the delivery worker that claimed it (`claim`: planned -> in_flight for
that worker, one statement); workers hold a lease (`delivery_workers`). A row left `in_flight`
by a worker that is gone was interrupted mid-request: the provider may have accepted it, so it
becomes `unknown` and is not resent (Meta, Twilio, Infobip and Vonage take no idempotency
key), unless its provider de-duplicates on our key. A living worker's rows are never touched.

SQLite (WAL) is the embedded default; PostgreSQL in production (any SQLAlchemy URL).
"""

from __future__ import annotations

from cdp_activation.ledger.assignments import Assignments
from cdp_activation.ledger.fallback import FallbackQueries
from cdp_activation.ledger.reads import Reads
from cdp_activation.ledger.records import (  # noqa: F401  # the ledger's names
    DEADLINE_PASSED,
    OLDER_THAN_SEND,
    PRIMARY_NOT_DELIVERED,
    PRIMARY_NOT_READ,
    PRIMARY_UNREACHABLE,
    PRIMARY_WINDOW_CLOSED,
    STATUS_CLOCK_SKEW,
    ClaimRequest,
    FrequencyCap,
    LeaseLost,
    PlannedSend,
    PlanResult,
    Settlement,
    StatusWrite,
)
from cdp_activation.ledger.refusals import Refusals
from cdp_activation.ledger.replies import InboundWrite, Replies  # noqa: F401
from cdp_activation.ledger.schema import (  # noqa: F401  # the ledger's names
    _MIGRATED,
    WORKER_ALIVE,
    WORKER_EXPIRED,
    WORKER_STOPPED,
    LedgerUnavailable,
    decision_counts,
    delivery_workers,
    inbound_events,
    metadata,
    opt_outs,
    send_events,
    sends,
    status_events,
    template_states,
    variant_assignments,
    webhook_refusals,
)
from cdp_activation.ledger.state_machine import SendStates
from cdp_activation.ledger.statuses import StatusIntake
from cdp_activation.vocabulary import (  # noqa: F401  # re-exported: the ledger's words
    CANCELLED,
    DEAD_LETTER,
    EXCLUDED,
    FAILED,
    FALLBACK_STEP,
    HOLDOUT,
    IN_FLIGHT,
    INITIAL_STEP,
    PLANNED,
    SENT,
    TERMINAL_STATES,
    UNKNOWN,
    idempotency_key,
)


class Ledger(SendStates, StatusIntake, Replies, FallbackQueries, Assignments, Refusals, Reads):
    """SQLAlchemy Core access to the ledger; every write is a bulk statement. Its jobs live in
    their own modules: `schema` (tables, `migrate`), `state_machine` (sends and their states),
    `statuses` (provider reports), `replies` (inbound messages, opt-outs), `fallback` (the
    fallback's queries), `assignments` (experiment variants), `refusals` (the receiver's
    signature refusals) and `reads`."""
