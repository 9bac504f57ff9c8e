"""What the ledger hands out and takes in: planned rows, claims, settlements, write counts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cdp_activation.errors import CdpError
from cdp_activation.frozen_records import quick_init

# Why a fallback was due (`fallback_reason`): the first message failed with a code meaning the
# customer cannot receive it on that channel; it was not delivered within the plan's window;
# it was delivered but not read within the plan's window (only where the plan asks for it); it
# was a free-form WhatsApp message whose customer's 24-hour window closed before it could go
# (cancelled at its claim, `whatsapp_outside_window`: never sent).
PRIMARY_UNREACHABLE = "primary_unreachable"
PRIMARY_NOT_DELIVERED = "primary_not_delivered"
PRIMARY_NOT_READ = "primary_not_read"
PRIMARY_WINDOW_CLOSED = "primary_window_closed"


@quick_init  # made for every message: see frozen_records.py
@dataclass(frozen=True)
class PlannedSend:
    """A row to send, as the delivery engine reads it back from the ledger."""

    id: int
    idempotency_key: str
    channel: str
    connector: str
    recipient: str
    message: dict[str, Any]
    attempts: int
    customer_id: str | None = None
    request_id: int | None = None  # the (grouped) request it goes in, when it has one
    purpose: str | None = None
    # Claimed as a request made before (a lost answer, a crash): the provider may have it,
    # so whatever the answer now, the row keeps its request (`Settlement.uncertain`).
    resent_request: bool = False
    # Claimed in the customer's quiet hours (`send_until` passed, `quiet_hours_end`): when
    # they end. The engine gives it back until then (`Settlement.deferred`), unsent.
    reopens_at: datetime | None = None


@dataclass(frozen=True)
class FrequencyCap:
    """A frequency cap the claim holds (`claim_caps`): at most `max_messages` messages of
    `purpose` ("any": of every purpose) on `channel` ("any": on every channel) per customer
    in `days` days, across activations."""

    purpose: str
    channel: str
    max_messages: int
    days: int


@dataclass(frozen=True)
class StatusWrite:
    received: int  # reports handed in
    duplicates: int  # already stored (or repeated in the same call): ignored
    advanced: int  # messages whose delivery_status moved forward
    reconciled: int = 0  # `unknown` sends a report proved accepted: now `sent`
    stale: int = 0  # reports older than their send: kept, flagged, never applied


@dataclass(frozen=True)
class PlanResult:
    planned: int  # new rows written by this call
    existing: dict[str, int]  # keys already in the ledger, by their current state


@dataclass(frozen=True)
class ClaimRequest:
    """Up to `limit` due rows of one connector for one request. `whole_requests`: the provider
    de-duplicates whole requests (`delivery.groups_requests`), so rows a crash left in a
    request are claimed together again, and fresh rows are stamped with their request's id."""

    connector: str
    limit: int
    whole_requests: bool = False


@quick_init  # made for every message: see frozen_records.py
@dataclass(frozen=True)
class Settlement:
    """What became of one claimed row once its request was answered (`Ledger.settle`).

    `state` is terminal (sent, failed, unknown) or `planned`: a retryable answer (429, 5xx, a
    request that never left) puts the row back, due again at `not_before`; `unsent` means the
    request was never made (the step stopped first), so its attempt is given back.
    """

    row_id: int
    state: str
    provider_message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    not_before: datetime | None = None
    unsent: bool = False
    provider_status: str | None = None  # the provider's word on an accepted message
    # The provider may have taken the request (a lost answer, asked again through a provider
    # that de-duplicates on our key): the row keeps its request, to go out again exactly so.
    uncertain: bool = False
    # Never requested: its quiet hours began before it was sent. Back to `planned` until
    # `not_before`, its attempt given back, out of the request it was claimed in (unless
    # `uncertain`: a request the provider may hold waits whole, to go out with its key).
    deferred: bool = False


class LeaseLost(CdpError, RuntimeError):
    """This worker was taken for dead (its lease expired) and its rows were recovered by
    another process: it must stop claiming."""

    transient = True


# How far a provider's clock may be behind ours: a status report dated earlier than this
# before its send was planned cannot be about that send.
STATUS_CLOCK_SKEW = timedelta(minutes=10)
OLDER_THAN_SEND = "older_than_send"  # status_events.ignored

DEADLINE_PASSED = "send_deadline_passed"  # dead_letter reason: not sent within max_send_delay
