"""Replies count: customers' messages are received and kept, STOP and the providers' own
opt-out answers stop the next run, a planned send to them is cancelled, and a reply opens the
24-hour WhatsApp window. Real receiver over HTTP, real ledgers, Meta's own spec examples."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import polars as pl
import pytest
import sqlalchemy as sa
import yaml

from cdp_activation.activation.run import refusal_codes, with_replies
from cdp_activation.contracts import InboundMessage, Outcome, SendResult
from cdp_activation.feedback.receiver import WebhookServer
from cdp_activation.ledger import ClaimRequest, Ledger, Settlement
from cdp_activation.ledger.base import as_time
from cdp_activation.policy import opt_out
from cdp_activation.policy.engine import decide
from cdp_activation.spec import ChannelPlanSpec
from test_webhooks import SECRETS, WRONG, post, signed

META_SPEC = (
    Path(__file__).resolve().parents[2]
    / "shared/vendor-specs/meta/business-messaging-api_v23.0.yaml"
)
NOW = datetime.now(UTC)
NO_SUPPRESSIONS = pl.DataFrame(schema={"phone_e164": pl.String, "channel": pl.String})


@pytest.fixture
def receiver(ledger: Ledger) -> Iterator[WebhookServer]:
    with WebhookServer(ledger, SECRETS) as server:
        yield server


def sent(ledger: Ledger, channel: str, connector: str, customers: dict[str, str]) -> None:
    """Accepted sends to `customers` (id -> number), as delivery records them."""
    plan = pl.DataFrame(
        {
            "customer_id": list(customers),
            "phone_e164": list(customers.values()),
            "channel": [channel] * len(customers),
            "connector": [connector] * len(customers),
            "step": ["initial"] * len(customers),
            "template_name": [None] * len(customers),
            "template_language": [None] * len(customers),
            "variables": [None] * len(customers),
            "body": ["Hi"] * len(customers),
        },
        schema_overrides={"template_name": pl.String, "template_language": pl.String},
    )
    ledger.plan("winback", "2026-12-01", plan)
    rows = ledger.pending("winback", "2026-12-01")
    ledger.mark_in_flight([r.id for r in rows])
    ledger.record(
        [(r.id, SendResult(r.idempotency_key, Outcome.SENT, f"m{r.id}"), 1) for r in rows]
    )


def planned_later(
    ledger: Ledger, channel: str, customer: str, number: str, purpose: str, partition: str
) -> None:
    """A send of another activation, planned for later (deferred by quiet hours)."""
    plan = pl.DataFrame(
        {
            "customer_id": [customer],
            "phone_e164": [number],
            "channel": [channel],
            "connector": ["twilio"],
            "step": ["initial"],
            "body": ["Back in stock"],
            "template_name": [None],
            "template_language": [None],
            "variables": [None],
            "not_before": [NOW + timedelta(hours=8)],
        },
        schema_overrides={"template_name": pl.String, "template_language": pl.String},
    )
    ledger.plan("restock", partition, plan, purpose=purpose)


def inbound(
    text: str, sender: str, channel: str = "sms", kind: str = "text", n: int = 1
) -> InboundMessage:
    return opt_out.classify(
        InboundMessage(
            "twilio", f"twilio|inbound|SM{n}", f"SM{n}", channel, sender, NOW, kind, text
        )
    )


def states(ledger: Ledger, activation: str) -> list[str]:
    return ledger.rows(activation)["state"].to_list()


def test_every_inbound_example_of_meta_s_spec_is_verified_and_stored_once(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    if not META_SPEC.is_file():
        pytest.skip(f"{META_SPEC} is not beside the checkout (../shared/vendor-specs)")
    spec = yaml.safe_load(META_SPEC.read_text())
    examples = spec["paths"]["/whatsapp/webhooks"]["post"]["requestBody"]["content"][
        "application/json"
    ]["examples"]
    url = f"{receiver.url}/webhooks/meta"
    kinds: dict[str, str] = {}  # each message id's kind, as first seen
    for name, example in examples.items():
        body = json.dumps(example["value"]).encode()
        assert post(url, signed("meta", WRONG, body)).status_code == 401, name
        answer = post(url, signed("meta", SECRETS, body))
        assert answer.status_code == 200, (name, answer.text)
        value = example["value"]["entry"][0]["changes"][0]["value"]
        for message in value.get("messages") or []:
            kind = message["type"]
            kinds.setdefault(message["id"], "media" if kind == "image" else kind)
        assert post(url, signed("meta", SECRETS, body)).status_code == 200  # a redelivery
    with ledger.engine.connect() as con:
        rows = con.execute(sa.text("SELECT kind, customer_id, summary FROM inbound_events")).all()
    # Each message once, by its id (the spec's examples reuse some ids), none twice.
    assert len(kinds) >= 10 and len(rows) == len(kinds)
    assert sorted(r.kind for r in rows) == sorted(kinds.values())
    assert all(r.customer_id is None for r in rows)  # numbers the ledger never sent to
    bodies = {"Does it come in another color?", "Sheena Nelson"}
    assert not any(b in r.summary for r in rows for b in bodies)  # no message text is kept


def test_stop_opts_out_at_once_cancels_what_is_planned_and_start_lifts_only_that(
    ledger: Ledger,
) -> None:
    sent(ledger, "sms", "twilio", {"c1": "+447700900101", "c2": "+447700900102"})
    planned_later(ledger, "sms", "c1", "+447700900101", "transactional", "2026-12-02")
    planned_later(ledger, "whatsapp", "c1", "+447700900101", "marketing", "2026-12-03")

    stop = inbound("  Stop! ", "+447700900101")
    assert (stop.opt, stop.purpose, stop.reason) == ("out", "all", "keyword")
    assert inbound("don't stop the offers", "+447700900101").opt is None
    assert ledger.replies_seen() == (0, 0)
    written = ledger.record_inbound([stop, stop])
    # What the demo watches while reports come in: it moves with each reply and opt-out.
    seen = ledger.replies_seen()
    assert seen[0] > 0 and seen[1] > 0
    assert ledger.reply_counts("winback", "2026-12-01") == {"replied": 1, "opted_out": 1}
    assert (written.received, written.duplicates, written.opted_out) == (2, 1, 1)
    assert written.cancelled == 1  # the deferred SMS; the WhatsApp send is another channel
    assert sorted(states(ledger, "restock")) == ["cancelled", "planned"]
    assert ledger.cancelled_by_reason("restock", "2026-12-02") == {"sms_opted_out": 1}
    assert ledger.opt_outs().rows() == [("c1", "sms", "all")]

    again = ledger.record_inbound([stop])
    assert (again.duplicates, again.opted_out) == (1, 0)  # a redelivered webhook changes nothing
    assert ledger.replies_seen() == seen

    unknown = ledger.record_inbound([inbound("STOP", "+447700900999", n=2)])
    assert (unknown.unmatched, unknown.opted_out) == (1, 0)

    start = ledger.record_inbound([inbound("unstop", "+447700900101", n=3)])
    assert start.opted_in == 1
    assert ledger.opt_outs().is_empty()
    assert ledger.replies_seen()[0] > seen[0]  # a lift comes with the reply that asked for it
    assert ledger.reply_counts("winback", "2026-12-01") == {"replied": 1, "opted_out": 0}


def _two_on_the_wire(ledger: Ledger, whole_request: bool) -> tuple[str, list[Any]]:
    """Customers c1 and c2 (who were messaged before) have their restock SMS claimed by a
    worker: in flight, as one request kept whole or not."""
    sent(ledger, "sms", "twilio", {"c1": "+447700900101", "c2": "+447700900102"})
    for customer, number in (("c1", "+447700900101"), ("c2", "+447700900102")):
        planned_later(ledger, "sms", customer, number, "marketing", "2026-12-02")
    worker = ledger.register_worker("restock", "2026-12-02", "initial", lease_seconds=60)
    wanted = [ClaimRequest("twilio", 2, whole_request)]
    later = NOW + timedelta(hours=9)
    [rows] = ledger.claim(worker, "restock", "2026-12-02", "initial", wanted, later)
    return worker, rows


def test_a_stop_while_the_message_is_on_the_wire_holds_when_the_provider_asks_to_retry(
    ledger: Ledger,
) -> None:
    """STOP arrives while the customer's message is in flight (nothing planned to cancel);
    the provider then answers 429: the message is not put back to be tried again."""
    worker, rows = _two_on_the_wire(ledger, whole_request=False)
    assert ledger.record_inbound([inbound("STOP", "+447700900101", n=5)]).cancelled == 0
    ledger.settle(worker, [Settlement(r.id, "planned", error_code="http_429") for r in rows])
    after = ledger.rows("restock", "2026-12-02").sort("customer_id")
    assert after.select("customer_id", "state").rows() == [("c1", "cancelled"), ("c2", "planned")]
    assert after["error_code"].to_list() == ["sms_opted_out", "http_429"]


def test_a_stop_while_a_kept_request_is_on_the_wire_gives_the_request_up(
    ledger: Ledger,
) -> None:
    """The same through a provider that de-duplicates whole requests: its answer was lost,
    so the request would go out again whole; with a STOP from one of its customers it is
    given up (the customer who said stop is not messaged again, the rest are `unknown`), as
    a STOP about a planned request does."""
    worker, rows = _two_on_the_wire(ledger, whole_request=True)
    ledger.record_inbound([inbound("STOP", "+447700900101", n=7)])
    ledger.settle(worker, [Settlement(r.id, "planned", uncertain=True) for r in rows])
    after = ledger.rows("restock", "2026-12-02").sort("customer_id")
    assert after.select("customer_id", "state").rows() == [("c1", "cancelled"), ("c2", "unknown")]


def test_a_stop_between_the_decision_and_the_plan_cancels_the_planned_row(
    ledger: Ledger,
) -> None:
    """The policy read the opt-outs, then STOP came, then the run planned its rows: the row
    planned for the customer who said stop is cancelled before anything is claimed."""
    sent(ledger, "sms", "twilio", {"c1": "+447700900101"})
    decided = datetime.now(UTC)
    ledger.record_inbound([inbound("STOP", "+447700900101", n=6)])
    planned_later(ledger, "sms", "c1", "+447700900101", "marketing", "2026-12-02")
    cancelled = ledger.cancel_recently_opted_out("restock", "2026-12-02", "initial", decided)
    assert cancelled == 1 and states(ledger, "restock") == ["cancelled"]


def test_a_start_delivered_after_a_later_stop_does_not_lift_it(ledger: Ledger) -> None:
    """The customer wrote START, then STOP a minute later; the STOP's webhook came first and
    the START's after it (a provider's retry): the customer stays opted out."""
    sent(ledger, "sms", "twilio", {"c1": "+447700900101"})
    stop = dataclasses.replace(inbound("STOP", "+447700900101", n=1), occurred_at=NOW)
    start = inbound("START", "+447700900101", n=2)
    start = dataclasses.replace(start, occurred_at=NOW - timedelta(minutes=1))
    ledger.record_inbound([stop])
    assert ledger.record_inbound([start]).opted_in == 0
    assert ledger.opt_outs().rows() == [("c1", "sms", "all")]
    # A START written after it lifts it.
    later = dataclasses.replace(inbound("START", "+447700900101", n=3), occurred_at=NOW)
    assert ledger.record_inbound([later]).opted_in == 1
    assert ledger.opt_outs().is_empty()


def test_a_stop_promotions_tap_stops_marketing_only_and_start_does_not_lift_it(
    ledger: Ledger,
) -> None:
    sent(ledger, "whatsapp", "meta_whatsapp", {"c1": "+447700900201"})
    tap = opt_out.classify(
        InboundMessage(
            "meta",
            "meta|inbound|w1",
            "w1",
            "whatsapp",
            "+447700900201",
            NOW,
            "button",
            "Stop promotions",
        )
    )
    assert (tap.opt, tap.purpose, tap.reason) == ("out", "marketing", "button")
    unread = dataclasses.replace(tap, opt=None, purpose="all", reason="")
    portuguese = dataclasses.replace(unread, text="Parar promoções")  # accents are folded
    assert opt_out.classify(portuguese).purpose == "marketing"
    french = dataclasses.replace(unread, text="Arrêt!", kind="text")
    assert (opt_out.classify(french).opt, opt_out.classify(french).purpose) == ("out", "all")
    ledger.record_inbound([tap])
    ledger.record_inbound(
        [
            opt_out.classify(
                InboundMessage(
                    "meta",
                    "meta|inbound|w2",
                    "w2",
                    "whatsapp",
                    "+447700900201",
                    NOW,
                    "text",
                    "START",
                )
            )
        ]
    )
    assert ledger.opt_outs().rows() == [("c1", "whatsapp", "marketing")]


def test_a_mexican_customer_s_stop_from_whatsapp_s_old_spelling_of_the_number_opts_out(
    ledger: Ledger,
) -> None:
    """WhatsApp sends a Mexican mobile's replies from 52 1 + ten digits (`from`), the ledger
    sent to +52 + ten digits (E.164 since 2019): a STOP from there is that customer's."""
    sent(
        ledger,
        "whatsapp",
        "meta_whatsapp",
        {"mx1": "+525512345678", "mx2": "+5215587654321", "mx3": "+525587654321"},
    )
    stops = [
        opt_out.classify(
            InboundMessage("meta", f"meta|inbound|{n}", n, "whatsapp", sender, NOW, "text", "STOP")
        )
        for n, sender in (("m1", "+5215512345678"), ("m2", "+5215587654321"))
    ]
    # One webhook with both spellings of mx3's number: each sender is matched.
    stops.append(
        opt_out.classify(
            InboundMessage(
                "meta", "meta|inbound|m3", "m3", "whatsapp", "+525587654321", NOW, "text", "STOP"
            )
        )
    )
    written = ledger.record_inbound(stops)
    assert written.unmatched == 0
    # The number as written wins where the ledger sent to it too: mx2, not mx3.
    assert sorted(ledger.opt_outs().rows()) == [
        ("mx1", "whatsapp", "all"),
        ("mx2", "whatsapp", "all"),
        ("mx3", "whatsapp", "all"),
    ]


