"""Delivery statuses reported by providers after they accepted a message (status webhooks).

A provider reports a message `sent` (to the handset network), `delivered`, `read`, or
`failed`, each provider in its own words (`webhooks/parsers.py` maps them). Reports arrive late,
twice or out of order, so a status only ever moves forward (`STATUS_RANK`): a `delivered`
after `read` changes nothing, and neither `delivered` nor `failed` replaces the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

SENT, DELIVERED, READ, FAILED = "sent", "delivered", "read", "failed"
STATUS_RANK: dict[str, int] = {SENT: 1, DELIVERED: 2, FAILED: 2, READ: 3}


def connector_of(provider: str) -> str:
    """The connector whose sends a provider's report may update: the plugin whose status
    webhook route it came in by (`plugins.status_routes`: "meta" -> meta_whatsapp, "sandbox"
    -> webhook), or a connector named directly (a warehouse status source)."""
    from cdp_activation.plugins import status_routes  # the registry, read at first use

    found = status_routes().get(provider)
    return found.name if found is not None else provider


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

    def __post_init__(self) -> None:
        if self.status not in STATUS_RANK:
            raise ValueError(f"unknown delivery status {self.status!r}")
