"""Sample messages of each channel, for the connector contract suite (`ContractCase`) and the
docs: the numbers are fictional and never hit the sandbox's "not on WhatsApp" rule (digits
ending in 13), and each factory's `i` makes the recipient and the key unique."""

from __future__ import annotations

from cdp_activation.connectors.base import OutboundMessage, TemplateRef

BAD_NUMBER = "12345"  # not a phone number anywhere: every provider refuses this recipient


def _key(i: int) -> str:
    return f"contract|2025-01-01|{i}|initial"


def whatsapp(i: int) -> OutboundMessage:
    return OutboundMessage(
        key=_key(i),
        to=f"+4479{i:07d}0",
        channel="whatsapp",
        template=TemplateRef("winback_offer", "en", ("Ana", "45", f"C{i}")),
    )


def sms(i: int) -> OutboundMessage:
    return OutboundMessage(
        key=_key(i), to=f"+4479{i:07d}0", channel="sms", body=f"Hi {i}, we miss you!"
    )


def viber(i: int) -> OutboundMessage:
    return OutboundMessage(
        key=_key(i),
        to=f"+38050{i:06d}0",
        channel="viber",
        body=f"Hi {i}, 20% off this week",
        purpose="marketing",
    )


def braze(i: int) -> OutboundMessage:
    """An API-triggered Braze campaign for one user, trigger properties by column name."""
    return OutboundMessage(
        key=_key(i),
        to=f"+4479{i:07d}0",
        channel="whatsapp",
        template=TemplateRef(
            "winback_campaign", "en", ("Ana", "45", f"C{i}"), ("first_name", "days", "code")
        ),
        customer_id=f"customer-{i}",
    )


def braze_handoff(i: int) -> OutboundMessage:
    """A customer handed to a Braze Canvas: the attribute's value (the decision's time) where a
    template has its language, a property by column name, a subscription group."""
    return OutboundMessage(
        key=_key(i),
        to=f"+4479{i:07d}0",
        channel="whatsapp",
        template=TemplateRef(
            "audience:cdp_contract_at:contract_group",
            "2026-12-05T10:00:00Z",
            ("Ana",),
            ("first_name",),
        ),
        customer_id=f"customer-{i}",
    )


def line(i: int) -> OutboundMessage:
    """A LINE text for one user id; every user gets the same text, so a batch is a multicast."""
    return OutboundMessage(
        key=_key(i),
        to=f"U{i:032x}",
        channel="line",
        body="We miss you! 20% off with code BACK20",
        customer_id=f"customer-{i}",
    )


def whatsapp_or_sms(i: int) -> OutboundMessage:
    """Both channels in one batch: a connector handling both must split or cope."""
    return whatsapp(i) if i % 2 == 0 else sms(i)


def rcs(i: int) -> OutboundMessage:
    return OutboundMessage(
        key=_key(i), to=f"+4479{i:07d}0", channel="rcs", body=f"Hi {i}, your offer is inside"
    )


def whatsapp_sms_viber(i: int) -> OutboundMessage:
    return (whatsapp, sms, viber)[i % 3](i)


def kakao(i: int) -> OutboundMessage:
    """A KakaoTalk AlimTalk message: the template code and its registered text filled in."""
    return OutboundMessage(
        key=_key(i),
        to=f"+821012{i:06d}",
        channel="kakao",
        template=TemplateRef("order_shipped_01", "ko"),
        body=f"Hi Ana, your order A{i} has shipped.",
    )


def wechat(i: int) -> OutboundMessage:
    """A WeChat Official Account template message to one follower's openid (28 characters)."""
    return OutboundMessage(
        key=_key(i),
        to=f"oWeChat{i:021d}",
        channel="wechat",
        template=TemplateRef("order_shipped_tmpl_001", "zh_CN", ("Rain jacket", f"A{i}")),
        customer_id=f"customer-{i}",
    )


def infobip_channels(i: int) -> OutboundMessage:
    """Every channel the Infobip connector sends, in turn."""
    return (whatsapp, sms, viber, rcs, kakao)[i % 5](i)