def test_a_provider_s_opted_out_answer_becomes_an_opt_out_once(ledger: Ledger) -> None:
    sent(ledger, "whatsapp", "meta_whatsapp", {"c1": "+447700900301"})
    plan = pl.DataFrame(
        {
            "customer_id": ["c2"],
            "phone_e164": ["+447700900302"],
            "channel": ["sms"],
            "connector": ["twilio"],
            "step": ["initial"],
            "body": ["Hi"],
            "template_name": [None],
            "template_language": [None],
            "variables": [None],
        },
        schema_overrides={"template_name": pl.String, "template_language": pl.String},
    )
    ledger.plan("winback", "2026-12-03", plan)
    [row] = ledger.pending("winback", "2026-12-03")
    ledger.mark_in_flight([row.id])
    refused = SendResult(row.idempotency_key, Outcome.FAILED, error_code="21610")
    ledger.record([(row.id, refused, 1)])
    codes = refusal_codes()
    assert codes[("twilio", "21610")] == "all"
    assert codes[("meta_whatsapp", "131050")] == "marketing"
    assert ledger.suppress_refusals(codes) == 1
    assert ledger.suppress_refusals(codes) == 0  # once, however often a run asks
    assert ledger.opt_outs().rows() == [("c2", "sms", "all")]


