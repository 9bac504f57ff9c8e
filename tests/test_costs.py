"""What sends cost: the providers' reported pricing reaches the ledger and the send log, and
the cost report compares it with the estimate, checked against the price list by hand."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest

from cdp_activation.activation.pricing import DEFAULT_PRICES, load_prices
from cdp_activation.connectors import connector_from_settings
from cdp_activation.connectors.base import Outcome, SendResult
from cdp_activation.connectors.status_parsers import (
    parse_infobip,
    parse_meta,
    parse_twilio,
    parse_vonage,
)
from cdp_activation.contracts import Pricing
from cdp_activation.feedback.costs import cost_report, reconcile_prices
from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import SandboxServer
from conftest import cli_project

NOW = datetime.now(UTC).replace(microsecond=0)


def meta_status(wamid: str, status: str, pricing: dict | None, at: datetime = NOW) -> bytes:
    entry = {
        "id": wamid,
        "status": status,
        "timestamp": str(int(at.timestamp())),
        "recipient_id": "447700900001",
    }
    if pricing is not None:
        entry["pricing"] = pricing
    return json.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [
                {"id": "1", "changes": [{"field": "messages", "value": {"statuses": [entry]}}]}
            ],
        }
    ).encode()


MARKETING = {"billable": True, "pricing_model": "PMP", "category": "marketing", "type": "regular"}
SERVICE = {"billable": False, "pricing_model": "PMP", "category": "service"}


def test_each_providers_report_gives_its_pricing() -> None:
    (meta,) = parse_meta(meta_status("wamid.1", "delivered", MARKETING), NOW)
    assert meta.pricing == Pricing(billable=True, category="marketing", model="PMP")
    (free,) = parse_meta(meta_status("wamid.2", "read", SERVICE), NOW)
    assert free.pricing == Pricing(billable=False, category="service", model="PMP")
    (bare,) = parse_meta(meta_status("wamid.3", "sent", None), NOW)
    assert bare.pricing is None
    (infobip,) = parse_infobip(
        json.dumps(
            {
                "results": [
                    {
                        "messageId": "ib1",
                        "doneAt": "2026-12-05T10:00:00.000+0000",
                        "status": {"groupName": "DELIVERED", "name": "DELIVERED"},
                        "price": {"pricePerMessage": 0.01, "currency": "EUR"},
                    }
                ]
            }
        ).encode(),
        NOW,
    )
    assert infobip.pricing == Pricing(price=0.01, currency="EUR")
    (vonage,) = parse_vonage(
        json.dumps(
            {
                "message_uuid": "v1",
                "status": "delivered",
                "timestamp": NOW.isoformat(),
                "channel": "sms",
                "usage": {"currency": "EUR", "price": "0.0333"},
            }
        ).encode(),
        NOW,
    )
    assert vonage.pricing == Pricing(price=0.0333, currency="EUR")
    # Twilio writes a charge negative; an amount that is not a number is no price.
    (twilio,) = parse_twilio(
        {
            "MessageSid": "SM1",
            "MessageStatus": "delivered",
            "Price": "-0.00750",
            "PriceUnit": "usd",
        },
        NOW,
    )
    assert twilio.pricing == Pricing(price=0.0075, currency="USD")
    (odd,) = parse_twilio({"MessageSid": "SM2", "MessageStatus": "sent", "Price": "n/a"}, NOW)
    assert odd.pricing is None


def sent_ledger(tmp_path: Path) -> tuple[Ledger, dict[str, int]]:
    """Five WhatsApp marketing sends accepted by Meta: two in GB, two in DE, one in IN."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    countries = ["GB", "GB", "DE", "DE", "IN"]
    frame = pl.DataFrame(
        {
            "customer_id": [f"c{i}" for i in range(5)],
            "phone_e164": [f"+4477009000{i:02d}" for i in range(5)],
            "channel": ["whatsapp"] * 5,
            "connector": ["meta_whatsapp"] * 5,
            "step": ["initial"] * 5,
            "template_name": ["winback_offer"] * 5,
            "template_language": ["en"] * 5,
            "variables": [["x"]] * 5,
            "body": [None] * 5,
            "decision": ["send"] * 5,
            "country": countries,
        },
        schema_overrides={"body": pl.String},
    )
    ledger.plan("winback", "2026-12-05", frame)
    rows = ledger.pending("winback", "2026-12-05")
    ledger.mark_in_flight([r.id for r in rows])
    ledger.record(
        [
            (r.id, SendResult(r.idempotency_key, Outcome.SENT, f"wamid.{r.customer_id}"), 1)
            for r in rows
        ]
    )
    return ledger, {r.customer_id: r.id for r in rows}


def test_reported_pricing_reaches_the_ledger_in_any_order(tmp_path: Path) -> None:
    ledger, _ = sent_ledger(tmp_path)
    now = datetime.now(UTC).replace(microsecond=0)  # reports after the send, not at import
    try:
        later = now + timedelta(seconds=5)
        # `read` (no pricing) first, then the `sent` report that carries it: still recorded.
        ledger.record_statuses(parse_meta(meta_status("wamid.c0", "read", None, later), now))
        ledger.record_statuses(parse_meta(meta_status("wamid.c0", "sent", MARKETING, now), now))
        # A report of a message whose send is not recorded yet is applied with its pricing
        # once it is (`apply_pending_statuses`).
        ledger.record_statuses(parse_meta(meta_status("wamid.early", "sent", SERVICE, now), now))
        rows = ledger.rows("winback")
        c0 = rows.filter(pl.col("customer_id") == "c0").row(0, named=True)
        assert (c0["delivery_status"], c0["billable"], c0["pricing_category"]) == (
            "read",
            True,
            "marketing",
        )
        with ledger.engine.begin() as con:
            con.exec_driver_sql(
                "UPDATE sends SET provider_message_id = 'wamid.early' WHERE customer_id = 'c1'"
            )
        ledger.apply_pending_statuses()
        c1 = ledger.rows("winback").filter(pl.col("customer_id") == "c1").row(0, named=True)
        assert (c1["billable"], c1["pricing_category"], c1["pricing_model"]) == (
            False,
            "service",
            "PMP",
        )
    finally:
        ledger.dispose()


