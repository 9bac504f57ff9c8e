"""What WhatsApp says back about templates and accepted messages (issue 15, item 11).

- Meta's send answer carries `message_status` (accepted, held_for_quality_assessment, paused):
  it is recorded on the send and counted in the run's summary.
- Meta's signed `message_template_status_update` webhook (PAUSED, DISABLED, APPROVED…) is kept
  in the ledger; a paused template is not sent (its rows stay planned, the step says why) while
  the step's other connectors go on, and a later APPROVED word lets the next run send them.
- The template catalog asset shows the webhook's word beside the catalog's status.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import polars as pl
import pytest
import sqlalchemy as sa

from cdp_activation.connectors import signatures as sig
from cdp_activation.connectors.status_parsers import parse_meta_template_updates
from cdp_activation.delivery.engine import DeliveryOptions, DeliveryScope, TemplateBlocked, deliver
from cdp_activation.feedback.receiver import WebhookServer
from cdp_activation.ledger import SENT, Ledger, sends
from cdp_activation.ledger.templates import latest_states
from cdp_activation.sandbox import SandboxServer
from conftest import settings_for_sandbox
from crash_worker import audience, sandbox_connectors

pytestmark = pytest.mark.integration

OPTIONS = DeliveryOptions(rate_per_second=5000, backoff_initial=0.01)


def template_update(
    event: str, at: int, name: str = "winback_offer", reason: str = "NONE"
) -> bytes:
    """Meta's documented `message_template_status_update` shape."""
    value = {
        "event": event,
        "message_template_id": 1234567890,
        "message_template_name": name,
        "message_template_language": "en",
        "reason": reason,
        "message_template_category": "MARKETING",
    }
    payload = {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "200000000000002",
                "time": at,
                "changes": [{"field": "message_template_status_update", "value": value}],
            }
        ],
    }
    return json.dumps(payload).encode()


@pytest.fixture
def receiver(ledger: Ledger, sandbox: SandboxServer) -> Iterator[WebhookServer]:
    with WebhookServer(ledger, settings_for_sandbox(sandbox).webhook_secrets()) as server:
        yield server


def post_meta(receiver: WebhookServer, body: bytes, secret: str) -> httpx.Response:
    headers = {
        "X-Hub-Signature-256": sig.meta_signature(secret, body),
        "Content-Type": "application/json",
    }
    return httpx.post(f"{receiver.url}/webhooks/meta", content=body, headers=headers)


def states_by_row(ledger: Ledger) -> dict[str, int]:
    with ledger.engine.connect() as con:
        rows = con.execute(sa.select(sends.c.connector, sends.c.state)).all()
    return dict(
        pl.DataFrame(rows, schema=["connector", "state"], orient="row")
        .group_by("connector", "state")
        .len()
        .select(pl.concat_str("connector", "state", separator=":"), "len")
        .iter_rows()
    )


def test_the_parser_reads_meta_s_documented_template_update() -> None:
    received = datetime.now(UTC)
    (state,) = parse_meta_template_updates(
        template_update("PAUSED", 1764680000, reason="LOW_QUALITY"), received
    )
    assert (state.connector, state.name, state.language, state.status) == (
        "meta_whatsapp",
        "winback_offer",
        "en",
        "PAUSED",
    )
    assert state.occurred_at == datetime.fromtimestamp(1764680000, UTC)
    assert state.reason == "LOW_QUALITY" and state.blocked
    with pytest.raises(ValueError, match="without event, name or language"):
        parse_meta_template_updates(template_update("", 1764680000), received)


def test_a_paused_template_stops_only_its_connector_and_its_rows_stay_planned_until_approved(
    ledger: Ledger, sandbox: SandboxServer, receiver: WebhookServer
) -> None:
    secret = settings_for_sandbox(sandbox).webhook_secrets().secret_for("meta") or ""
    now = int(time.time())
    # A forged word (wrong signature) changes nothing.
    forged = post_meta(receiver, template_update("PAUSED", now - 60), "not-the-app-secret")
    assert forged.status_code == 401 and latest_states(ledger.engine) == []
    answer = post_meta(receiver, template_update("PAUSED", now - 60, reason="LOW_QUALITY"), secret)
    assert answer.status_code == 200, answer.text

    ledger.plan("pause", "p", audience(40))  # 20 WhatsApp (Meta template), 20 SMS (Twilio)
    connectors = sandbox_connectors(sandbox.url)
    with pytest.raises(TemplateBlocked) as stopped:
        deliver(ledger, DeliveryScope("pause", "p"), connectors, OPTIONS)
    message = str(stopped.value)
    assert "'winback_offer' (en) is PAUSED at meta_whatsapp" in message
    assert "LOW_QUALITY" in message and "stay planned" in message
    # Nothing reached Meta; SMS went on, every WhatsApp row is planned with its attempt given back.
    assert {m.provider for m in sandbox.messages()} == {"twilio"}
    assert states_by_row(ledger) == {"twilio:sent": 20, "meta_whatsapp:planned": 20}
    with ledger.engine.connect() as con:
        attempts = con.execute(
            sa.select(sends.c.attempts).where(sends.c.connector == "meta_whatsapp")
        ).scalars()
        assert set(attempts) == {0}

    # An older word does not undo a newer one; a newer APPROVED does.
    assert post_meta(receiver, template_update("APPROVED", now - 120), secret).status_code == 200
    with pytest.raises(TemplateBlocked):
        deliver(ledger, DeliveryScope("pause", "p"), connectors, OPTIONS)
    assert post_meta(receiver, template_update("APPROVED", now), secret).status_code == 200
    deliver(ledger, DeliveryScope("pause", "p"), connectors, OPTIONS)
    # +447900000013 is "not on WhatsApp" in the sandbox: failed, as Meta answers.
    expected = {"twilio:sent": 20, "meta_whatsapp:sent": 19, "meta_whatsapp:failed": 1}
    assert states_by_row(ledger) == expected
    assert len(sandbox.messages()) == 39  # each accepted once