def test_the_policy_applies_an_opt_out_before_the_warehouse_s_consent() -> None:
    plan = ChannelPlanSpec.model_validate(
        {
            "purpose": "marketing",
            "steps": [
                {"channel": "whatsapp", "connector": "meta_whatsapp", "body": "Hi {first_name}"},
                {"channel": "sms", "connector": "twilio", "body": "Hi {first_name}"},
            ],
        }
    )
    audience = pl.DataFrame(
        {
            "customer_id": [1, 2, 3],
            "phone": ["+447911123401", "+447911123402", "+447911123403"],
            "country": ["GB"] * 3,
            "timezone": ["Europe/London"] * 3,
            "first_name": ["Ann", "Bo", "Cy"],
            "whatsapp_marketing_consent": [True, True, False],
            "sms_marketing_consent": [True, False, True],
            "whatsapp_last_inbound_at": [NOW - timedelta(days=3)] * 3,
        }
    )
    opted = pl.DataFrame(
        {
            "customer_id": ["1", "2", "3"],
            "channel": ["whatsapp", "whatsapp", "sms"],
            "purpose": ["marketing", "all", "all"],
        }
    )
    noon = NOW.replace(hour=12, minute=0)
    # A reply an hour ago opens the 24-hour window that the warehouse does not know of yet.
    replied = with_replies(
        audience,
        pl.DataFrame(
            {"customer_id": ["1", "2", "3"], "last_inbound_at": [noon - timedelta(hours=1)] * 3},
            schema_overrides={"last_inbound_at": pl.Datetime("us", "UTC")},
        ),
    )
    decided = decide(
        replied, plan, now=noon, suppressions=NO_SUPPRESSIONS, catalogs={}, opt_outs=opted
    ).frame
    by_id = {r["customer_id"]: r for r in decided.iter_rows(named=True)}
    assert by_id[1]["whatsapp_reason"] == "whatsapp_opted_out"  # though consent says yes
    assert by_id[1]["channel"] == "sms"  # only WhatsApp marketing was stopped
    assert by_id[2]["reason"] == "whatsapp_opted_out+sms_no_consent"
    assert by_id[3]["reason"] == "whatsapp_no_consent+sms_opted_out"
    # Nobody opted out: the free-form WhatsApp goes, inside the window the reply opened.
    nobody = decide(replied, plan, now=noon, suppressions=NO_SUPPRESSIONS, catalogs={}).frame
    assert nobody.filter(pl.col("customer_id") == 1)["channel"].to_list() == ["whatsapp"]
    stale = decide(audience, plan, now=noon, suppressions=NO_SUPPRESSIONS, catalogs={}).frame
    assert stale.filter(pl.col("customer_id") == 1)["whatsapp_reason"].to_list() == [
        "whatsapp_outside_window"
    ]


