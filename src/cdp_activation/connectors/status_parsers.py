"""Each provider's status webhook, turned into `StatusEvent`s (sent, delivered, read, failed).

Shapes, from the vendor specs in `../shared/vendor-specs/` and the providers' callback docs:

- Meta: `{object, entry: [{changes: [{field: "messages", value: {statuses: [{id, status,
  timestamp (Unix seconds), recipient_id, errors: [{code, title}]}]}}]}]}`; message events in
  the same payload (`value.messages`) are not statuses and are skipped. Template status
  changes (`field: message_template_status_update`) are read by `parse_meta_template_updates`.
- Twilio: a form POST per status change: `MessageSid`, `MessageStatus` (queued, sending, sent,
  delivered, undelivered, failed, read, …), `ErrorCode`; no event time, so the time received.
- Infobip: delivery reports `{results: [{messageId, status: {groupName, name}, error: {id,
  name}, doneAt}]}` and seen reports `{results: [{messageId, seenAt}]}` (read).
- Vonage: one status `{message_uuid, status (submitted, delivered, read, rejected,
  undeliverable), timestamp (ISO 8601), error: {type: ".../messages-olympus#1340"}}`.
- LINE: `{destination, events: [...]}`: LINE reports no delivery of push or multicast
  messages, so its events (follow, unfollow, message) carry no status and give none here.
- Sandbox: `{statuses: [{id, status, timestamp (ISO 8601), error_code}]}`.

Each event's `reference` is the send reference ("cdp-<send id>") the provider echoed, when
the send carried one: Meta's `biz_opaque_callback_data` in the status object, Infobip's
`callbackData` in the report, Vonage's `client_ref`, and for Twilio the `ref` query parameter of
the StatusCallback URL the report was posted to. It names the ledger row even when the send's
answer (and with it the provider's message id) was lost.

Statuses the ledger does not track (queued, accepted, sending, …) are dropped. A payload that is
not the provider's shape raises `ValueError` (answered 400: the provider will retry or alert).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from cdp_activation import json_codec
from cdp_activation.connectors.base import send_id_of
from cdp_activation.contracts import (
    ALL_PURPOSES,
    DELIVERED,
    FAILED,
    OPT_OUT,
    READ,
    SENT,
    STATUS_RANK,
    InboundMessage,
    Pricing,
    StatusEvent,
    TemplateState,
)
from cdp_activation.masking import mask_phones_in
from cdp_activation.plugins import connector_of

_VONAGE_CODE = re.compile(r"#(\d+)$")

TWILIO_STATUSES = {
    "sent": SENT,
    "delivered": DELIVERED,
    "read": READ,
    "undelivered": FAILED,
    "failed": FAILED,
}
VONAGE_STATUSES = {
    "submitted": SENT,
    "delivered": DELIVERED,
    "read": READ,
    "rejected": FAILED,
    "undeliverable": FAILED,
}
INFOBIP_GROUPS = {
    "PENDING": SENT,
    "DELIVERED": DELIVERED,
    "UNDELIVERABLE": FAILED,
    "EXPIRED": FAILED,
    "REJECTED": FAILED,
}


def _time(value: Any, received: datetime) -> datetime:
    """A provider time: Unix seconds, or ISO 8601 (Infobip's `+0000` too); else `received`."""
    if value is None or value == "":
        return received
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (TypeError, ValueError):
        pass
    text = str(value).replace(" ", "T", 1)
    text = re.sub(r"([+-]\d{2})(\d{2})$", r"\1:\2", text)  # +0000 -> +00:00
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return received
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _event(
    provider: str,
    message_id: Any,
    status: str,
    when: datetime,
    stamp: Any,
    error_code: Any,
    raw: Any,
    reference: Any = None,
    pricing: Pricing | None = None,
) -> StatusEvent:
    if not isinstance(message_id, str) or not message_id:
        raise ValueError(f"{provider} status without a message id")
    return StatusEvent(
        pricing=pricing,
        provider=provider,
        provider_message_id=message_id,
        status=status,
        occurred_at=when,
        event_key=f"{provider}|{message_id}|{status}|{stamp or ''}",
        error_code=str(error_code) if error_code not in (None, "", 0, "0") else None,
        payload=json_codec.dumps(_without_recipients(raw)),
        reference=_reference(reference),
    )


# Fields of the providers' reports that hold the customer's number (or the sender's): the
# ledger's row already says who it was, so the stored report keeps none of them.
_RECIPIENT_FIELDS = frozenset(
    {"recipient_id", "wa_id", "to", "from", "msisdn", "phone", "destination", "sender"}
)


# Fields holding the provider's time, kept as they are: Meta's `timestamp` is Unix seconds, a
# run of ten digits that would otherwise be masked as a phone number.
_TIME_FIELDS = frozenset({"timestamp", "time"})
# What `mask_phones_in` could mask has a run of 8 digits or a '+' before a digit; a value
# with neither (ids, statuses, codes: most of a report) is stored without running it.
_MAYBE_PHONE = re.compile(r"\d{8}|\+\d")


def _without_recipients(raw: Any) -> Any:
    """The report as stored for audits: recipient fields dropped, other numbers masked."""
    if isinstance(raw, dict):
        kept = {}
        for key, value in raw.items():
            name = str(key).lower()
            if name in _RECIPIENT_FIELDS:
                continue
            if name in _TIME_FIELDS and isinstance(value, str | int | float):
                kept[key] = value
            else:
                kept[key] = _without_recipients(value)
        return kept
    if isinstance(raw, list):
        return [_without_recipients(v) for v in raw]
    if isinstance(raw, str):
        return mask_phones_in(raw) if _MAYBE_PHONE.search(raw) else raw
    return raw


def _reference(value: Any) -> str | None:
    """The echoed value when it is one of our send references ("cdp-<send id>"), else None: a
    Vonage `client_ref` derived from the ledger key (sends without a reference) or another
    system's callback data names no ledger row."""
    return value if isinstance(value, str) and send_id_of(value) is not None else None


def _json(body: bytes) -> Any:
    try:
        return json_codec.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"the body is not JSON: {err}") from None