def test_the_sandbox_pausing_a_template_mid_run_tells_the_receiver_and_the_run_stops(
    ledger: Ledger, sandbox: SandboxServer, receiver: WebhookServer
) -> None:
    """Meta pauses the template while the step sends (the sandbox's control route, which also
    posts Meta's signed webhook): the step stops early, what was not sent stays planned."""
    sandbox.configure(status_webhooks_url=receiver.url, latency_ms=20)
    whatsapp_only = audience(400).filter(pl.col("channel") == "whatsapp")
    ledger.plan("mid", "p", whatsapp_only)
    connectors = sandbox_connectors(sandbox.url)
    options = DeliveryOptions(rate_per_second=400, backoff_initial=0.01, concurrency=4)

    def pause_soon() -> None:
        deadline = time.monotonic() + 20
        while len(sandbox.messages()) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        httpx.post(
            f"{sandbox.url}/_sandbox/templates",
            json={"name": "winback_offer", "language": "en", "status": "PAUSED"},
        ).raise_for_status()

    pauser = threading.Thread(target=pause_soon)
    pauser.start()
    with pytest.raises(Exception) as stopped:  # the webhook or Meta's 132015, whichever first
        deliver(ledger, DeliveryScope("mid", "p"), connectors, options)
    pauser.join()
    assert "paused" in str(stopped.value).lower()
    (state,) = _wait_for_states(ledger)
    assert (state.name, state.status, state.source) == ("winback_offer", "PAUSED", "webhook")
    counts = states_by_row(ledger)
    assert counts.get("meta_whatsapp:planned", 0) > 0
    assert counts.get("meta_whatsapp:sent", 0) == len(sandbox.messages()) >= 20
    # Paused in the catalog too: the listing says so.
    listing = httpx.get(f"{sandbox.url}/_sandbox/templates").json()
    assert [
        t["status"] for t in listing if (t["name"], t["language"]) == ("winback_offer", "en")
    ] == ["PAUSED"]


def _wait_for_states(ledger: Ledger) -> list:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = latest_states(ledger.engine)
        if states:
            return states
        time.sleep(0.05)
    raise AssertionError("the sandbox's template webhook never reached the ledger")


def test_meta_s_message_status_is_recorded_and_counted(
    ledger: Ledger, sandbox: SandboxServer
) -> None:
    sandbox.configure(meta_held_rate=0.5, seed=3)
    ledger.plan("held", "p", audience(200).filter(pl.col("channel") == "whatsapp"))
    report = deliver(ledger, DeliveryScope("held", "p"), sandbox_connectors(sandbox.url), OPTIONS)
    with ledger.engine.connect() as con:
        rows = con.execute(
            sa.select(sends.c.state, sends.c.provider_status).where(sends.c.state == SENT)
        ).all()
    words = pl.DataFrame(rows, schema=["state", "word"], orient="row")["word"].value_counts()
    counts = dict(words.iter_rows())
    held = counts.get("held_for_quality_assessment", 0)
    assert 20 < held < 80 and held + counts.get("accepted", 0) == report.sent
    assert report.provider_statuses == {"held_for_quality_assessment": held}


def test_the_catalog_asset_shows_the_webhook_s_word(
    ledger: Ledger, sandbox: SandboxServer, receiver: WebhookServer
) -> None:
    import dagster as dg

    from cdp_activation.components.resources import LedgerResource, connector_resource
    from cdp_activation.defs.templates import catalog_asset

    secret = settings_for_sandbox(sandbox).webhook_secrets().secret_for("meta") or ""
    at = int(time.time()) - 5
    body = template_update("PAUSED", at, reason="LOW_QUALITY")
    assert post_meta(receiver, body, secret).status_code == 200
    settings = settings_for_sandbox(sandbox)
    result = dg.materialize(
        [catalog_asset("meta_whatsapp")],
        resources={
            "meta_whatsapp": connector_resource("meta_whatsapp")(
                base_url=settings.meta_base_url,
                phone_number_id=settings.meta_phone_number_id,
                waba_id=settings.meta_waba_id,
            ),
            "ledger": LedgerResource(url=ledger.engine.url.render_as_string(False)),
        },
        instance=dg.DagsterInstance.ephemeral(),
    )
    (event,) = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
    when = datetime.fromtimestamp(at, UTC)
    assert f"| APPROVED | 3 | PAUSED at {when:%Y-%m-%d %H:%M} UTC |" in metadata["catalog"]
    assert "'winback_offer' (en) is PAUSED" in metadata["paused_by_webhook"]
    # The catalog read now is the newer word: the sends go again.
    (state,) = [
        s for s in latest_states(ledger.engine) if (s.name, s.language) == ("winback_offer", "en")
    ]
    assert (state.status, state.source) == ("APPROVED", "catalog")
    assert state.occurred_at > when - timedelta(seconds=1)