def test_a_twilio_stop_through_the_receiver_is_signed_stored_and_applied(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    sent(ledger, "sms", "twilio", {"c9": "+447700900901"})
    url = f"{receiver.url}/webhooks/twilio"
    form = urlencode(
        {
            "MessageSid": "SMin1",
            "SmsStatus": "received",
            "From": "+447700900901",
            "To": "+15005550006",
            "Body": "STOP",
        }
    ).encode()
    assert post(url, signed("twilio", WRONG, form, url)).status_code == 401
    assert ledger.opt_outs().is_empty()
    answer = post(url, signed("twilio", SECRETS, form, url))
    assert answer.status_code == 200, answer.text
    assert ledger.opt_outs().rows() == [("c9", "sms", "all")]
    with ledger.engine.connect() as con:
        summary = con.execute(sa.text("SELECT summary FROM inbound_events")).scalar_one()
    assert summary == "text: opt-out (keyword) STOP"


def test_a_stop_promotions_tap_through_twilio_whatsapp_stops_marketing_there(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    """Twilio posts a WhatsApp quick-reply tap as a form with the button's text
    (`ButtonText`, `ButtonPayload`, `MessageType=button`): the template's "Stop promotions"
    is an opt-out of marketing, as Meta's own webhook of the same tap is."""
    sent(ledger, "whatsapp", "twilio", {"c7": "+447700900707"})
    url = f"{receiver.url}/webhooks/twilio"
    form = urlencode(
        {
            "MessageSid": "SMtap1",
            "SmsStatus": "received",
            "From": "whatsapp:+447700900707",
            "To": "whatsapp:+15005550006",
            "Body": "Stop promotions",
            "ButtonText": "Stop promotions",
            "ButtonPayload": "stop_promotions",
            "MessageType": "button",
        }
    ).encode()
    answer = post(url, signed("twilio", SECRETS, form, url))
    assert answer.status_code == 200, answer.text
    assert ledger.opt_outs().rows() == [("c7", "whatsapp", "marketing")]


def test_a_burst_of_replies_is_stored_once_each_and_every_stop_applied_before_its_200(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    """A campaign's replies arrive together: 400 customers write back at once (every fourth
    says STOP; a tenth of the webhooks come twice, as a provider retries). Each is answered
    200 only once stored, each message is kept once, each STOP is an opt-out that cancelled
    the customer's deferred send, and the receiver wrote them in far fewer transactions than
    requests (they share commits, as status reports do)."""
    import asyncio

    from cdp_activation.delivery.transport import make_client

    n = 400
    customers = {f"c{i}": f"+4477009{i:05d}" for i in range(n)}
    sent(ledger, "sms", "twilio", customers)
    stoppers = [f"c{i}" for i in range(0, n, 4)]
    for customer in stoppers[:20]:
        planned_later(ledger, "sms", customer, customers[customer], "marketing", "2026-12-02")
    url = f"{receiver.url}/webhooks/twilio"

    def reply(i: int) -> bytes:
        text = "STOP" if i % 4 == 0 else "when does the offer end?"
        number = customers[f"c{i}"]
        fields = {"MessageSid": f"SMr{i}", "SmsStatus": "received", "From": number}
        return urlencode({**fields, "To": "+15005550006", "Body": text}).encode()

    requests = [signed("twilio", SECRETS, reply(i), url) for i in range(n)]
    requests += requests[: n // 10]  # retried deliveries of the same messages

    async def fire() -> list[int]:
        async with make_client(timeout=60, max_in_flight=100) as client:
            answers = await asyncio.gather(
                *(client.post(url, content=r.body, headers=r.headers) for r in requests)
            )
        return [a.status_code for a in answers]

    assert set(asyncio.run(fire())) == {200}
    with ledger.engine.connect() as con:
        kept = con.execute(sa.text("SELECT count(*), count(customer_id) FROM inbound_events"))
        assert tuple(kept.one()) == (n, n)
    assert sorted(ledger.opt_outs()["customer_id"].to_list()) == sorted(stoppers)
    assert states(ledger, "restock") == ["cancelled"] * 20
    assert receiver.app.state.replies.transactions < len(requests) / 4


def test_a_webhook_the_ledger_cannot_hold_fails_alone_not_the_burst_it_came_with(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    """Among 60 concurrent replies and 60 status reports, one of each is signed but carries
    a message id longer than the ledger's column (PostgreSQL refuses it; SQLite stores it).
    The shared transaction it was in fails, and is made again caller by caller: every other
    webhook is stored and answered 200, and the one that cannot be stored is a 400 (sending
    it again would not help), not a 500 for everyone (which the providers would retry, with
    the bad one among them, for days)."""
    import asyncio

    from cdp_activation.delivery.transport import make_client

    twilio, meta = f"{receiver.url}/webhooks/twilio", f"{receiver.url}/webhooks/meta"
    too_long = 400  # event keys hold 300 characters

    def reply(i: int) -> bytes:
        sid = "SM" + "x" * too_long if i == 30 else f"SMq{i}"
        fields = {"MessageSid": sid, "SmsStatus": "received", "From": f"+4477008{i:05d}"}
        return urlencode({**fields, "To": "+15005550006", "Body": "hi"}).encode()

    def report(i: int) -> bytes:
        wamid = "wamid." + "y" * too_long if i == 30 else f"wamid.q{i}"
        status = {"id": wamid, "status": "delivered", "timestamp": "1764979200"}
        change = {"field": "messages", "value": {"statuses": [status]}}
        return json.dumps({"entry": [{"id": "1", "changes": [change]}]}).encode()

    requests = [(twilio, signed("twilio", SECRETS, reply(i), twilio)) for i in range(60)]
    requests += [(meta, signed("meta", SECRETS, report(i))) for i in range(60)]

    async def fire() -> list[int]:
        async with make_client(timeout=60, max_in_flight=120) as client:
            answers = await asyncio.gather(
                *(client.post(url, content=r.body, headers=r.headers) for url, r in requests)
            )
        return [a.status_code for a in answers]

    codes = asyncio.run(fire())
    refused = 400 if ledger.url.startswith("postgresql") else 200
    assert [codes[30], codes[90]] == [refused, refused], codes
    assert codes[:30] + codes[31:90] + codes[91:] == [200] * 118, codes
    stored = 60 if refused == 200 else 59
    with ledger.engine.connect() as con:
        assert con.execute(sa.text("SELECT count(*) FROM inbound_events")).scalar_one() == stored
        assert con.execute(sa.text("SELECT count(*) FROM status_events")).scalar_one() == stored


def test_an_erased_customer_s_opt_out_outlives_the_erasure(ledger: Ledger) -> None:
    from cdp_activation.retention import erase

    sent(ledger, "sms", "twilio", {"c1": "+447700900501", "c2": "+447700900502"})
    ledger.record_inbound([inbound("STOP", "+447700900501")])
    erase(ledger, ["c1"])
    [(customer, channel, purpose)] = ledger.opt_outs().rows()
    assert customer.startswith("erased-") and (channel, purpose) == ("sms", "all")
    with ledger.engine.connect() as con:
        ids = set(con.execute(sa.text("SELECT customer_id FROM inbound_events")).scalars())
    assert ids == {customer}


def test_replies_and_opt_outs_reach_the_warehouse_once_each(ledger: Ledger, tmp_path: Path) -> None:
    import duckdb

    from cdp_activation.feedback.send_log import export_replies

    url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    sent(ledger, "sms", "twilio", {"c1": "+447700900601", "c2": "+447700900602"})
    ledger.record_inbound(
        [inbound("STOP", "+447700900601"), inbound("Thanks", "+447700900602", n=2)]
    )
    first = export_replies(ledger, url)
    assert {t: e.exported for t, e in first.items()} == {
        "activation_inbound_log": 2,
        "activation_suppressions": 1,
    }
    ledger.record_inbound([inbound("START", "+447700900601", n=3)])  # lifts the opt-out
    export_replies(ledger, url)
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        log = con.execute(
            "SELECT customer_id, kind, opt, summary FROM activation_inbound_log ORDER BY inbound_id"
        ).fetchall()
        suppressions = con.execute(
            "SELECT customer_id, channel, purpose, reason, lifted_at IS NOT NULL "
            "FROM activation_suppressions"
        ).fetchall()
    assert [(c, k, o) for c, k, o, _ in log] == [
        ("c1", "text", "out"),
        ("c2", "text", None),
        ("c1", "text", "in"),
    ]
    assert not any("Thanks" in s for *_, s in log)  # no message text leaves the ledger
    assert suppressions == [("c1", "sms", "all", "keyword", True)]  # one row, now lifted


LINE_WEBHOOK_SPEC = META_SPEC.parents[1] / "line" / "webhook.yml"


def line_event(kind: str, user: str, n: int, **extra: object) -> dict[str, object]:
    return {
        "type": kind,
        "source": {"type": "user", "userId": user},
        "timestamp": int(NOW.timestamp() * 1000),
        "mode": "active",
        "webhookEventId": f"01HLINE{n:019d}",
        "deliveryContext": {"isRedelivery": False},
        **extra,
    }


def test_line_messages_follows_and_an_unfollow_are_kept_and_the_unfollow_opts_out(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    from openapi_core import OpenAPI

    from test_vendor_specs import to_spec_request

    user, other = f"U{1:032x}", f"U{2:032x}"
    plan = pl.DataFrame(
        {
            "customer_id": ["c1"],
            "recipient": [user],
            "phone_e164": [None],
            "channel": ["line"],
            "connector": ["line"],
            "step": ["initial"],
            "body": ["Hi"],
            "template_name": [None],
            "template_language": [None],
            "variables": [None],
        },
        schema_overrides={
            "template_name": pl.String,
            "template_language": pl.String,
            "phone_e164": pl.String,
        },
    )
    ledger.plan("winback", "2026-12-04", plan)
    reply = {
        "replyToken": "r",
        "message": {"id": "1", "type": "text", "text": "Thanks!", "quoteToken": "q"},
    }
    body = json.dumps(
        {
            "destination": "U" + "f" * 32,
            "events": [
                line_event("message", user, 1, **reply),
                line_event("follow", other, 2, replyToken="r", follow={"isUnblocked": False}),
                line_event("unfollow", user, 3),
            ],
        }
    ).encode()
    url = f"{receiver.url}/webhooks/line"
    if LINE_WEBHOOK_SPEC.is_file():  # the body is LINE's own shape
        request = httpx.Request(
            "POST",
            f"{receiver.url}/line/callback",
            content=body,
            headers={"content-type": "application/json"},
        )
        OpenAPI.from_file_path(str(LINE_WEBHOOK_SPEC)).validate_request(
            to_spec_request(request, "/line", "https://example.com")
        )
    assert post(url, signed("line", WRONG, body)).status_code == 401
    assert post(url, signed("line", SECRETS, body)).status_code == 200
    with ledger.engine.connect() as con:
        kept = con.execute(
            sa.text("SELECT kind, customer_id FROM inbound_events ORDER BY id")
        ).all()
    assert [tuple(r) for r in kept] == [("text", "c1"), ("follow", None), ("unfollow", "c1")]
    assert ledger.opt_outs().rows() == [("c1", "line", "all")]
    assert states(ledger, "winback") == ["cancelled"]  # the planned LINE message never goes


def test_every_inbound_example_of_infobip_s_specs_is_kept_and_an_sms_stop_opts_out(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    specs = META_SPEC.parents[1] / "infobip"
    if not specs.is_dir():
        pytest.skip(f"{specs} is not beside the checkout (../shared/vendor-specs)")
    bodies = []
    for name, hook in (
        ("infobip-whatsapp-openapi.json", "receive-inbound-whatsapp-messages"),
        ("infobip-sms-openapi.json", "receive-inbound-sms-messages"),
    ):
        operation = next(iter(json.loads((specs / name).read_text())["webhooks"][hook].values()))
        examples = operation["requestBody"]["content"]["application/json"]["examples"]
        bodies += [example["value"] for example in examples.values()]
    sent(ledger, "sms", "infobip", {"c7": "+385916242493"})
    stop = {
        "results": [{"messageId": "mo-stop", "from": "385916242493", "to": "385921004026",
                     "text": "STOP", "cleanText": "", "keyword": "STOP",
                     "receivedAt": "2026-12-05T10:00:00.000+0000", "smsCount": 1}],
        "messageCount": 1, "pendingMessageCount": 0,
    }  # fmt: skip
    url = f"{receiver.url}/webhooks/infobip"
    ids = set()
    for body in [*bodies, stop]:
        raw = json.dumps(body).encode()
        assert post(url, signed("infobip", WRONG, raw)).status_code == 401
        assert post(url, signed("infobip", SECRETS, raw)).status_code == 200
        ids |= {r["messageId"] for r in body["results"]}
    with ledger.engine.connect() as con:
        kept = con.execute(sa.text("SELECT count(*) FROM inbound_events")).scalar_one()
    assert len(bodies) >= 20 and kept == len(ids)
    assert ledger.opt_outs().rows() == [("c7", "sms", "all")]


def test_vonage_inbound_messages_are_kept_and_stop_opts_out(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    sent(ledger, "sms", "vonage", {"c8": "+447700900801"})
    sent_at = NOW.isoformat()
    bodies = [  # the spec's inbound-message shapes (inboundMessageSMS, WhatsApp Text, Reply)
        {"channel": "sms", "message_uuid": "v-1", "to": "447700900002", "from": "447700900801",
         "timestamp": sent_at, "text": "STOP", "message_type": "text"},
        {"channel": "whatsapp", "message_uuid": "v-2", "to": "447700900001",
         "from": "447700900899", "timestamp": sent_at, "message_type": "text", "text": "Hi"},
        {"channel": "whatsapp", "message_uuid": "v-3", "to": "447700900001",
         "from": "447700900899", "timestamp": sent_at, "message_type": "reply",
         "reply": {"id": "row1", "title": "9am"}},
    ]  # fmt: skip
    url = f"{receiver.url}/webhooks/vonage"
    for body in bodies:
        raw = json.dumps(body).encode()
        assert post(url, signed("vonage", WRONG, raw)).status_code == 401
        assert post(url, signed("vonage", SECRETS, raw)).status_code == 200
    with ledger.engine.connect() as con:
        kept = con.execute(sa.text("SELECT channel, kind FROM inbound_events ORDER BY id")).all()
    assert [tuple(r) for r in kept] == [
        ("sms", "text"),
        ("whatsapp", "text"),
        ("whatsapp", "interactive"),
    ]
    assert ledger.opt_outs().rows() == [("c8", "sms", "all")]


def test_the_send_log_asset_counts_replies_and_opt_outs_per_activation(
    ledger: Ledger, tmp_path: Path
) -> None:
    import dagster as dg

    from cdp_activation.components.resources import LedgerResource, SendLogResource
    from cdp_activation.defs.send_log import send_log

    sent(ledger, "sms", "twilio", {"c1": "+447700900701", "c2": "+447700900702"})
    ledger.record_inbound([inbound("STOP", "+447700900701"), inbound("ok", "+447700900702", n=2)])
    result = dg.materialize(
        [send_log],
        resources={
            "ledger": LedgerResource(url=ledger.url),
            "send_log": SendLogResource(url=f"duckdb:///{tmp_path / 'w.duckdb'}"),
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
    assert "| winback | 2 | 1 |" in metadata["replies_by_activation"]
    assert metadata["activation_inbound_log_exported"] == 2
    assert metadata["activation_suppressions_exported"] == 1


def test_the_same_stop_delivered_many_times_at_once_is_one_reply_and_one_opt_out(
    ledger: Ledger,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sent(ledger, "sms", "twilio", {"c1": "+447700900111"})
    stop = inbound("STOP", "+447700900111")
    others = [Ledger(ledger.url) for _ in range(6)]  # as many receivers' connections
    try:
        with ThreadPoolExecutor(6) as pool:
            written = list(pool.map(lambda one: one.record_inbound([stop]), others))
    finally:
        for other in others:
            other.dispose()
    assert sum(w.received - w.duplicates for w in written) >= 1
    with ledger.engine.connect() as con:
        kept = con.execute(sa.text("SELECT count(*) FROM inbound_events")).scalar_one()
    assert kept == 1
    assert ledger.opt_outs().rows() == [("c1", "sms", "all")]
    assert ledger.suppress_refusals(refusal_codes()) == 0


def test_meta_s_per_user_limit_backs_a_customer_off_for_a_growing_while(ledger: Ledger) -> None:
    from cdp_activation.activation.run import backoff_codes

    sent(ledger, "whatsapp", "meta_whatsapp", {"c1": "+447700900121", "c2": "+447700900122"})
    rows = {r["customer_id"]: r["id"] for r in ledger.rows("winback").iter_rows(named=True)}
    with ledger.engine.begin() as con:  # Meta's status reports: 131049 for c1
        con.execute(
            sa.text(
                "UPDATE sends SET delivery_status = 'failed', delivery_error_code = '131049', "
                "delivery_status_at = :at WHERE id = :id"
            ),
            {"at": NOW, "id": rows["c1"]},
        )
    codes = backoff_codes()
    assert codes["meta_whatsapp"] == frozenset({"131049"})
    waiting = ledger.marketing_backoff(codes, NOW + timedelta(hours=1))
    assert waiting["customer_id"].to_list() == ["c1"]
    [until] = waiting["until"].to_list()
    assert abs((until - (NOW + timedelta(days=1))).total_seconds()) < 2
    assert ledger.marketing_backoff(codes, NOW + timedelta(days=1, hours=1)).is_empty()


def test_matching_a_reply_and_reading_refusals_never_scan_the_ledger(tmp_path: Path) -> None:
    """The receiver matches each reply inside its write transaction, and every run reads the
    refusals: on a ledger of millions of sends both must be index reads, not scans."""
    from cdp_activation.ledger.replies import _last_sent_to, _refusals

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    try:
        statements = [
            _last_sent_to("sms", ["+447700900101", "+447700900102"]),
            sa.select(_refusals({"twilio": {"21610"}, "meta_whatsapp": {"131049", "131050"}})),
        ]
        with ledger.engine.connect() as con:
            for statement in statements:
                sql = str(statement.compile(con, compile_kwargs={"literal_binds": True}))
                plan = " | ".join(
                    str(row[-1]) for row in con.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")
                )
                assert "SCAN sends" not in plan, plan
                assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, plan
    finally:
        ledger.dispose()


def test_an_opt_out_cancels_the_customer_s_planned_sends_by_index_not_a_scan(
    tmp_path: Path,
) -> None:
    """An opt-out cancels the customer's planned sends inside the receiver's write
    transaction, while senders wait for the ledger's lock: the statement, as run with its
    bound values, reads the customer's index, never every planned row (SQLite's planner,
    offered `state = ?` too, chose the state index: 2.4 ms an opt-out at 4,000 planned
    rows)."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    sent(ledger, "sms", "twilio", {"c1": "+447700900101"})
    planned_later(ledger, "sms", "c1", "+447700900101", "marketing", "2026-12-02")
    # Other customers' planned sends, as in a run: the ledger is not tiny.
    others = {f"o{i}": f"+4479009{i:05d}" for i in range(2_000)}
    sent(ledger, "sms", "twilio", dict(list(others.items())[:1_000]))
    for partition in ("2026-12-03", "2026-12-04"):
        ledger.plan(
            "restock",
            partition,
            pl.DataFrame(
                {
                    "customer_id": list(others),
                    "phone_e164": list(others.values()),
                    "channel": ["sms"] * len(others),
                    "connector": ["twilio"] * len(others),
                    "step": ["initial"] * len(others),
                    "body": ["Back in stock"] * len(others),
                    "template_name": [None] * len(others),
                    "template_language": [None] * len(others),
                    "variables": [None] * len(others),
                },
                schema_overrides={"template_name": pl.String, "template_language": pl.String},
            ),
        )
    executed: list[tuple[str, Any]] = []

    def keep(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE SENDS"):
            executed.append((statement, params))

    sa.event.listen(ledger.engine, "before_cursor_execute", keep)
    try:
        assert ledger.record_inbound([inbound("STOP", "+447700900101")]).cancelled == 1
        assert executed
        with ledger.engine.connect() as con:
            for statement, params in executed:
                plan = " | ".join(
                    str(row[-1])
                    for row in con.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", params)
                )
                assert "ix_sends_customer_channel" in plan, (statement, plan)
    finally:
        sa.event.remove(ledger.engine, "before_cursor_execute", keep)
        ledger.dispose()


def planned_free_form(ledger: Ledger, customers: dict[str, str]) -> None:
    """Customers messaged on WhatsApp before, now with a free-form message planned whose
    24-hour window closes in a minute."""
    sent(ledger, "whatsapp", "meta_whatsapp", customers)
    n = len(customers)
    plan = pl.DataFrame(
        {
            "customer_id": list(customers),
            "phone_e164": list(customers.values()),
            "channel": ["whatsapp"] * n,
            "connector": ["meta_whatsapp"] * n,
            "step": ["initial"] * n,
            "body": ["Your parcel leaves today"] * n,
            "template_name": [None] * n,
            "template_language": [None] * n,
            "variables": [None] * n,
            "window_until": [datetime.now(UTC) + timedelta(minutes=1)] * n,
        },
        schema_overrides={"template_name": pl.String, "template_language": pl.String},
    )
    ledger.plan("parcel", "p", plan)


def test_a_customer_who_writes_again_keeps_their_planned_free_form_whatsapp_message(
    ledger: Ledger,
) -> None:
    """Two free-form WhatsApp messages wait for their customers' quiet hours to end, inside
    windows that close in a minute. Customer c1 writes again meanwhile: their window now
    closes 24 hours after that message, so their message still goes; c2's only event is a
    system notice, which opens nothing: theirs is cancelled when its window closes."""
    planned_free_form(ledger, {"c1": "+447700900101", "c2": "+447700900102"})
    wrote = NOW + timedelta(seconds=30)
    ledger.record_inbound(
        [
            dataclasses.replace(
                inbound("thanks!", "+447700900101", channel="whatsapp", n=7), occurred_at=wrote
            ),
            dataclasses.replace(
                inbound("", "+447700900102", channel="whatsapp", kind="system", n=8),
                occurred_at=wrote,
            ),
        ]
    )
    later = NOW + timedelta(hours=2)
    worker = ledger.register_worker("parcel", "p", "initial", lease_seconds=60)
    [claimed] = ledger.claim(
        worker, "parcel", "p", "initial", [ClaimRequest("meta_whatsapp", 10)], now=later
    )
    assert [r.customer_id for r in claimed] == ["c1"]
    rows = ledger.rows("parcel", "p").sort("customer_id")
    assert rows.select("customer_id", "state", "error_code").rows() == [
        ("c1", "in_flight", None),
        ("c2", "cancelled", "whatsapp_outside_window"),
    ]


def test_a_reply_stamped_in_the_future_opens_no_window_beyond_24_hours_from_now(
    ledger: Ledger,
) -> None:
    """A provider's time in the future is bad data (the policy counts it outside the window):
    it moves a planned free-form message's window to 24 hours from now at most."""
    planned_free_form(ledger, {"c3": "+447700900103"})
    future = datetime.now(UTC) + timedelta(days=3)
    message = inbound("thanks!", "+447700900103", channel="whatsapp", n=9)
    ledger.record_inbound([dataclasses.replace(message, occurred_at=future)])
    [until] = ledger.rows("parcel", "p")["window_until"].to_list()
    assert as_time(until) <= datetime.now(UTC) + timedelta(hours=24)
    assert as_time(until) > datetime.now(UTC) + timedelta(hours=23)