def parse_meta(body: bytes, received: datetime) -> list[StatusEvent]:
    data = _json(body)
    if not isinstance(data, dict) or not isinstance(data.get("entry"), list):
        raise ValueError("expected {object, entry: [...]}")
    events = []
    for entry in data["entry"]:
        for change in (entry or {}).get("changes") or []:
            value = (change or {}).get("value") or {}
            for status in value.get("statuses") or []:
                kind = status.get("status")
                if kind not in STATUS_RANK:
                    continue
                errors = status.get("errors") or [{}]
                stamp = status.get("timestamp")
                # Whether the message is billed, and under which category: the price is the
                # rate card's (Meta's webhooks carry no amount).
                pricing = status["pricing"] if isinstance(status.get("pricing"), dict) else {}
                events.append(
                    _event(
                        "meta",
                        status.get("id"),
                        kind,
                        _time(stamp, received),
                        stamp,
                        errors[0].get("code"),
                        status,
                        status.get("biz_opaque_callback_data"),
                        Pricing.of(
                            billable=pricing.get("billable"),
                            category=pricing.get("category"),
                            model=pricing.get("pricing_model"),
                        ),
                    )
                )
    return events


_TEMPLATE_FIELD = b"message_template_status_update"


def parse_meta_template_updates(body: bytes, received: datetime) -> list[TemplateState]:
    """Meta's `message_template_status_update` changes in a signed webhook (APPROVED, PAUSED,
    DISABLED, …): `{entry: [{id: <WABA id>, time, changes: [{field, value: {event,
    message_template_id, message_template_name, message_template_language, reason}}]}]}`.

    Status webhooks (the receiver's bulk) never name that field: they are not decoded twice."""
    if _TEMPLATE_FIELD not in body:
        return []
    data = _json(body)
    if not isinstance(data, dict) or not isinstance(data.get("entry"), list):
        raise ValueError("expected {object, entry: [...]}")
    states = []
    for entry in data["entry"]:
        for change in (entry or {}).get("changes") or []:
            if (change or {}).get("field") != _TEMPLATE_FIELD.decode():
                continue
            value = change.get("value") or {}
            event = value.get("event")
            name = value.get("message_template_name")
            language = value.get("message_template_language")
            if not (isinstance(event, str) and event and isinstance(name, str) and name) or not (
                isinstance(language, str) and language
            ):
                raise ValueError("a template status update without event, name or language")
            other = value.get("other_info")
            reason = value.get("reason") or (
                other.get("title") if isinstance(other, dict) else None
            )
            states.append(
                TemplateState(
                    connector=connector_of("meta"),
                    name=name,
                    language=language,
                    status=event.upper(),
                    occurred_at=_time(entry.get("time"), received),
                    reason=str(reason) if reason is not None else None,
                )
            )
    return states


