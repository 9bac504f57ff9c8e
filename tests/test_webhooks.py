"""The status webhook receiver, over real HTTP, writing to a real ledger (SQLite and PostgreSQL).

Every provider's webhook is signed the way that provider signs it; a wrong or missing signature
is 401 and writes nothing. Accepted events are stored once (duplicates ignored) and move each
message's `delivery_status` only forward, whatever order they arrive in.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlencode

import httpx
import polars as pl
import pytest
import sqlalchemy as sa

from cdp_activation.connectors import signatures as sig
from cdp_activation.connectors.base import Outcome, SendResult, send_id_of, send_reference
from cdp_activation.connectors.status_parsers import (
    parse_infobip,
    parse_meta,
    parse_twilio,
    parse_vonage,
)
from cdp_activation.contracts import StatusEvent
from cdp_activation.delivery.transport import make_client
from cdp_activation.feedback.receiver import WebhookSecrets, WebhookServer
from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import signing
from conftest import RecordingLedger

pytestmark = pytest.mark.integration

SECRETS = WebhookSecrets(
    {
        "meta": "meta-app-secret",
        "twilio": "twilio-token",
        "infobip": "infobip:hook-password",
        "vonage": "vonage-signature-secret-of-32-bytes-or-more",
        "line": "line-channel-secret",
        "sandbox": "sandbox-secret",
    },
    subscribe_tokens={"meta": "verify-me"},
)
WRONG = WebhookSecrets(
    {
        "meta": "not-it",
        "twilio": "not-it",
        "infobip": "infobip:not-it",
        "vonage": "not-the-vonage-signature-secret-either!",
        "line": "not-it",
        "sandbox": "not-it",
    }
)


# Reports are about sends planned during the test: their times are now, not fixed dates (a
# report dated before its send was planned is ignored as a replay).
def report_ts() -> int:
    return int(time.time())


def report_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")


CONNECTOR = {"meta": "meta_whatsapp", "twilio": "twilio", "infobip": "infobip", "vonage": "vonage"}


@dataclass(frozen=True)
class Post:
    body: bytes
    headers: dict[str, str]


def meta_status(message_id: str, status: str, ts: int, code: int | None = None) -> bytes:
    entry: dict[str, object] = {
        "id": message_id,
        "status": status,
        "timestamp": str(ts),
        "recipient_id": "447911123456",
    }
    if code:
        entry["errors"] = [{"code": code, "title": "Message undeliverable"}]
    value = {"messaging_product": "whatsapp", "metadata": {}, "statuses": [entry]}
    payload = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}],
    }
    return json.dumps(payload).encode()


def signed(provider: str, secrets: WebhookSecrets, body: bytes, url: str = "") -> Post:
    """`body` with the headers `provider` would send, signed with `secrets`."""
    secret = secrets.secret_for(provider) or ""
    if provider == "meta":
        return Post(
            body,
            {
                "X-Hub-Signature-256": sig.meta_signature(secret, body),
                "Content-Type": "application/json",
            },
        )
    if provider == "twilio":
        params = dict(httpx.QueryParams(body.decode()))
        signature = sig.twilio_signature(secret, url, params.items())
        return Post(
            body,
            {"X-Twilio-Signature": signature, "Content-Type": "application/x-www-form-urlencoded"},
        )
    if provider == "infobip":
        basic = base64.b64encode(secret.encode()).decode()
        return Post(body, {"Authorization": f"Basic {basic}", "Content-Type": "application/json"})
    if provider == "vonage":
        token = signing.vonage_bearer(secret, body, int(time.time()))
        return Post(body, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    if provider == "line":
        return Post(body, {"X-Line-Signature": sig.line_signature(secret, body)})
    return Post(body, {"X-Sandbox-Signature": sig.sandbox_signature(secret, body)})


# One delivered report per provider, in its own shape, for message id "m-<provider>".
REPORTS: dict[str, Callable[[], bytes]] = {
    "meta": lambda: meta_status("m-meta", "delivered", report_ts()),
    "twilio": lambda: urlencode(
        {"MessageSid": "m-twilio", "MessageStatus": "delivered", "To": "+447911123456"}
    ).encode(),
    "infobip": lambda: json.dumps(
        {
            "results": [
                {
                    "messageId": "m-infobip",
                    "to": "447911123456",
                    "doneAt": f"{report_iso()}.000+0000",
                    "status": {
                        "groupId": 3,
                        "groupName": "DELIVERED",
                        "id": 5,
                        "name": "DELIVERED_TO_HANDSET",
                    },
                    "error": {"id": 0, "name": "NO_ERROR"},
                }
            ]
        }
    ).encode(),
    "vonage": lambda: json.dumps(
        {
            "message_uuid": "m-vonage",
            "to": "447911123456",
            "from": "447700900001",
            "timestamp": f"{report_iso()}Z",
            "status": "delivered",
            "channel": "whatsapp",
        }
    ).encode(),
}


@pytest.fixture
def receiver(ledger: Ledger) -> Iterator[WebhookServer]:
    with WebhookServer(ledger, SECRETS) as server:
        yield server


def one_send(*connectors: str) -> pl.DataFrame:
    """Planned WhatsApp template sends, one per connector given."""
    n = len(connectors)
    return pl.DataFrame(
        {
            "customer_id": list(range(n)),
            "phone_e164": [f"+44791112{i:04d}" for i in range(n)],
            "channel": ["whatsapp"] * n,
            "connector": list(connectors),
            "step": ["initial"] * n,
            "template_name": ["winback_offer"] * n,
            "template_language": ["en"] * n,
            "variables": [["Ann"]] * n,
            "body": [None] * n,
        }
    )


def sent_rows(ledger: Ledger, provider_ids: dict[str, str]) -> None:
    """One accepted send per (provider message id -> connector), as delivery records them."""
    ledger.plan("hooks", "p", one_send(*provider_ids.values()))
    rows = ledger.pending("hooks", "p")
    ledger.mark_in_flight([r.id for r in rows])
    ledger.record(
        [
            (r.id, SendResult(r.idempotency_key, Outcome.SENT, pid), 1)
            for r, pid in zip(rows, provider_ids, strict=True)
        ]
    )


def statuses(ledger: Ledger) -> dict[str, tuple[str | None, str | None]]:
    frame = ledger.delivery_statuses("hooks", "p")
    return {
        r["provider_message_id"]: (r["delivery_status"], r["delivery_error_code"])
        for r in frame.iter_rows(named=True)
    }


def stored_events(ledger: Ledger) -> int:
    with ledger.engine.connect() as con:
        return int(con.execute(sa.text("SELECT count(*) FROM status_events")).scalar_one())


def post(url: str, request: Post) -> httpx.Response:
    return httpx.post(url, content=request.body, headers=request.headers, timeout=10)


@pytest.mark.parametrize("provider", sorted(REPORTS))
def test_a_signed_report_moves_the_status_and_a_wrong_signature_writes_nothing(
    provider: str, ledger: Ledger, receiver: WebhookServer
) -> None:
    sent_rows(ledger, {f"m-{provider}": CONNECTOR[provider]})
    url = f"{receiver.url}/webhooks/{provider}"
    body = REPORTS[provider]()

    forged = post(url, signed(provider, WRONG, body, url))
    unsigned = httpx.post(url, content=body, timeout=10)
    assert (forged.status_code, unsigned.status_code) == (401, 401)
    assert stored_events(ledger) == 0
    assert statuses(ledger) == {f"m-{provider}": (None, None)}

    answer = post(url, signed(provider, SECRETS, body, url))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"received": 1}
    assert statuses(ledger) == {f"m-{provider}": ("delivered", None)}


def test_duplicated_and_reordered_reports_only_move_forward(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    sent_rows(ledger, {"wamid.A": "meta_whatsapp", "wamid.B": "meta_whatsapp"})
    url = f"{receiver.url}/webhooks/meta"
    at = report_ts()
    sequence = [
        meta_status("wamid.A", "read", at + 300),
        meta_status("wamid.A", "delivered", at + 200),  # late: read already
        meta_status("wamid.A", "sent", at + 100),  # later still
        meta_status("wamid.A", "read", at + 300),  # the same webhook again
        meta_status("wamid.B", "failed", at + 100, code=131026),
        meta_status("wamid.B", "delivered", at + 200),  # cannot undo a failure
    ]
    for body in sequence:
        assert post(url, signed("meta", SECRETS, body)).status_code == 200
    assert statuses(ledger) == {"wamid.A": ("read", None), "wamid.B": ("failed", "131026")}
    assert stored_events(ledger) == 5  # the repeated read is stored once


@pytest.mark.parametrize("provider", ["meta", "twilio_ref", "infobip", "vonage"])
def test_a_report_dated_long_before_its_send_is_flagged_and_changes_nothing(
    ledger: Ledger, receiver: WebhookServer, provider: str
) -> None:
    """A correctly signed report from a year ago (a replay, or about a message of another
    ledger whose send ids restarted) neither moves a status nor proves an `unknown` send."""
    year_ago = int(time.time()) - 365 * 86400
    stamp = datetime.fromtimestamp(year_ago, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if provider == "twilio_ref":
        # A Twilio report naming send cdp-1 through its StatusCallback `ref`: the row is
        # `unknown` (its answer was lost); an old report must not make it `sent`.
        ledger.plan("hooks", "p", one_send("twilio"))
        (row,) = ledger.pending("hooks", "p")
        ledger.mark_in_flight([row.id])
        ledger.record([(row.id, SendResult(row.idempotency_key, Outcome.UNKNOWN), 1)])
        event = StatusEvent(
            "twilio",
            "SMold",
            "delivered",
            datetime.fromtimestamp(year_ago, UTC),
            "twilio|SMold|delivered",
            reference=send_reference(row.id),
        )
        write = ledger.record_statuses([event])
        assert (write.reconciled, write.stale) == (0, 0)  # no such provider id: not applied
        assert ledger.counts("hooks", "p") == {"unknown": 1}
        return
    sent_rows(ledger, {f"m-{provider}": CONNECTOR[provider]})
    old = {
        "meta": lambda: meta_status("m-meta", "delivered", year_ago),
        "infobip": lambda: REPORTS["infobip"]().replace(report_iso().encode(), stamp.encode()),
        "vonage": lambda: REPORTS["vonage"]().replace(report_iso().encode(), stamp.encode()),
    }[provider]()
    assert stamp.encode() in old or provider == "meta"
    answer = post(f"{receiver.url}/webhooks/{provider}", signed(provider, SECRETS, old))
    assert answer.status_code == 200  # taken (the provider must not retry it), not applied
    assert statuses(ledger) == {f"m-{provider}": (None, None)}
    with ledger.engine.connect() as con:
        flags = con.execute(sa.text("SELECT applied, ignored FROM status_events")).all()
    assert [(bool(a), i) for a, i in flags] == [(False, "older_than_send")]
    assert ledger.apply_pending_statuses() == 0  # and never tried again


def test_meta_subscription_check(receiver: WebhookServer) -> None:
    url = f"{receiver.url}/webhooks/meta"
    ok = httpx.get(
        url,
        params={
            "hub.mode": "subscribe",
            "hub.verify_token": "verify-me",
            "hub.challenge": "1158201444",
        },
    )
    assert (ok.status_code, ok.text) == (200, "1158201444")
    bad = httpx.get(
        url,
        params={
            "hub.mode": "subscribe",
            "hub.verify_token": "guess",
            "hub.challenge": "1158201444",
        },
    )
    assert bad.status_code == 403


def test_line_signature_is_checked_and_its_events_carry_no_status(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    url = f"{receiver.url}/webhooks/line"
    body = json.dumps(
        {
            "destination": "U" + "0" * 32,
            "events": [
                {
                    "type": "follow",
                    "timestamp": report_ts(),
                    "source": {"type": "user", "userId": "U1"},
                }
            ],
        }
    ).encode()
    assert post(url, signed("line", WRONG, body)).status_code == 401
    answer = post(url, signed("line", SECRETS, body))
    # No delivery status; the follow itself is kept (tests/test_replies.py), not as consent.
    assert (answer.status_code, answer.json()) == (200, {"received": 1})
    assert ledger.opt_outs().is_empty()


def test_a_malformed_body_is_400_and_an_unconfigured_provider_is_refused(
    ledger: Ledger,
) -> None:
    only_meta = WebhookSecrets({"meta": "meta-app-secret"})
    with WebhookServer(ledger, only_meta) as server:
        bad = post(f"{server.url}/webhooks/meta", signed("meta", only_meta, b"{not json"))
        assert bad.status_code == 400
        body = REPORTS["vonage"]()
        refused = post(f"{server.url}/webhooks/vonage", signed("vonage", SECRETS, body))
        assert refused.status_code == 401
        assert httpx.post(f"{server.url}/webhooks/nope", content=b"{}").status_code == 404
    assert stored_events(ledger) == 0


def test_twilio_signs_the_public_url_behind_a_proxy(ledger: Ledger) -> None:
    secrets = WebhookSecrets({"twilio": "twilio-token"}, public_url="https://hooks.example.com")
    sent_rows(ledger, {"SM1": "twilio"})
    body = urlencode(
        {"MessageSid": "SM1", "MessageStatus": "undelivered", "ErrorCode": "30003"}
    ).encode()
    with WebhookServer(ledger, secrets) as server:
        local = f"{server.url}/webhooks/twilio"
        assert post(local, signed("twilio", secrets, body, local)).status_code == 401
        public = "https://hooks.example.com/webhooks/twilio"
        assert post(local, signed("twilio", secrets, body, public)).status_code == 200
    assert statuses(ledger) == {"SM1": ("failed", "30003")}


def test_ten_thousand_concurrent_webhooks_are_all_in_the_ledger(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    n = 10_000
    url = f"{receiver.url}/webhooks/sandbox"
    bodies = [
        json.dumps(
            {
                "statuses": [
                    {
                        "id": f"wh_{i}",
                        "status": "delivered",
                        "timestamp": datetime.now(UTC).isoformat(),
                    }
                ]
            }
        ).encode()
        for i in range(n)
    ]
    requests = [signed("sandbox", SECRETS, body) for body in bodies]

    async def fire() -> list[int]:
        # The project's client (httpx's API over aiohttp): plain httpx queues 10,000 waiting
        # requests on its pool in quadratic time, which would measure the client, not us.
        async with make_client(timeout=60, max_in_flight=200) as client:
            answers = await asyncio.gather(
                *(client.post(url, content=r.body, headers=r.headers) for r in requests)
            )
        return [a.status_code for a in answers]

    codes = asyncio.run(fire())
    assert set(codes) == {200}
    assert stored_events(ledger) == n
    # Group commit: far fewer transactions than requests.
    assert receiver.app.state.writer.transactions < n / 5


@pytest.mark.parametrize("batch", [1, 50], ids=["one-a-webhook", "meta-batches-of-50"])
def test_the_sandbox_reports_back_and_the_ledger_ends_on_each_message_s_last_status(
    ledger: Ledger, batch: int
) -> None:
    """Deliver through the sandbox with status webhooks on: 70% delivered (some read), 10%
    failed with the provider's code, 20% never delivered; a fifth of the reports duplicated,
    a fifth reordered. Every row ends on the status its message really reached, whether Meta
    sends each report alone or batches them (several statuses a webhook)."""
    from cdp_activation.delivery.engine import DeliveryOptions, DeliveryScope, deliver
    from cdp_activation.sandbox import SandboxConfig, SandboxServer
    from cdp_activation.sandbox.status_webhooks import outcome, status_posts
    from conftest import settings_for_sandbox
    from crash_worker import audience, sandbox_connectors

    n = 600
    with SandboxServer(config=SandboxConfig(seed=7)) as sandbox:
        secrets = settings_for_sandbox(sandbox).webhook_secrets()
        with WebhookServer(ledger, secrets) as receiver:
            sandbox.configure(
                status_webhooks_url=receiver.url,
                status_delivered_rate=0.7,
                status_failed_rate=0.1,
                status_read_rate=0.5,
                status_delay_ms=5,
                status_duplicate_rate=0.2,
                status_reorder_rate=0.2,
                status_batch_max=batch,
            )
            ledger.plan("loop", "p", audience(n))
            options = DeliveryOptions(rate_per_second=5000, backoff_initial=0.01)
            deliver(ledger, DeliveryScope("loop", "p"), sandbox_connectors(sandbox.url), options)
            expected = {
                m.provider_message_id: max(outcome(sandbox.config, m), key=STATUS_ORDER.index)
                for m in sandbox.messages()
            }
            # The sandbox says when it has no report left to send (what `demo` waits for):
            # each was stored before the receiver answered it, so the ledger is final then.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                pending = httpx.get(f"{sandbox.url}/_sandbox/pending", timeout=5).json()
                if pending == {"status_webhooks": 0}:
                    break
                time.sleep(0.05)
            assert pending == {"status_webhooks": 0}
            # What a run does after delivering: reports that came before their send's answer
            # was recorded find it now.
            ledger.apply_pending_statuses()
            meta = [m for m in sandbox.messages() if m.provider == "meta_whatsapp"]
            posts = status_posts(sandbox.app)
    if batch == 1:
        assert posts == 0  # each report its own webhook, as before
    else:  # two or more statuses a message, gathered: far fewer webhooks than statuses
        assert 0 < posts < 2 * len(meta) / 5, (posts, len(meta))
    final = ledger.delivery_statuses("loop", "p").filter(pl.col("state") == "sent")
    got = dict(zip(final["provider_message_id"], final["delivery_status"], strict=True))
    assert got == expected
    shares = {s: sum(v == s for v in got.values()) / len(got) for s in STATUS_ORDER}
    assert 0.25 < shares["read"] < 0.45 and 0.05 < shares["failed"] < 0.15, shares
    failed_codes = set(final.filter(pl.col("delivery_status") == "failed")["delivery_error_code"])
    assert failed_codes == {"131026", "30003"}  # Meta's "not on WhatsApp", Twilio's unreachable


STATUS_ORDER = ["sent", "delivered", "failed", "read"]


def test_a_report_that_beats_its_send_s_answer_is_applied_once_the_send_is_recorded(
    ledger: Ledger,
) -> None:
    """Meta's `sent` webhook can arrive before the delivery engine records the send."""
    from cdp_activation.contracts import StatusEvent

    early = StatusEvent(
        "meta", "wamid.EARLY", "delivered", datetime.now(UTC), "meta|wamid.EARLY|delivered|1"
    )
    assert ledger.record_statuses([early]).advanced == 0  # no such send yet: kept, unapplied
    sent_rows(ledger, {"wamid.EARLY": "meta_whatsapp"})
    assert statuses(ledger) == {"wamid.EARLY": (None, None)}
    assert ledger.apply_pending_statuses() == 1
    assert statuses(ledger) == {"wamid.EARLY": ("delivered", None)}
    assert ledger.apply_pending_statuses() == 0  # applied once


