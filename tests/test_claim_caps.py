"""Frequency caps held at the claim: two activations that decided at the same moment (neither
saw the other's rows) still message a customer the cap allows once only once, on SQLite and
on a real PostgreSQL, whichever of their workers claims first."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from cdp_activation.ledger import ClaimRequest, FrequencyCap, Ledger, Settlement, sends
from cdp_activation.ledger.base import as_time
from cdp_activation.sandbox import SandboxServer
from conftest import cli_project
from test_ledger import chosen

ONE_A_WEEK = (FrequencyCap("marketing", "any", 1, 7),)
ALL_DAY = ("--send-window", "00:00-23:59", "--json")


# A claim worker: claims `batch` rows at a time (10 ms a request) with a cap of one message
# a week and records each as sent, until none of its partition's rows is planned; prints how
# many it sent.
_WORKER = """
import sys, time
from cdp_activation.ledger import ClaimRequest, FrequencyCap, Ledger, Settlement
url, activation, start, batch = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
caps = (FrequencyCap("marketing", "any", 1, 7),)
ledger = Ledger(url)
worker = ledger.register_worker(activation, "p", "initial", lease_seconds=60)
time.sleep(max(0.0, start - time.time()))
sent = 0
while ledger.counts(activation, "p").get("planned", 0):
    [rows] = ledger.claim(
        worker, activation, "p", "initial", [ClaimRequest("meta_whatsapp", batch)], caps=caps
    )
    time.sleep(0.01)  # the request (or, with none claimed, a pause before looking again)
    ledger.settle(worker, [Settlement(r.id, "sent", provider_message_id=f"m{r.id}") for r in rows])
    sent += len(rows)
ledger.dispose()
print(sent)
"""


def test_activations_that_planned_the_same_customers_at_once_send_each_one_message(
    ledger_url: str,
) -> None:
    """Both activations planned all 300 customers (each decided before the other wrote a
    row); four claim workers, two of each, send at once, two a few rows at a time and two
    all of them in one claim (PostgreSQL: a lock per bucket of customers, or the whole
    space). Every customer gets exactly one message; the other activation's row is
    cancelled, with the policy's reason, untried."""
    ledger = Ledger(ledger_url)
    for activation in ("winback", "experiment"):
        ledger.plan(activation, "p", chosen(300))
    ledger.dispose()
    start = str(time.time() + 2.0)  # all of them at once, after their imports
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, ledger_url, activation, start, batch],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for activation, batch in (
            ("winback", "7"),
            ("experiment", "300"),
            ("winback", "300"),
            ("experiment", "7"),
        )
    ]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-800:] for _, err in outputs]
    sent = [int(out) for out, _ in outputs]
    assert sum(sent) == 300, sent  # (whichever activation claimed each customer first)
    ledger = Ledger(ledger_url)
    rows = pl.concat(
        [ledger.rows("winback", "p"), ledger.rows("experiment", "p")], how="diagonal_relaxed"
    )
    ledger.dispose()
    per_customer = rows.group_by("customer_id").agg(
        (pl.col("state") == "sent").sum().alias("sent"),
        (pl.col("state") == "cancelled").sum().alias("cancelled"),
    )
    assert per_customer.height == 300
    assert per_customer["sent"].to_list() == [1] * 300
    assert per_customer["cancelled"].to_list() == [1] * 300
    cancelled = rows.filter(pl.col("state") == "cancelled")
    assert set(cancelled["error_code"]) == {"frequency_capped"}
    assert "another message to this customer" in cancelled["error_message"][0]
    # Never tried: no attempt counted, no request number, no worker holding it.
    assert set(cancelled["attempts"]) == {0}
    assert cancelled["request_id"].is_null().all() and cancelled["claimed_by"].is_null().all()


def _as_sent(
    ledger: Ledger,
    activation: str,
    partition: str,
    customer: int,
    days_ago: float,
    channel: str = "whatsapp",
    state: str = "sent",
    purpose: str = "marketing",
) -> None:
    """A message of another activation or partition to `customer`, `days_ago` days ago."""
    frame = chosen(1, start=customer).with_columns(channel=pl.lit(channel))
    ledger.plan(activation, partition, frame, purpose=purpose)
    at = datetime.now(UTC) - timedelta(days=days_ago)
    with ledger.engine.begin() as con:
        con.execute(
            sends.update()
            .where(
                sends.c.activation == activation,
                sends.c.partition_key == partition,
                sends.c.customer_id == str(customer),
            )
            .values(state=state, sent_at=at if state == "sent" else None, updated_at=at)
        )


