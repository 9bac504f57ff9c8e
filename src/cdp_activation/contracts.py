"""The types the layers hand one another, defined below all of them: a provider's answer for
one message (`Outcome`, `SendResult`), the reference a send carries and gets echoed back
(`send_reference`, `send_id_of`), and an entry of a provider's template catalog
(`TemplateInfo`). Connectors produce them, the delivery engine and the ledger record them,
the policy reads catalogs, and the newest word on a template (`TemplateState`, from a
status webhook or a catalog sync): none of those needs to import another for these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from cdp_activation.frozen_records import quick_init


class Outcome(StrEnum):
    """What a provider's answer means for one message."""

    SENT = "sent"  # accepted by the provider; provider_message_id is set
    FAILED = "failed"  # permanent for this recipient: never retried
    RETRY = "retry"  # not accepted, safe to send again (429, 5xx, connect error)
    UNKNOWN = "unknown"  # may have been accepted (timeout after sending, connection lost)


_REFERENCE_PREFIX = "cdp-"


def send_reference(send_id: int) -> str:
    """The reference a send carries to the provider: "cdp-<ledger row id>".

    Short on purpose (Vonage's `client_ref` takes at most 40 characters; "cdp-" and a 64-bit
    id are 24), opaque to the provider, and the same on every retry of the row.
    """
    if isinstance(send_id, bool) or not isinstance(send_id, int) or send_id < 0:
        raise ValueError(f"a send id is a non-negative integer, got {send_id!r}")
    return f"{_REFERENCE_PREFIX}{send_id}"


def send_id_of(reference: str | None) -> int | None:
    """The ledger row id a provider echoed back ("cdp-123" -> 123); None for anything else."""
    if not reference or not reference.startswith(_REFERENCE_PREFIX):
        return None
    digits = reference[len(_REFERENCE_PREFIX) :]
    if not digits.isascii() or not digits.isdigit() or len(digits) > 19:
        return None
    send_id = int(digits)
    return send_id if str(send_id) == digits else None  # "cdp-007" is not one we sent


@quick_init  # made for every message: see frozen_records.py
@dataclass(frozen=True)
class SendResult:
    """The provider's answer for one message."""

    key: str
    outcome: Outcome
    provider_message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    retry_after: float | None = None  # seconds, from Retry-After where given
    # The provider's own word on an accepted message, where it gives one (Meta's
    # `message_status`: accepted, held_for_quality_assessment, paused).
    provider_status: str | None = None
    # A RETRY after which the provider may still have taken the request (a 5xx, a 409 "still
    # in progress"): through a provider that de-duplicates on our key, it goes out again
    # whole, under the same key, never re-grouped under another (`engine._Delivery.settle`).
    may_be_taken: bool = False


@dataclass(frozen=True)
class TemplateInfo:
    """One entry of a provider's template catalog."""

    name: str
    language: str
    category: str  # MARKETING | UTILITY | AUTHENTICATION
    status: str  # APPROVED | PENDING | REJECTED | PAUSED | DISABLED
    body_parameter_count: int = 0
    # The body's parameter names in order: "1", "2", … for positional templates ({{1}}), the
    # names of a named one ({{first_name}}); empty when the catalog does not say.
    parameter_names: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


# Statuses a template cannot be sent in. PAUSED (Meta pauses a template whose quality fell,
# for 3 or 6 hours, or until edited) and DISABLED are what Meta announces while a template is
# in use; the others mean it is gone or was never approved.
BLOCKING = frozenset({"PAUSED", "DISABLED", "REJECTED", "PENDING_DELETION", "DELETED", "ARCHIVED"})
WEBHOOK, CATALOG = "webhook", "catalog"


@dataclass(frozen=True)
class TemplateState:
    connector: str
    name: str
    language: str
    status: str
    occurred_at: datetime
    reason: str | None = None
    source: str = WEBHOOK

    @property
    def blocked(self) -> bool:
        return self.status.upper() in BLOCKING

    def describe(self) -> str:
        """One line for a run's summary: which template, what status, since when, and why."""
        reason = f", reason {self.reason}" if self.reason and self.reason != "NONE" else ""
        told = "its status webhook" if self.source == WEBHOOK else "the template catalog"
        return (
            f"template {self.name!r} ({self.language}) is {self.status} at {self.connector} "
            f"since {self.occurred_at:%Y-%m-%d %H:%M} UTC ({told}{reason})"
        )