def test_the_cost_report_prices_reports_by_the_price_list(tmp_path: Path) -> None:
    ledger, _ = sent_ledger(tmp_path)
    now = datetime.now(UTC).replace(microsecond=0)  # reports after the send, not at import
    try:
        # c0, c2: billed marketing; c1: free (service); c3: a provider amount; c4: no report.
        ledger.record_statuses(
            parse_meta(meta_status("wamid.c0", "delivered", MARKETING, now), now)
        )
        ledger.record_statuses(parse_meta(meta_status("wamid.c1", "delivered", SERVICE, now), now))
        ledger.record_statuses(
            parse_meta(meta_status("wamid.c2", "delivered", MARKETING, now), now)
        )
        with ledger.engine.begin() as con:
            con.exec_driver_sql(
                "UPDATE sends SET price = 0.2, price_currency = 'USD' WHERE customer_id = 'c3'"
            )
        prices = load_prices(DEFAULT_PRICES)
        report = cost_report(ledger, prices)
    finally:
        ledger.dispose()
    # By hand, from prices.yaml: GB marketing 0.0529, DE 0.1365, IN 0.0107.
    assert prices.currency == "USD"
    (row,) = report.frame.filter(pl.col("actual_currency") == "USD").iter_rows(named=True)
    assert row["sends"] == 4  # c0-c3 reported; c4 not yet
    assert row["reported"] == 4
    assert row["actual_cost"] == pytest.approx(0.0529 + 0.0 + 0.1365 + 0.2)
    (unreported,) = report.frame.filter(pl.col("actual_currency").is_null()).iter_rows(named=True)
    assert (unreported["sends"], unreported["reported"]) == (1, 0)
    assert unreported["estimated_cost"] == pytest.approx(0.0107)
    assert row["estimated_cost"] == pytest.approx(2 * 0.0529 + 2 * 0.1365)
    table = report.markdown()
    assert "not reported" in table and "| winback | 2026-12-05 | whatsapp | 4 |" in table


@pytest.mark.integration
@pytest.mark.e2e
def test_twilio_prices_are_read_from_its_message_resources_after_a_real_run(
    tmp_path: Path, sandbox: SandboxServer, sandbox_settings: Any
) -> None:
    """A run sends SMS through Twilio (the sandbox, over HTTP); Twilio's callbacks carry no
    price, so the reconcile reads each Message resource: every SMS then has its price, and
    the cost report counts them as reported."""
    project = cli_project(tmp_path, sandbox, customers=1_500)
    run = project.run("run", "winback_whatsapp", "--send-window", "00:00-23:59", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    ledger = Ledger(project.ledger_url)
    try:
        twilio = connector_from_settings("twilio", sandbox_settings)
        sms = ledger.rows("winback_whatsapp").filter(
            (pl.col("connector") == "twilio") & (pl.col("state") == "sent")
        )
        assert sms.height > 10
        # Too soon: a message is priced once it has gone.
        assert reconcile_prices(ledger, {"twilio": twilio}) == {}
        later = datetime.now(UTC) + timedelta(hours=1)
        done = reconcile_prices(ledger, {"twilio": twilio}, now=later, limit=10)
        assert done == {"twilio": 10}  # at most `limit` a call
        done = reconcile_prices(ledger, {"twilio": twilio}, now=later)
        assert done == {"twilio": sms.height - 10}
        assert reconcile_prices(ledger, {"twilio": twilio}, now=later) == {}  # all priced
        priced = ledger.rows("winback_whatsapp").filter(pl.col("connector") == "twilio")
        sent = priced.filter(pl.col("state") == "sent")
        assert set(sent["price"].to_list()) == {0.0079}
        assert set(sent["price_currency"].to_list()) == {"USD"}
        report = cost_report(ledger, load_prices(DEFAULT_PRICES), "winback_whatsapp")
        (row,) = report.frame.filter(
            (pl.col("channel") == "sms") & (pl.col("actual_currency") == "USD")
        ).iter_rows(named=True)
        assert row["reported"] == row["sends"] == sms.height
        assert row["actual_cost"] == pytest.approx(0.0079 * sms.height)
    finally:
        ledger.dispose()


def test_a_throttled_or_unknown_message_is_left_for_the_next_reconcile(
    sandbox: SandboxServer, sandbox_settings: Any
) -> None:
    twilio = connector_from_settings("twilio", sandbox_settings)

    async def ask(ids: list[str]) -> Any:
        async with httpx.AsyncClient(timeout=10) as client:
            return await twilio.fetch_prices(client, ids)  # type: ignore[attr-defined]

    assert asyncio.run(ask(["SM" + "0" * 32])) == {}  # Twilio does not know it: 404
    sandbox.configure(rate_429=1.0)
    assert asyncio.run(ask(["SM" + "1" * 32, "SM" + "2" * 32])) == {}