def test_the_claim_counts_what_the_policy_counts(ledger_url: str) -> None:
    """Sent and `unknown` messages of other activations and of this activation's other
    partitions, and planned ones that went out before (their provider may hold them), within
    each cap's days and of its purpose and channel, stop a claimed row; one in flight makes
    it wait a moment; planned or failed ones, older ones and this partition's own do not."""
    ledger = Ledger(ledger_url)
    _as_sent(ledger, "winback", "yesterday", 1, days_ago=3)  # this activation, another day
    _as_sent(ledger, "cart", "p", 2, days_ago=10, channel="sms")  # before the week
    _as_sent(ledger, "cart", "p", 3, days_ago=1, state="failed")
    _as_sent(ledger, "cart", "p", 4, days_ago=1, state="unknown")
    _as_sent(ledger, "cart", "p", 5, days_ago=0, state="planned")
    _as_sent(ledger, "cart", "p", 6, days_ago=0, state="in_flight")
    _as_sent(ledger, "cart", "p", 7, days_ago=1, purpose="transactional")
    _as_sent(ledger, "cart", "p", 8, days_ago=10)  # outside the week, inside WhatsApp's 14 days
    _as_sent(ledger, "cart", "p", 9, days_ago=10, channel="sms")
    # Customer 11: cart's request went out, its answer was lost; it waits to be asked again
    # under its key, and may have reached them.
    _as_sent(ledger, "cart", "p", 11, days_ago=0, state="planned")
    with ledger.engine.begin() as con:
        con.execute(
            sends.update()
            .where(sends.c.activation == "cart", sends.c.customer_id == "11")
            .values(request_id=42, attempts=1)
        )
    # 12: cart's message has been in flight for ten minutes (its worker gone): it may have
    # gone. 13: cart's one-message request was tried, its answer uncertain: asked again later.
    _as_sent(ledger, "cart", "p", 12, days_ago=10 / 1440, state="in_flight")
    _as_sent(ledger, "cart", "p", 13, days_ago=0, state="planned")
    with ledger.engine.begin() as con:
        con.execute(
            sends.update()
            .where(sends.c.activation == "cart", sends.c.customer_id == "13")
            .values(attempts=1)
        )
    ledger.plan("winback", "p", chosen(13))
    caps = (*ONE_A_WEEK, FrequencyCap("marketing", "whatsapp", 1, 14))
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    [rows] = ledger.claim(
        worker, "winback", "p", "initial", [ClaimRequest("meta_whatsapp", 20)], caps=caps
    )
    assert sorted(int(r.customer_id) for r in rows) == [2, 3, 5, 7, 9, 10]
    codes = dict(
        ledger.rows("winback", "p")
        .filter(pl.col("state") == "cancelled")
        .select(pl.col("customer_id").cast(pl.Int64), "error_code")
        .iter_rows()
    )
    assert codes == {
        1: "frequency_capped",
        4: "frequency_capped",
        8: "whatsapp_frequency_capped",
        11: "frequency_capped",
        12: "frequency_capped",
        13: "frequency_capped",
    }
    # 6: cart's message is in flight now: winback's waits, untried, for its end.
    [waiting] = (
        ledger.rows("winback", "p").filter(pl.col("customer_id") == "6").iter_rows(named=True)
    )
    assert waiting["state"] == "planned" and waiting["attempts"] == 0
    assert "in flight" in waiting["error_message"]
    assert as_time(waiting["not_before"]) > datetime.now(UTC)
    # A transactional activation is not held by marketing caps; two a week allow one more.
    ledger.plan("receipts", "p", chosen(3, start=4), purpose="transactional")
    worker = ledger.register_worker("receipts", "p", "initial", lease_seconds=60)
    [rows] = ledger.claim(
        worker, "receipts", "p", "initial", [ClaimRequest("meta_whatsapp", 5)], caps=caps
    )
    assert len(rows) == 3
    ledger.plan("weekly", "p", chosen(2, start=9))
    worker = ledger.register_worker("weekly", "p", "initial", lease_seconds=60)
    twice = (FrequencyCap("marketing", "any", 2, 7),)
    [rows] = ledger.claim(
        worker, "weekly", "p", "initial", [ClaimRequest("meta_whatsapp", 5)], caps=twice
    )
    # Each has one message in the week (winback's, just claimed): two allow one more.
    assert sorted(int(r.customer_id) for r in rows) == [9, 10]
    ledger.dispose()