def parse_twilio(
    params: Mapping[str, str], received: datetime, query: Mapping[str, str] | None = None
) -> list[StatusEvent]:
    """A Twilio status callback: `params` its form, `query` the query string of the URL it was
    posted to (the StatusCallback URL we sent, which carries the send's `ref`)."""
    sid = params.get("MessageSid") or params.get("SmsSid")
    kind = TWILIO_STATUSES.get(str(params.get("MessageStatus") or params.get("SmsStatus")))
    if not sid:
        raise ValueError("expected a MessageSid")
    if kind is None:
        return []
    # Twilio gives no event time: one report per message and status is the identity.
    reference = (query or {}).get("ref")
    # A charge, where the callback carries one (the Message resource's `price`, negative).
    pricing = Pricing.of(price=params.get("Price"), currency=params.get("PriceUnit"))
    return [
        _event(
            "twilio",
            sid,
            kind,
            received,
            None,
            params.get("ErrorCode"),
            dict(params),
            reference,
            pricing,
        )
    ]


def parse_infobip(body: bytes, received: datetime) -> list[StatusEvent]:
    data = _json(body)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError("expected {results: [...]}")
    events = []
    for result in data["results"]:
        if not isinstance(result, dict):
            raise ValueError("every result must be an object")
        if "seenAt" in result and "status" not in result:
            stamp = result["seenAt"]
            events.append(
                _event(
                    "infobip",
                    result.get("messageId"),
                    READ,
                    _time(stamp, received),
                    stamp,
                    None,
                    result,
                    result.get("callbackData"),
                )
            )
            continue
        status = result.get("status") or {}
        kind = INFOBIP_GROUPS.get(str(status.get("groupName")))
        if kind is None:
            continue
        error = result.get("error") or {}
        code = status.get("name") if kind == FAILED else None
        if kind == FAILED and error.get("name") and error.get("name") != "NO_ERROR":
            code = error["name"]
        stamp = result.get("doneAt") or result.get("sentAt")
        price = result["price"] if isinstance(result.get("price"), dict) else {}
        events.append(
            _event(
                "infobip",
                result.get("messageId"),
                kind,
                _time(stamp, received),
                stamp,
                code,
                result,
                result.get("callbackData"),
                Pricing.of(price=price.get("pricePerMessage"), currency=price.get("currency")),
            )
        )
    return events


def parse_vonage(body: bytes, received: datetime) -> list[StatusEvent]:
    data = _json(body)
    if not isinstance(data, dict) or "message_uuid" not in data:
        raise ValueError("expected a message status {message_uuid, status, timestamp}")
    kind = VONAGE_STATUSES.get(str(data.get("status")))
    if kind is None:
        return []
    error = data.get("error") or {}
    match = _VONAGE_CODE.search(str(error.get("type") or ""))
    code = match.group(1) if match else error.get("title")
    stamp = data.get("timestamp")
    usage = data["usage"] if isinstance(data.get("usage"), dict) else {}
    return [
        _event(
            "vonage",
            data["message_uuid"],
            kind,
            _time(stamp, received),
            stamp,
            code,
            data,
            data.get("client_ref"),
            Pricing.of(price=usage.get("price"), currency=usage.get("currency")),
        )
    ]


def parse_line(body: bytes, received: datetime) -> list[StatusEvent]:
    data = _json(body)
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        raise ValueError("expected {destination, events: [...]}")
    return []  # LINE reports no delivery of push or multicast messages


def parse_sandbox(body: bytes, received: datetime) -> list[StatusEvent]:
    data = _json(body)
    if not isinstance(data, dict) or not isinstance(data.get("statuses"), list):
        raise ValueError("expected {statuses: [...]}")
    events = []
    for status in data["statuses"]:
        kind = (status or {}).get("status")
        if kind not in STATUS_RANK:
            raise ValueError(f"unknown status {kind!r}")
        stamp = status.get("timestamp")
        events.append(
            _event(
                "sandbox",
                status.get("id"),
                kind,
                _time(stamp, received),
                stamp,
                status.get("error_code"),
                status,
            )
        )
    return events