# --- send references echoed back (issue 13: unknowns are reconciled) -------------------------


def _meta_report(reference: object) -> bytes:
    data = json.loads(meta_status("wamid.R", "delivered", report_ts()))
    data["entry"][0]["changes"][0]["value"]["statuses"][0]["biz_opaque_callback_data"] = reference
    return json.dumps(data).encode()


def _infobip_report(reference: object) -> bytes:
    result = json.loads(REPORTS["infobip"]())["results"][0]
    result["callbackData"] = reference  # delivery reports carry it (seen reports do not)
    return json.dumps({"results": [result]}).encode()


def _vonage_report(reference: object) -> bytes:
    data = json.loads(REPORTS["vonage"]())
    data["client_ref"] = reference
    return json.dumps(data).encode()


NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
ECHOING_PARSERS: dict[str, Callable[[object], list[StatusEvent]]] = {
    "meta-biz_opaque_callback_data": lambda ref: parse_meta(_meta_report(ref), NOW),
    "infobip-delivery-callbackData": lambda ref: parse_infobip(_infobip_report(ref), NOW),
    "vonage-client_ref": lambda ref: parse_vonage(_vonage_report(ref), NOW),
    "twilio-ref-query": lambda ref: parse_twilio(
        {"MessageSid": "SM-R", "MessageStatus": "delivered"},
        NOW,
        {} if ref is None else {"ref": str(ref)},
    ),
}