def test_a_row_waiting_for_a_message_in_flight_follows_how_it_ended(ledger_url: str) -> None:
    """Claimed while another activation's message to the customer is in flight, a row waits
    a few seconds; then it is cancelled if that message went, and goes if it was given back
    unsent (the customer's quiet hours, say)."""
    ledger = Ledger(ledger_url)
    _as_sent(ledger, "cart", "p", 1, days_ago=0, state="in_flight")
    _as_sent(ledger, "cart", "p", 2, days_ago=0, state="in_flight")
    ledger.plan("winback", "p", chosen(2))
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    want = [ClaimRequest("meta_whatsapp", 5)]
    assert ledger.claim(worker, "winback", "p", "initial", want, caps=ONE_A_WEEK) == [[]]
    assert ledger.counts("winback", "p") == {"planned": 2}
    with ledger.engine.begin() as con:
        for customer, state in (("1", "sent"), ("2", "planned")):
            con.execute(
                sends.update()
                .where(sends.c.activation == "cart", sends.c.customer_id == customer)
                .values(state=state, sent_at=datetime.now(UTC) if state == "sent" else None)
            )
    later = datetime.now(UTC) + timedelta(seconds=6)
    [rows] = ledger.claim(worker, "winback", "p", "initial", want, now=later, caps=ONE_A_WEEK)
    assert [r.customer_id for r in rows] == ["2"] and rows[0].attempts == 1
    assert ledger.counts("winback", "p") == {"in_flight": 1, "cancelled": 1}
    ledger.dispose()


def test_a_row_tried_before_keeps_its_customer(ledger_url: str) -> None:
    """The first claim wins the customer and keeps them through its retries: a row tried
    before (a 429, an answer lost one at a time) may already be at its provider, and is
    never held back by a message another activation sent meanwhile."""
    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(1))
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    want = [ClaimRequest("meta_whatsapp", 5)]
    [first] = ledger.claim(worker, "winback", "p", "initial", want, caps=ONE_A_WEEK)
    ledger.settle(worker, [Settlement(first[0].id, "planned", error_code="503")])
    _as_sent(ledger, "cart", "p", 1, days_ago=0)
    [again] = ledger.claim(worker, "winback", "p", "initial", want, caps=ONE_A_WEEK)
    assert [r.id for r in again] == [first[0].id] and again[0].attempts == 2
    ledger.dispose()


def test_a_request_its_provider_may_hold_is_not_split_by_a_cap(ledger_url: str) -> None:
    """A request whose answer was lost is asked again with exactly its rows, even where a
    cap would now stop one of them: taken out, the request would change its key."""
    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(3))
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    whole = [ClaimRequest("meta_whatsapp", 3, True)]
    [first] = ledger.claim(worker, "winback", "p", "initial", whole, caps=ONE_A_WEEK)
    ledger.settle(worker, [Settlement(r.id, "planned", uncertain=True) for r in first])
    _as_sent(ledger, "cart", "p", 2, days_ago=0)  # meanwhile, another activation reached 2
    [again] = ledger.claim(worker, "winback", "p", "initial", whole, caps=ONE_A_WEEK)
    assert sorted(r.id for r in again) == sorted(r.id for r in first)
    assert all(r.resent_request for r in again)
    ledger.dispose()


def test_without_caps_the_claim_holds_nothing_back(ledger_url: str) -> None:
    """An activation with no caps claims as before."""
    ledger = Ledger(ledger_url)
    _as_sent(ledger, "cart", "p", 1, days_ago=0)
    ledger.plan("winback", "p", chosen(3))
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    want = [ClaimRequest("meta_whatsapp", 5)]
    assert len(ledger.claim(worker, "winback", "p", "initial", want)[0]) == 3
    ledger.dispose()


@pytest.mark.integration
@pytest.mark.e2e
def test_two_activations_run_at_once_message_each_customer_once(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    """winback_whatsapp and winback_experiment share their audience and the default cap (one
    marketing message a week). Started together, each decides before the other has planned
    anything; whichever claims a customer first messages them, and nobody hears from both."""
    import dagster as dg

    project = cli_project(tmp_path, sandbox, customers=800)
    # The instance and the ledger as a deployment has them before its runs.
    dg.DagsterInstance.from_config(str(project.home)).dispose()
    Ledger(project.ledger_url).dispose()
    runs = [
        subprocess.Popen(
            [str(Path(sys.executable).parent / "cdp-activation"), "run", name, *ALL_DAY],
            cwd=project.tmp,
            env=project.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("winback_whatsapp", "winback_experiment")
    ]
    for process in runs:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, out + err
        assert json.loads(out.strip().splitlines()[-1])["success"]
    ledger = Ledger(project.ledger_url)
    try:
        rows = pl.concat(
            [ledger.rows("winback_whatsapp"), ledger.rows("winback_experiment")],
            how="diagonal_relaxed",
        )
    finally:
        ledger.dispose()
    sent = rows.filter(pl.col("state") == "sent")
    assert sent.height > 50
    assert sent["customer_id"].is_unique().all(), "a customer heard from both activations"
    # Whoever a cap stopped at the claim had their one message from the other activation.
    capped = rows.filter(pl.col("error_code") == "frequency_capped")["customer_id"]
    assert capped.is_in(sent["customer_id"].implode()).all()
    print(f"stopped at the claim: {capped.len()}, sent: {sent.height}")