# --- delivery statuses -------------------------------------------------------------------------
# A provider reports a message `sent` (to the handset network), `delivered`, `read`, or
# `failed`, each provider in its own words (`connectors/status_parsers.py` maps them). Reports
# arrive late, twice or out of order, so a status only ever moves forward (`STATUS_RANK`): a
# `delivered` after `read` changes nothing, and neither `delivered` nor `failed` replaces the
# other.

SENT, DELIVERED, READ, FAILED = "sent", "delivered", "read", "failed"
STATUS_RANK: dict[str, int] = {SENT: 1, DELIVERED: 2, FAILED: 2, READ: 3}


@dataclass(frozen=True)
class Pricing:
    """A provider's word on what one message costs: `price` (a positive amount in
    `currency`) where it says it, else whether it is `billable` and under which `category`
    and `model` (Meta: the price is then its rate card's for the category and country)."""

    billable: bool | None = None
    category: str | None = None
    model: str | None = None
    price: float | None = None
    currency: str | None = None

    @classmethod
    def of(
        cls,
        *,
        billable: Any = None,
        category: Any = None,
        model: Any = None,
        price: Any = None,
        currency: Any = None,
    ) -> Pricing | None:
        """From a report's raw values (a price as text, negative as Twilio writes a charge);
        None when it holds none of them or a value that is not one."""
        amount: float | None = None
        if price not in (None, ""):
            try:
                amount = abs(float(price))
            except (TypeError, ValueError):
                amount = None
            if amount is not None and not math.isfinite(amount):
                amount = None
        found = cls(
            billable=billable if isinstance(billable, bool) else None,
            category=str(category)[:40] if category else None,
            model=str(model)[:20] if model else None,
            price=amount,
            currency=str(currency)[:3].upper() if currency and amount is not None else None,
        )
        return None if found == cls() else found


@dataclass(frozen=True)
class StatusEvent:
    """One provider report about one message, as the ledger stores it.

    `event_key` identifies the report itself (provider, message, status and the provider's own
    time or event id): the same webhook delivered twice has the same key and counts once.
    """

    provider: str
    provider_message_id: str
    status: str  # one of STATUS_RANK
    occurred_at: datetime
    event_key: str
    error_code: str | None = None
    payload: str | None = None  # the provider's JSON for this event, for audits
    # Only that customer's send moves (a provider id shared by a batch: Braze's dispatch id).
    customer_id: str | None = None
    source: str | None = None  # a warehouse status source's name; None for a webhook
    # The send's reference the provider echoed ("cdp-<send id>", see `connectors.base.
    # send_reference`): names the ledger row even when the send's answer, and with it the
    # provider message id, was lost. None when the report carries none (or not ours).
    reference: str | None = None
    # What the message costs, as the provider reports it (`Pricing`): Meta's `pricing`
    # (billable, category, model: the price itself is its rate card's), Infobip's and Vonage's
    # price per message, Twilio's `Price`. None where the report says nothing of it.
    pricing: Pricing | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUS_RANK:
            raise ValueError(f"unknown delivery status {self.status!r}")


# --- inbound messages --------------------------------------------------------------------------
OPT_OUT, OPT_IN = "out", "in"
ALL_PURPOSES = "all"  # an opt-out of every message on the channel (STOP), not only marketing


@dataclass(frozen=True)
class InboundMessage:
    """One message a customer sent us (a reply, a button tap, STOP), as a provider reported it.

    `text` is what the rules read (a keyword, a button's title): it is never stored whole;
    `summary` is the short, masked line that is. `opt` says whether the message opts the
    customer out of (`out`) or back into (`in`) messages on `channel` for `purpose`
    (`marketing`, or `all`); None for an ordinary reply.
    """

    provider: str
    event_key: str
    message_id: str
    channel: str
    sender: str  # E.164, or the provider's user id (LINE)
    occurred_at: datetime
    kind: str  # text, button, interactive, media, reaction, location, contacts, system, …
    text: str = ""
    summary: str = ""
    opt: str | None = None
    purpose: str = ALL_PURPOSES
    reason: str = ""  # why it is an opt-out or -in: `keyword`, `button`, a provider code
