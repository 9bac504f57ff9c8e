"""The stable list of reason codes. Renaming one is a breaking change (dashboards use them)."""

from __future__ import annotations

from cdp_activation import vocabulary

MISSING_PHONE = "missing_phone"
INVALID_PHONE = "invalid_phone"
SUPPRESSED = "suppressed"
DUPLICATE_PHONE = "duplicate_phone"
OVER_RECIPIENT_CAP = "over_recipient_cap"
FREQUENCY_CAPPED = vocabulary.FREQUENCY_CAPPED
HOLDOUT = "holdout"
NOT_MOBILE = "not_mobile"
NO_CONSENT = "no_consent"  # prefixed with the channel, e.g. whatsapp_no_consent
MARKETING_UNAVAILABLE = "marketing_unavailable"  # whatsapp_marketing_unavailable
# e.g. sms_opted_out: the customer replied STOP, or the provider said so
OPTED_OUT = vocabulary.OPTED_OUT
NO_ADDRESS = "no_address"  # e.g. line_no_address: no LINE user id for the customer
CHANNEL_SUPPRESSED = "suppressed"  # per channel, e.g. sms_suppressed
TEMPLATE_NOT_APPROVED = "template_not_approved"
OUTSIDE_WINDOW = vocabulary.OUTSIDE_WINDOW  # (the ledger writes it too, see there)
INVALID_VARIABLES = "invalid_variables"
DAILY_CAPPED = "daily_cap"  # e.g. whatsapp_daily_cap: a higher-priority activation has it
LEFT_AUDIENCE = "left_audience"  # the audience SQL no longer returns them (a planned row)
# A planned fallback whose first message is due none now.
FALLBACK_NOT_DUE = vocabulary.FALLBACK_NOT_DUE
ERASED = "erased"  # a data subject's erasure cancelled a planned send

# Customer-level reasons: no channel of the plan can be used.
CUSTOMER_REASONS: dict[str, str] = {
    MISSING_PHONE: "No phone number stored for the customer.",
    INVALID_PHONE: "The stored phone number is not a valid number for the customer's country.",
    SUPPRESSED: "The number is on the global suppression list.",
    DUPLICATE_PHONE: "Another customer in this run has the same number; it is messaged once.",
    OVER_RECIPIENT_CAP: "Beyond the run's max_recipients (chosen deterministically).",
    FREQUENCY_CAPPED: "Reached a frequency cap on every channel (policy.frequency_caps), "
    "counted across all activations from the ledger.",
    HOLDOUT: "In the activation's control group: recorded, never messaged, to measure uplift.",
    LEFT_AUDIENCE: "Not sent: when it was due (a fallback, or a deferred message), the "
    "audience SQL no longer returned the customer (they ordered, say, since).",
    FALLBACK_NOT_DUE: "Fallback planned, then not sent: when a run decided again, its first "
    "message was no longer due one (delivered or answered since, or a longer window).",
    ERASED: "Planned, then not sent: the customer's data was erased (`cdp-activation erase`).",
}

# Channel-level reasons, reported as `<channel>_<reason>`.
CHANNEL_REASONS: dict[str, str] = {
    OPTED_OUT: "The customer opted out here themselves: replied STOP (or another opt-out "
    'keyword), tapped a template\'s "Stop promotions" button (marketing only), unfollowed, '
    "or the provider refused a send because they had (Twilio 21610, Meta 131050). Applied "
    "before, and regardless of, the warehouse's consent columns.",
    MARKETING_UNAVAILABLE: "WhatsApp will not deliver this marketing template now: the "
    "customer's country gets no WhatsApp marketing templates (policy."
    "whatsapp_marketing_blocked_countries, US by default), or Meta's per-user marketing limit "
    "refused them lately (131049; backed off 1, 2, 4, then 8 days).",
    NO_CONSENT: "No opt-in for this channel and purpose (latest consent record is not an opt-in).",
    NO_ADDRESS: "No valid address on this channel: LINE needs the customer's LINE user id "
    "(`line_user_id`, U and 32 hex digits, from a follow event).",
    CHANNEL_SUPPRESSED: "The number is suppressed for this channel.",
    TEMPLATE_NOT_APPROVED: "The template is missing from the provider's catalog, not APPROVED, "
    "or of a category the purpose does not allow.",
    OUTSIDE_WINDOW: "A free-form WhatsApp message outside the 24-hour customer-care window "
    "(or with a last inbound time in the future, which is bad data), or one planned inside it "
    "that was still unsent when it closed (cancelled at its claim).",
    INVALID_VARIABLES: "A template or body variable is missing, empty, or breaks the channel's "
    "rules (newlines, tabs, more than four consecutive spaces, too long).",
    NOT_MOBILE: "The number cannot take this channel (e.g. a fixed line cannot receive SMS).",
    FREQUENCY_CAPPED: "Reached this channel's frequency cap (policy.frequency_caps).",
    DAILY_CAPPED: "The day's messages on this channel (CDP_DAILY_CAP) go to higher-priority "
    "activations that chose the customer today (`priority` in defs.yaml), or were sent.",
}


def channel_reason(channel: str, reason: str) -> str:
    return f"{channel}_{reason}"


def describe(code: str) -> str:
    """The human text of a reason code (customer-level, `<channel>_<reason>`, or several
    channel reasons joined by `+` when no channel of the plan could be used)."""
    if "+" in code:
        return " / ".join(describe(part) for part in code.split("+"))
    if code in CUSTOMER_REASONS:
        return CUSTOMER_REASONS[code]
    for reason, text in CHANNEL_REASONS.items():
        if code.endswith("_" + reason):
            return f"{code.split('_', 1)[0].capitalize()}: {text}"
    return code