@pytest.mark.parametrize("parse", ECHOING_PARSERS.values(), ids=ECHOING_PARSERS.keys())
def test_the_echoed_send_reference_lands_in_the_status_event(
    parse: Callable[[object], list[StatusEvent]],
) -> None:
    [event] = parse(send_reference(4242))
    assert event.reference == "cdp-4242"
    assert send_id_of(event.reference) == 4242
    # Without one, or with a value that is not a send reference (a Vonage client_ref derived
    # from the ledger key by an older send, someone else's callback data): none.
    for other in (None, "3f1c2a4e-8d3b-5b7e-9a0f-3c5d7e9b1a20", "cdp-", "cdp-12x", "cdp-007"):
        [event] = parse(other)
        assert event.reference is None, other


def test_send_reference_round_trip() -> None:
    assert send_reference(0) == "cdp-0"
    largest = 2**63 - 1
    assert send_id_of(send_reference(largest)) == largest
    assert len(send_reference(largest)) <= 40  # fits Vonage's client_ref
    for not_ours in (None, "", "cdp", "CDP-1", "cdp--1", "cdp-1.0", "cdp-١٢", "x-cdp-1"):
        assert send_id_of(not_ours) is None, not_ours
    with pytest.raises(ValueError):
        send_reference(-1)