JSON_PARSERS: dict[str, Callable[[bytes, datetime], list[StatusEvent]]] = {
    "meta": parse_meta,
    "infobip": parse_infobip,
    "vonage": parse_vonage,
    "line": parse_line,
    "sandbox": parse_sandbox,
}


# --- inbound messages (replies, button taps, STOP) ---------------------------------------------


def _inbound(
    provider: str, message_id: Any, channel: str, sender: Any, when: datetime, kind: str, text: str
) -> InboundMessage:
    if not isinstance(message_id, str) or not message_id:
        raise ValueError(f"{provider} inbound message without a message id")
    if not isinstance(sender, str) or not sender.strip():
        raise ValueError(f"{provider} inbound message without a sender")
    number = sender.strip().removeprefix("whatsapp:")
    if number[:1].isdigit():
        number = "+" + number  # Meta's `from` is the number's digits
    return InboundMessage(
        provider=provider,
        event_key=f"{provider}|inbound|{message_id}",
        message_id=message_id,
        channel=channel,
        sender=number,
        occurred_at=when,
        kind=kind,
        text=text[:200],
    )


def _meta_text(message: dict[str, Any]) -> str:
    """What the rules read of a Meta message: its text, a button's text, a reply's title."""
    kind = message.get("type")
    if kind == "text":
        return str((message.get("text") or {}).get("body") or "")
    if kind == "button":
        button = message.get("button") or {}
        return str(button.get("text") or button.get("payload") or "")
    if kind == "interactive":
        reply = message.get("interactive") or {}
        chosen = reply.get("button_reply") or reply.get("list_reply") or {}
        return str(chosen.get("title") or "")
    return ""


_MESSAGES_KEY = re.compile(rb'"messages"\s*:')


def parse_meta_inbound(body: bytes, received: datetime) -> list[InboundMessage]:
    """The customers' messages of a Meta `messages` webhook (`value.messages`): text, button
    and interactive replies, media, reactions, locations, contacts, orders, system notices."""
    if not _MESSAGES_KEY.search(body):  # a status webhook names "messages" as its field
        return []
    data = _json(body)
    if not isinstance(data, dict) or not isinstance(data.get("entry"), list):
        raise ValueError("expected {object, entry: [...]}")
    found = []
    for entry in data["entry"]:
        for change in (entry or {}).get("changes") or []:
            value = (change or {}).get("value") or {}
            for message in value.get("messages") or []:
                kind = str(message.get("type") or "unknown")
                if kind in ("image", "video", "audio", "document", "sticker"):
                    kind = "media"
                found.append(
                    _inbound(
                        "meta",
                        message.get("id"),
                        "whatsapp",
                        message.get("from"),
                        _time(message.get("timestamp"), received),
                        kind,
                        _meta_text(message),
                    )
                )
    return found


def parse_twilio_inbound(params: Mapping[str, str], received: datetime) -> list[InboundMessage]:
    """A Twilio incoming message (SMS or WhatsApp): a form with a `Body` and no delivery
    status of ours (`SmsStatus` is `received`)."""
    status = params.get("SmsStatus") or params.get("MessageStatus")
    if "Body" not in params or status not in (None, "", "received"):
        return []
    sender = params.get("From") or ""
    channel = "whatsapp" if sender.startswith("whatsapp:") else "sms"
    media = params.get("NumMedia") not in (None, "", "0")
    kind, text = "media" if media and not params.get("Body") else "text", params.get("Body") or ""
    # A WhatsApp quick-reply tap (a template's "Stop promotions"): its button's text, read as
    # Meta's own webhooks are (`_meta_text`), so the tap opts out of marketing there too.
    button = params.get("ButtonText") or params.get("ButtonPayload")
    if button or params.get("MessageType") == "button":
        kind, text = "button", button or text
    return [
        _inbound(
            "twilio",
            params.get("MessageSid") or params.get("SmsMessageSid"),
            channel,
            sender,
            received,
            kind,
            text,
        )
    ]


