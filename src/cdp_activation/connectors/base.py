"""What every connector is: capabilities as data, one async batch send, errors classified.

A connector speaks one provider's HTTP API. It never decides *whether* to send (that is policy)
nor keeps state (that is the ledger): it turns `OutboundMessage`s into requests and each response
into a `SendResult` whose `outcome` tells the delivery engine what to do next.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import ClassVar, Protocol, runtime_checkable

import httpx

from cdp_activation.contracts import (  # noqa: F401  # re-exported: part of a connector's contract
    Outcome,
    SendResult,
    TemplateInfo,
    send_id_of,
    send_reference,
)
from cdp_activation.errors import (  # noqa: F401  # re-exported: a connector raises them
    ConnectorConfigError,
    ConnectorError,
    CredentialsError,
    TemplateError,
)
from cdp_activation.frozen_records import quick_init


@dataclass(frozen=True)
class Capabilities:
    """A connector's limits, declared as data so the engine can respect them."""

    channels: frozenset[str]
    max_batch_size: int  # recipients per request
    default_rate_per_second: float  # messages per second per sender
    idempotency: bool  # provider de-duplicates a re-sent request carrying our key
    # The platform keeps the message and its approval itself (a CEP's campaign): there is no
    # template catalog to check, the "template" a step names is the platform's campaign.
    platform_owns_templates: bool = False
    # Error codes (at send time or in a failed status report) meaning "this customer cannot
    # receive messages on this channel": a plan's fallback sends the next channel at once.
    unreachable_codes: frozenset[str] = frozenset()
    # Error codes meaning "the customer opted out of this sender", with what they cover
    # (`all`, or `marketing`): the ledger turns such a refusal into an opt-out the policy keeps.
    opt_out_codes: tuple[tuple[str, str], ...] = ()
    # Error codes meaning "not this customer, not now" (Meta 131049, its per-user marketing
    # limit): the policy backs off that customer's marketing on the channel for a growing
    # while (1, 2, 4, then 8 days) instead of falling back at once to another channel.
    backoff_codes: frozenset[str] = frozenset()
    # It takes audience handoffs (a plan step's `handoff`: the customer is written to a CEP,
    # whose own journey sends), not messages: no delivery report ever follows.
    handoff: bool = False


@quick_init  # made for every message: see frozen_records.py
@dataclass(frozen=True)
class TemplateRef:
    """A provider template to send: name, language and positional body parameters."""

    name: str
    language: str
    parameters: tuple[str, ...] = ()
    # The audience columns the parameters came from, in the same order (empty when unknown):
    # providers that take named properties (Braze's trigger properties) use them as keys.
    parameter_names: tuple[str, ...] = ()


@quick_init  # made for every message: see frozen_records.py
@dataclass(frozen=True)
class OutboundMessage:
    """One message for one recipient. `key` is the ledger's idempotency key."""

    key: str
    to: str  # E.164, e.g. +447911123456
    channel: str
    template: TemplateRef | None = None
    body: str | None = None
    customer_id: str | None = None  # for platforms that address their own users (Braze)
    purpose: str | None = None  # marketing | transactional, for providers that tag it (Viber)
    # The send's reference (`send_reference(send_id)`, e.g. "cdp-123"), passed where the
    # provider echoes it in its status reports (Meta `biz_opaque_callback_data`, Infobip
    # `callbackData`, Vonage `client_ref`, Twilio's `StatusCallback` URL), so a report names
    # the ledger row even when the send's answer (and its provider id) was lost.
    reference: str | None = None


@runtime_checkable
class Connector(Protocol):
    """The interface the delivery engine drives."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    rate_per_second: float | None  # this sender's configured rate; None: the default

    async def send_batch(
        self, client: httpx.AsyncClient, messages: Sequence[OutboundMessage]
    ) -> list[SendResult]:
        """Send one batch (at most `capabilities.max_batch_size` messages).

        Returns one result per message, in any order, keyed by `OutboundMessage.key`.
        Raises `CredentialsError` or `TemplateError` when the whole activation must stop.
        """
        ...

    def redact(self, text: str) -> str:
        """Remove this connector's secrets from a string before it is logged or raised."""
        ...


# --- helpers every HTTP connector shares -------------------------------------------------------

# The request never left this process (or never reached the server): sending again is safe.
_NOT_SENT_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ProxyError,
)
# We built a request the transport refuses (bad URL scheme, bad header): a configuration bug.
_CONFIG_ERRORS: tuple[type[httpx.TransportError], ...] = (
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)


def check_batch_size(connector: Connector, messages: Sequence[OutboundMessage]) -> None:
    """Refuse a batch larger than the connector declares, before any request is made."""
    limit = connector.capabilities.max_batch_size
    if len(messages) > limit:
        raise ValueError(
            f"{connector.name} sends at most {limit} message(s) per batch, got {len(messages)}"
        )


def transport_outcome(exc: httpx.TransportError) -> Outcome:
    """RETRY when the request surely never reached the provider, else UNKNOWN.

    Read/write timeouts, a dropped connection or a garbled answer happen *after* bytes left, so
    the provider may have accepted the message; without an idempotency key a resend could
    message the customer twice, hence UNKNOWN ("never twice" outranks "never lost").
    Raises `ConnectorConfigError` for errors that only a configuration fix can cure.
    """
    if isinstance(exc, _CONFIG_ERRORS):
        raise ConnectorConfigError(f"HTTP request could not be built: {type(exc).__name__}")
    if isinstance(exc, _NOT_SENT_ERRORS):
        return Outcome.RETRY
    return Outcome.UNKNOWN


# Answers that say "a gateway in front of the provider gave up waiting for its answer": 504,
# and Cloudflare's 524 ("a timeout occurred" after the origin took the connection).
GATEWAY_TIMEOUTS = frozenset({504, 524})


def gateway_gave_up(status: int) -> bool:
    """A gateway in front of the provider (a load balancer, a proxy, the provider's own edge)
    gave up waiting for its answer, whoever wrote the body: the provider had the request and
    may have taken it, exactly as when our own read times out (`transport_outcome`). UNKNOWN,
    unless the provider de-duplicates on our key (then `may_be_taken`, asked again under it).

    A 502 stays a retry: it is what a load balancer answers while the provider's servers are
    down or refuse connections (an outage), and an outage must not end every message in the
    air `unknown`. (Some load balancers answer 502 for a timeout too, e.g. Google Cloud's
    `backend_timeout`: those are retried, and could reach a customer twice.) The provider's
    other 5xx are retried too.
    """
    return status in GATEWAY_TIMEOUTS


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """The Retry-After header in seconds (delta-seconds or HTTP date), or None when absent."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def clip(text: str, limit: int = 300) -> str:
    """Shorten a provider's error body so a whole HTML error page never floods a log line."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