def test_twilio_s_ref_comes_from_the_signed_callback_url(ledger_url: str) -> None:
    """Twilio posts to the StatusCallback URL we sent and signs that URL, query included: the
    `ref` is read from it, and a report whose signature leaves the query out is refused (a
    forged `ref` cannot be slipped in). Behind a proxy the public URL carries the same query."""
    ledger = RecordingLedger(ledger_url)
    body = urlencode({"MessageSid": "SM-R", "MessageStatus": "delivered"}).encode()
    try:
        with WebhookServer(ledger, SECRETS) as server:
            bare = f"{server.url}/webhooks/twilio"
            url = f"{bare}?ref=cdp-31"
            assert post(url, signed("twilio", SECRETS, body, bare)).status_code == 401
            assert post(url, signed("twilio", SECRETS, body, url)).status_code == 200
        public = WebhookSecrets({"twilio": "twilio-token"}, public_url="https://h.example")
        with WebhookServer(ledger, public) as server:
            signed_url = "https://h.example/webhooks/twilio?ref=cdp-32"
            local = f"{server.url}/webhooks/twilio?ref=cdp-32"
            assert post(local, signed("twilio", public, body, signed_url)).status_code == 200
    finally:
        ledger.dispose()
    assert [e.reference for e in ledger.events] == ["cdp-31", "cdp-32"]


def test_liveness_and_readiness_for_a_load_balancer(ledger: Ledger) -> None:
    """/healthz answers while the process serves; /readyz only while the ledger (where every
    report is stored before its 200) answers with its tables, else 503 with the reason."""
    with WebhookServer(ledger, SECRETS) as server:
        assert httpx.get(f"{server.url}/healthz", timeout=5).json() == {"status": "ok"}
        ready = httpx.get(f"{server.url}/readyz", timeout=5)
        assert (ready.status_code, ready.json()) == (200, {"status": "ready", "ledger": "ok"})
        # The ledger loses its tables (a wrong database, a dropped schema): not ready.
        with ledger.engine.begin() as con:
            con.exec_driver_sql("ALTER TABLE sends RENAME TO sends_moved")
        try:
            gone = httpx.get(f"{server.url}/readyz", timeout=10)
            assert gone.status_code == 503
            assert gone.json()["status"] == "not ready"
            assert gone.json()["ledger"].startswith("unavailable: ")
            assert "sends" in gone.json()["ledger"]  # the database's own reason, one line
            assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        finally:
            with ledger.engine.begin() as con:
                con.exec_driver_sql("ALTER TABLE sends_moved RENAME TO sends")
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