def parse_line_inbound(body: bytes, received: datetime) -> list[InboundMessage]:
    """LINE's webhook events from users: messages (text, media, stickers, locations),
    follows (recorded, not consent), unfollows (the user blocked the account: an opt-out of
    every LINE message) and postbacks. Each event once, by its `webhookEventId`."""
    data = _json(body)
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        raise ValueError("expected {destination, events: [...]}")
    found = []
    for event in data["events"]:
        kind = str((event or {}).get("type") or "")
        user = ((event or {}).get("source") or {}).get("userId")
        if kind not in ("message", "follow", "unfollow", "postback") or not user:
            continue  # group joins, beacons, memberships…: not a customer's message
        text = ""
        if kind == "message":
            content = event.get("message") or {}
            kind = "text" if content.get("type") == "text" else "media"
            if content.get("type") in ("location", "sticker"):
                kind = str(content["type"])
            text = str(content.get("text") or "")
        elif kind == "postback":
            text = str((event.get("postback") or {}).get("data") or "")
        # Its id; an event of an older shape without one is known by who, what and when.
        ident = event.get("webhookEventId") or f"{kind}-{user}-{event.get('timestamp')}"
        message = _inbound(
            "line",
            str(ident),
            "line",
            str(user),
            _time(int(event.get("timestamp") or 0) / 1000 or None, received),
            kind,
            text,
        )
        if kind == "unfollow":
            message = dataclasses.replace(
                message, opt=OPT_OUT, purpose=ALL_PURPOSES, reason="unfollow"
            )
        found.append(message)
    return found


_INFOBIP_KINDS = {
    "TEXT": "text",
    "BUTTON": "button",
    "LOCATION": "location",
    "CONTACT": "contacts",
    "REACTION": "reaction",
    "ORDER": "order",
    **dict.fromkeys(("IMAGE", "DOCUMENT", "AUDIO", "VIDEO", "VOICE", "STICKER"), "media"),
}


def parse_infobip_inbound(body: bytes, received: datetime) -> list[InboundMessage]:
    """Infobip's inbound messages: WhatsApp (`results[].message`, every type of its spec) and
    SMS MO (`results[].text`). A result with a `receivedAt` and no `status` is one."""
    if b"receivedAt" not in body:
        return []
    data = _json(body)
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise ValueError("expected {results: [...]}")
    found = []
    for result in data["results"]:
        if not isinstance(result, dict) or "receivedAt" not in result or "status" in result:
            continue
        message = result.get("message")
        if isinstance(message, dict):
            kind = str(message.get("type") or "unknown")
            kind = _INFOBIP_KINDS.get(
                kind, "interactive" if kind.startswith("INTERACTIVE") else kind.lower()
            )
            text = str(message.get("text") or message.get("title") or "")
            channel = "whatsapp"
        else:
            kind, text, channel = "text", str(result.get("text") or ""), "sms"
        found.append(
            _inbound(
                "infobip",
                result.get("messageId"),
                channel,
                result.get("from"),
                _time(result.get("receivedAt"), received),
                kind,
                text,
            )
        )
    return found


_VONAGE_CHANNELS = {"sms": "sms", "mms": "sms", "whatsapp": "whatsapp", "viber_service": "viber"}


def parse_vonage_inbound(body: bytes, received: datetime) -> list[InboundMessage]:
    """A Vonage inbound message (Messages API `inbound-message`): SMS, MMS, WhatsApp (text,
    media, a reply to buttons or a list) or Viber; a status report has a `status` instead."""
    if b"message_uuid" not in body:
        return []
    data = _json(body)
    if not isinstance(data, dict) or "status" in data or "from" not in data:
        return []
    named = str(data.get("message_type") or "text")
    kind = {"text": "text", "reply": "interactive", "button": "button"}.get(named, named)
    if named in ("image", "audio", "video", "file", "sticker", "vcard"):
        kind = "media"
    reply = data.get("reply") or data.get("button") or {}
    text = str(data.get("text") or reply.get("title") or reply.get("text") or "")
    return [
        _inbound(
            "vonage",
            data.get("message_uuid"),
            _VONAGE_CHANNELS.get(str(data.get("channel")), str(data.get("channel"))),
            str(data.get("from") or ""),
            _time(data.get("timestamp"), received),
            kind,
            text,
        )
    ]
