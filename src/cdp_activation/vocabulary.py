"""The words every layer shares: a send's states, its steps, the policy's decisions, and the
idempotency key that makes a send unique. One definition each; everything else imports them.

States (`sends.state`): planned -> in_flight -> sent | failed | unknown | dead_letter; planned
rows may end `cancelled`; `holdout` and `excluded` rows are written as such and never sent.
Steps: a customer's first message of a partition is `initial`, its fallback `fallback`.
Decisions (the policy's, per customer): send, defer (quiet hours), holdout, exclude.
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl

PLANNED = "planned"
IN_FLIGHT = "in_flight"
SENT = "sent"
FAILED = "failed"
UNKNOWN = "unknown"
DEAD_LETTER = "dead_letter"
HOLDOUT = "holdout"
CANCELLED = "cancelled"
EXCLUDED = "excluded"
TERMINAL_STATES = frozenset({SENT, FAILED, UNKNOWN, DEAD_LETTER, HOLDOUT, CANCELLED, EXCLUDED})

INITIAL_STEP = "initial"
FALLBACK_STEP = "fallback"

SEND, DEFER, EXCLUDE = "send", "defer", "exclude"
DECISIONS: tuple[str, ...] = (SEND, DEFER, HOLDOUT, EXCLUDE)

# What an address that is not a phone number looks like, per channel (LINE's user ids).
ADDRESS_PATTERNS: dict[str, str] = {
    "line": r"^U[0-9a-f]{32}$",
    "wechat": r"^[A-Za-z0-9_-]{28}$",  # an Official Account's openid of a follower
}

# WhatsApp's customer-care window: a free-form message may go only this long after the
# customer's last message (the policy decides by it; the ledger cancels a planned one whose
# window closed, with the policy's reason code `whatsapp_outside_window`).
CARE_WINDOW = timedelta(hours=24)

# The policy's reason codes (`policy/reasons.py`, the stable list) that the ledger also writes
# on a planned row it cancels (`error_code`), so that every cancelled row says why.
OUTSIDE_WINDOW = "outside_window"  # as `whatsapp_outside_window`
WINDOW_CLOSED_CODE = f"whatsapp_{OUTSIDE_WINDOW}"  # a free-form message its window outran
OPTED_OUT = "opted_out"  # as `<channel>_opted_out`: the customer said stop meanwhile
# Also as `<channel>_frequency_capped`: a claim found the customer's cap used meanwhile.
FREQUENCY_CAPPED = "frequency_capped"
FALLBACK_NOT_DUE = "fallback_not_due"  # the first message landed, or was answered, meanwhile

KEY_SEPARATOR = "|"


def idempotency_key(activation: str, partition_key: str, customer_id: str, step: str) -> str:
    """The key a send is unique by: activation, partition, customer and step."""
    return KEY_SEPARATOR.join((activation, partition_key, customer_id, step))


def idempotency_key_expr(
    activation: str, partition_key: str, customer: pl.Expr, step: pl.Expr
) -> pl.Expr:
    """`idempotency_key` for every row of a frame, in polars (the same parts and separator)."""
    return pl.concat_str(
        [pl.lit(activation), pl.lit(partition_key), customer, step], separator=KEY_SEPARATOR
    )
