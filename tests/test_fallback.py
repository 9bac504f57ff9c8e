"""Which first messages are due a fallback, on a real ledger (SQLite and PostgreSQL).

Each customer's first message is put in a known state the way delivery and the status
receiver put it there (plan, in flight, the provider's answer, status reports), and the
ledger's selection is checked against the rules of `channel_plan.fallback`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import polars as pl
import pytest

from cdp_activation.connectors.base import Outcome, SendResult
from cdp_activation.contracts import InboundMessage, StatusEvent
from cdp_activation.ledger import (
    FALLBACK_STEP,
    PRIMARY_NOT_DELIVERED,
    PRIMARY_NOT_READ,
    PRIMARY_UNREACHABLE,
    Ledger,
    sends,
)

pytestmark = pytest.mark.integration

CODES = {"meta_whatsapp": frozenset({"131026"})}
# customer -> (outcome of the send, its error code, the status reports that followed)
FIRST_MESSAGES: dict[str, tuple[Outcome, str | None, list[tuple[str, str | None]]]] = {
    "delivered": (Outcome.SENT, None, [("sent", None), ("delivered", None)]),
    "read": (Outcome.SENT, None, [("delivered", None), ("read", None)]),
    "silent": (Outcome.SENT, None, []),  # accepted, never reported beyond that
    "only_sent": (Outcome.SENT, None, [("sent", None)]),
    "reported_unreachable": (Outcome.SENT, None, [("sent", None), ("failed", "131026")]),
    "reported_other_failure": (Outcome.SENT, None, [("failed", "131000")]),
    "refused_unreachable": (Outcome.FAILED, "131026", []),
    "refused_other": (Outcome.FAILED, "131047", []),
    "lost_answer": (Outcome.UNKNOWN, None, []),
    "retries_exhausted": (Outcome.RETRY, "http_503", []),
}


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    ledger = Ledger(ledger_url)
    _first_messages(ledger)
    yield ledger
    ledger.dispose()


def _first_messages(ledger: Ledger) -> None:
    customers = list(FIRST_MESSAGES)
    n = len(customers)
    frame = pl.DataFrame(
        {
            "customer_id": customers,
            "phone_e164": [f"+4479111{i:05d}" for i in range(n)],
            "channel": ["whatsapp"] * n,
            "connector": ["meta_whatsapp"] * n,
            "step": ["initial"] * n,
            "template_name": ["winback_offer"] * n,
            "template_language": ["en"] * n,
            "variables": [["Ann"]] * n,
            "body": [None] * n,
        },
        schema_overrides={"body": pl.String},
    )
    # An SMS first message never falls back to SMS.
    sms = frame.head(1).with_columns(
        customer_id=pl.lit("sms_customer"),
        channel=pl.lit("sms"),
        connector=pl.lit("twilio"),
        template_name=pl.lit(None, dtype=pl.String),
        body=pl.lit("Hi"),
    )
    ledger.plan("winback", "2026-12-01", pl.concat([frame, sms]))
    rows = {r.customer_id: r for r in ledger.pending("winback", "2026-12-01")}
    ledger.mark_in_flight([r.id for r in rows.values()])
    results = []
    for customer, (outcome, code, _) in FIRST_MESSAGES.items():
        row = rows[customer]
        pid = f"wamid.{customer}" if outcome == Outcome.SENT else None
        results.append((row.id, SendResult(row.idempotency_key, outcome, pid, error_code=code), 1))
    results.append(
        (rows["sms_customer"].id, SendResult("k", Outcome.FAILED, None, error_code="30003"), 1)
    )
    ledger.record(results)
    at = datetime.now(UTC)
    events = [
        StatusEvent("meta", f"wamid.{customer}", status, at, f"{customer}|{status}", code)
        for customer, (_, _, reports) in FIRST_MESSAGES.items()
        for status, code in reports
    ]
    ledger.record_statuses(events)


def _due(ledger: Ledger, *, window_passed: bool, read_window: bool = False) -> dict[str, str]:
    now = datetime.now(UTC)
    by = now + timedelta(minutes=1) if window_passed else now - timedelta(minutes=30)
    frame = ledger.due_fallbacks(
        "winback",
        "sms",
        not_delivered_by=by,
        not_read_by=by if read_window else None,
        unreachable_codes=CODES,
    )
    return dict(zip(frame["customer_id"], frame["fallback_reason"], strict=True))


def test_before_the_window_only_unreachable_customers_fall_back(ledger: Ledger) -> None:
    assert _due(ledger, window_passed=False) == {
        "reported_unreachable": PRIMARY_UNREACHABLE,
        "refused_unreachable": PRIMARY_UNREACHABLE,
    }


def test_after_the_window_everything_not_delivered_falls_back_but_unknown_never(
    ledger: Ledger,
) -> None:
    assert _due(ledger, window_passed=True) == {
        "silent": PRIMARY_NOT_DELIVERED,
        "only_sent": PRIMARY_NOT_DELIVERED,
        "reported_unreachable": PRIMARY_UNREACHABLE,
        "reported_other_failure": PRIMARY_NOT_DELIVERED,
        "refused_unreachable": PRIMARY_UNREACHABLE,
        "refused_other": PRIMARY_NOT_DELIVERED,
        "retries_exhausted": PRIMARY_NOT_DELIVERED,
    }


def test_not_read_falls_back_only_when_the_plan_asks(ledger: Ledger) -> None:
    due = _due(ledger, window_passed=True, read_window=True)
    assert due["delivered"] == PRIMARY_NOT_READ
    assert "read" not in due and "lost_answer" not in due


def _fallback_rows(
    ledger: Ledger,
    customers: list[str],
    decision: str,
    not_before: datetime | None = None,
    read_window: bool = False,
) -> None:
    by = datetime.now(UTC) + timedelta(minutes=1)
    due = ledger.due_fallbacks(
        "winback",
        "sms",
        not_delivered_by=by,
        not_read_by=by if read_window else None,
        unreachable_codes=CODES,
    ).filter(pl.col("customer_id").is_in(customers))
    n = due.height
    ledger.plan(
        "winback",
        "2026-12-01",
        due.select("customer_id", "fallback_of", "fallback_reason").with_columns(
            phone_e164=pl.lit("+447911100000"),
            channel=pl.lit("sms"),
            connector=pl.lit("twilio"),
            step=pl.lit(FALLBACK_STEP),
            template_name=pl.lit(None, dtype=pl.String),
            template_language=pl.lit(None, dtype=pl.String),
            variables=pl.lit(None, dtype=pl.List(pl.String)),
            body=pl.lit("Hi"),
            decision=pl.lit(decision),
            reason=pl.lit("sms_no_consent" if decision == "exclude" else None, dtype=pl.String),
            not_before=pl.lit(not_before, dtype=pl.Datetime("us", "UTC")),
        ),
    )
    assert n == len(customers)


def test_a_decided_fallback_is_not_due_again_and_a_planned_one_is_decided_again(
    ledger: Ledger,
) -> None:
    _fallback_rows(ledger, ["silent"], "exclude")
    _fallback_rows(ledger, ["only_sent"], "send")
    due = _due(ledger, window_passed=True)
    assert "silent" not in due  # refused (excluded, with its reason): decided once
    assert due["only_sent"] == PRIMARY_NOT_DELIVERED  # planned, not sent: the policy looks again
    rows = ledger.rows("winback").filter(pl.col("step") == FALLBACK_STEP)
    refused = rows.filter(pl.col("customer_id") == "silent").row(0, named=True)
    assert (refused["state"], refused["error_code"]) == ("excluded", "sms_no_consent")
    assert refused["fallback_reason"] == PRIMARY_NOT_DELIVERED


def _fallback_states(ledger: Ledger) -> dict[str, str]:
    rows = ledger.rows("winback").filter(pl.col("step") == FALLBACK_STEP)
    return dict(zip(rows["customer_id"], rows["state"], strict=True))


def test_a_delivery_report_cancels_the_planned_fallback_as_it_is_recorded(
    ledger: Ledger,
) -> None:
    """The first message is reported delivered after its fallback was planned, before any
    worker claimed it: the report's own write cancels the fallback, so no claim can take it
    (the next run's preparation would be too late for a worker already claiming)."""
    _fallback_rows(ledger, ["silent", "only_sent"], "send")
    late = StatusEvent("meta", "wamid.silent", "delivered", datetime.now(UTC), "late|delivered")
    assert ledger.record_statuses([late]).advanced == 1
    assert _fallback_states(ledger) == {"silent": "cancelled", "only_sent": "planned"}
    # Every cancelled row says why, in the policy's words.
    assert ledger.cancelled_by_reason("winback", "2026-12-01") == {"fallback_not_due": 1}
    pending = ledger.pending("winback", "2026-12-01", step=FALLBACK_STEP)
    assert [r.customer_id for r in pending] == ["only_sent"]
    assert ledger.cancel_landed_fallbacks("winback", "2026-12-01") == 0  # nothing left over


def test_a_fallback_for_an_unread_message_is_cancelled_by_read_not_by_delivered(
    ledger: Ledger,
) -> None:
    _fallback_rows(ledger, ["delivered"], "send", read_window=True)
    now = datetime.now(UTC)
    again = StatusEvent("meta", "wamid.delivered", "delivered", now, "again|delivered")
    ledger.record_statuses([again])
    assert _fallback_states(ledger) == {"delivered": "planned"}
    read = StatusEvent("meta", "wamid.delivered", "read", now, "late|read")
    assert ledger.record_statuses([read]).advanced == 1
    assert _fallback_states(ledger) == {"delivered": "cancelled"}


def test_an_answer_to_the_first_message_cancels_its_fallback_and_keeps_it_from_being_due(
    ledger: Ledger,
) -> None:
    """A customer who wrote back on WhatsApp got the WhatsApp message, whatever its delivery
    report says (lost, late, or read receipts off): a STOP or any reply cancels the planned
    SMS fallback, and a first message answered is no longer due one."""
    _fallback_rows(ledger, ["silent"], "send")
    phones = {c: f"+4479111{i:05d}" for i, c in enumerate(FIRST_MESSAGES)}
    now = datetime.now(UTC)

    def reply(customer: str, text: str, kind: str = "text", at: datetime = now) -> InboundMessage:
        return InboundMessage(
            "meta",
            f"meta|inbound|{customer}|{kind}",
            f"wamid.in.{customer}.{kind}",
            "whatsapp",
            phones[customer],
            at,
            kind,
            text,
        )

    # A system notice (the number changed) is no answer: nothing changes. Nor is a message
    # written an hour before the send, whatever the offset its provider wrote its time in.
    before = (now - timedelta(hours=1)).astimezone(timezone(timedelta(hours=5)))
    ledger.record_inbound([reply("silent", "", kind="system")])
    early = [reply(c, "hello?", kind="early", at=before) for c in ("silent", "only_sent")]
    ledger.record_inbound(early)
    assert _fallback_states(ledger) == {"silent": "planned"}
    assert "only_sent" in _due(ledger, window_passed=True)
    answers = [reply("silent", "STOP"), reply("only_sent", "thanks!")]
    # One whose message was reported failed writes too: about something else, it proves
    # nothing of this message, which still falls back.
    answers.append(reply("reported_other_failure", "where is my order?"))
    written = ledger.record_inbound(answers)
    assert written.cancelled >= 1
    assert _fallback_states(ledger) == {"silent": "cancelled"}
    due = _due(ledger, window_passed=True)
    assert "only_sent" not in due and "silent" not in due
    assert due["reported_other_failure"] == PRIMARY_NOT_DELIVERED


def test_a_landed_fallback_kept_in_a_request_is_not_taken_out_of_it(ledger: Ledger) -> None:
    """A fallback kept in a request its provider may already hold goes out again with that
    whole request (the same key): taken out alone, the request would carry another key and
    reach its other recipients twice."""
    _fallback_rows(ledger, ["silent", "only_sent"], "send")
    with ledger.engine.begin() as con:
        con.execute(sends.update().where(sends.c.step == FALLBACK_STEP).values(request_id=42))
    late = StatusEvent("meta", "wamid.silent", "delivered", datetime.now(UTC), "late|delivered")
    ledger.record_statuses([late])
    assert ledger.cancel_landed_fallbacks("winback", "2026-12-01") == 0
    assert _fallback_states(ledger) == {"silent": "planned", "only_sent": "planned"}


def test_the_sensor_asks_only_for_new_decisions_and_for_fallbacks_now_due(ledger: Ledger) -> None:
    """A fallback deferred by quiet hours is decided: its partition is not asked for again
    until the deferral ends (a run a minute all night, each re-running the audience SQL,
    otherwise); one a failed run planned and never sent is asked for at once."""
    now = datetime.now(UTC)
    undecided = {"silent", "only_sent", "reported_other_failure", "refused_other"}
    undecided |= {"retries_exhausted", "reported_unreachable", "refused_unreachable"}

    def sensor_view() -> tuple[set[str], set[str]]:
        due = ledger.due_fallbacks(
            "winback",
            "sms",
            not_delivered_by=now + timedelta(minutes=1),
            unreachable_codes=CODES,
            undecided_only=True,
        )
        return set(due["customer_id"]), ledger.partitions_with_pending("winback", "fallback", now)

    assert sensor_view() == (undecided, set())
    # Everyone decided: one refused, one deferred to the morning, the rest planned and unsent.
    _fallback_rows(ledger, ["silent"], "exclude")
    _fallback_rows(ledger, ["only_sent"], "defer", not_before=now + timedelta(hours=8))
    assert sensor_view() == (undecided - {"silent", "only_sent"}, set())
    rest = sorted(undecided - {"silent", "only_sent"})
    _fallback_rows(ledger, rest, "send")
    assert sensor_view() == (set(), {"2026-12-01"})  # planned and never sent: run again
    with ledger.engine.begin() as con:  # they went out; only the deferred one is left
        con.execute(
            sends.update()
            .where(sends.c.step == FALLBACK_STEP, sends.c.customer_id.in_(rest))
            .values(state="sent")
        )
    assert sensor_view() == (set(), set())
    assert ledger.partitions_with_pending("winback", "fallback", now + timedelta(hours=9)) == {
        "2026-12-01"
    }
    # A run (not the sensor) still decides the deferred one again: consent may have changed.
    run_view = ledger.due_fallbacks(
        "winback", "sms", not_delivered_by=now + timedelta(minutes=1), unreachable_codes=CODES
    )
    assert set(run_view["customer_id"]) == {"only_sent"}
    # Past the sensor's horizon nothing is looked at.
    stale = ledger.due_fallbacks(
        "winback",
        "sms",
        not_delivered_by=now + timedelta(minutes=1),
        unreachable_codes=CODES,
        changed_since=now + timedelta(minutes=1),
    )
    assert stale.is_empty()


def test_an_rcs_message_a_phone_cannot_take_falls_back_to_sms_at_once(ledger_url: str) -> None:
    """RCS through Infobip's Messages API falls back as WhatsApp does: its delivery report
    (Infobip's format, parsed as the receiver parses it) says UNDELIVERABLE, one of the
    connector's unreachable codes, and the SMS is due before the not-delivered window."""
    from cdp_activation.connectors.infobip import InfobipConnector
    from cdp_activation.connectors.status_parsers import parse_infobip

    store = Ledger(ledger_url)
    try:
        frame = pl.DataFrame(
            {
                "customer_id": ["rcs_unreachable", "rcs_delivered"],
                "phone_e164": ["+447911100001", "+447911100002"],
                "channel": ["rcs", "rcs"],
                "connector": ["infobip", "infobip"],
                "step": ["initial", "initial"],
                "template_name": [None, None],
                "template_language": [None, None],
                "variables": [None, None],
                "body": ["Your cart is waiting", "Your cart is waiting"],
            },
            schema_overrides={
                "template_name": pl.String,
                "template_language": pl.String,
                "variables": pl.List(pl.String),
            },
        )
        store.plan("carts", "2026-12-05T10:15", frame)
        rows = {r.customer_id: r for r in store.pending("carts", "2026-12-05T10:15")}
        store.mark_in_flight([r.id for r in rows.values()])
        store.record(
            [
                (r.id, SendResult(r.idempotency_key, Outcome.SENT, f"ib-{c}"), 1)
                for c, r in rows.items()
            ]
        )
        # A report after the send (an older one would be kept as stale, never applied).
        done_at = (datetime.now(UTC) + timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S.000+0000")
        report = {
            "results": [
                {
                    "event": "DELIVERY",
                    "channel": "RCS",
                    "messageId": "ib-rcs_unreachable",
                    "doneAt": done_at,
                    "status": {"groupName": "UNDELIVERABLE", "name": "UNDELIVERABLE_NOT_DELIVERED"},
                    "error": {"id": 0, "name": "NO_ERROR"},
                },
                {
                    "event": "DELIVERY",
                    "channel": "RCS",
                    "messageId": "ib-rcs_delivered",
                    "doneAt": done_at,
                    "status": {"groupName": "DELIVERED", "name": "DELIVERED_TO_HANDSET"},
                    "error": {"id": 0, "name": "NO_ERROR"},
                },
            ]
        }
        store.record_statuses(parse_infobip(json.dumps(report).encode(), datetime.now(UTC)))
        due = store.due_fallbacks(
            "carts",
            "sms",
            not_delivered_by=datetime.now(UTC) - timedelta(minutes=30),
            unreachable_codes={"infobip": InfobipConnector.capabilities.unreachable_codes},
        )
        assert dict(zip(due["customer_id"], due["fallback_reason"], strict=True)) == {
            "rcs_unreachable": PRIMARY_UNREACHABLE
        }
    finally:
        store.dispose()


def test_a_report_written_while_its_fallback_is_planned_is_seen_by_the_run_on_postgresql(
    ledger: Ledger,
) -> None:
    """A receiver's transaction has moved the first message to `delivered` but not committed
    when the run plans its fallback (so the receiver found no fallback to cancel) and then
    looks for landed ones: the run waits for that commit and cancels the fallback, instead of
    reading the first message as it was and letting a worker send it."""
    if ledger.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite's single writer orders the two writes")
    first_id = ledger.rows("winback").filter(pl.col("customer_id") == "silent")["id"][0]
    receiver = ledger.engine.connect()
    writing = receiver.begin()
    receiver.execute(
        sends.update().where(sends.c.id == first_id).values(delivery_status="delivered")
    )
    _fallback_rows(ledger, ["silent"], "send")
    cancelled: list[int] = []
    run = threading.Thread(
        target=lambda: cancelled.append(ledger.cancel_landed_fallbacks("winback", "2026-12-01"))
    )
    run.start()
    run.join(0.5)
    assert run.is_alive(), "the run did not wait for the receiver's transaction"
    writing.commit()
    receiver.close()
    run.join(10)
    assert cancelled == [1]
    assert _fallback_states(ledger) == {"silent": "cancelled"}


def test_a_free_form_message_its_window_outran_falls_back_at_once(ledger_url: str) -> None:
    """A free-form WhatsApp message still planned when its customer's 24-hour window closed
    is cancelled at its claim and never sent: the customer is due the SMS fallback at once,
    with the window's own reason. Not one kept in a request its provider may hold (that
    request may have reached them), nor a customer whose message was cancelled because they
    said stop."""
    from cdp_activation.ledger import PRIMARY_WINDOW_CLOSED, ClaimRequest

    now = datetime.now(UTC)
    closed, open_ = now - timedelta(hours=1), now + timedelta(hours=3)
    customers = ["closed", "closed_kept", "kept_partner", "open", "stopped"]
    windows = [closed, closed, open_, open_, open_]
    n = len(customers)
    phones = [f"+4479222{i:05d}" for i in range(n)]
    frame = pl.DataFrame(
        {
            "customer_id": customers,
            "phone_e164": phones,
            "channel": ["whatsapp"] * n,
            "connector": ["meta_whatsapp"] * n,
            "step": ["initial"] * n,
            "template_name": [None] * n,
            "template_language": [None] * n,
            "variables": [None] * n,
            "body": ["Your order is ready"] * n,
            "window_until": windows,
        },
        schema_overrides={
            "template_name": pl.String,
            "template_language": pl.String,
            "variables": pl.List(pl.String),
            "window_until": pl.Datetime("us", "UTC"),
        },
    )
    ledger = Ledger(ledger_url)
    ledger.plan("winback", "2026-12-01", frame)
    with ledger.engine.begin() as con:
        kept = sends.c.customer_id.in_(["closed_kept", "kept_partner"])
        con.execute(sends.update().where(kept).values(request_id=7))
        # As a STOP while it waited leaves it (`cancel_opted_out`).
        con.execute(
            sends.update()
            .where(sends.c.customer_id == "stopped")
            .values(state="cancelled", error_code="whatsapp_opted_out")
        )
    assert _due(ledger, window_passed=True) == {}  # nothing sent, nor cancelled by its window

    worker = ledger.register_worker("winback", "2026-12-01", "initial", lease_seconds=60)
    claimed = ledger.claim(
        worker, "winback", "2026-12-01", "initial", [ClaimRequest("meta_whatsapp", 10)], now=now
    )
    assert [r.customer_id for r in claimed[0]] == ["open"]
    states = dict(ledger.rows("winback", "2026-12-01").select("customer_id", "state").rows())
    assert states == {
        "closed": "cancelled",
        "closed_kept": "cancelled",
        "kept_partner": "unknown",
        "open": "in_flight",
        "stopped": "cancelled",
    }
    # At once: before the plan's not-delivered window has passed.
    assert _due(ledger, window_passed=False) == {"closed": PRIMARY_WINDOW_CLOSED}
    frame = ledger.due_fallbacks(
        "winback", "sms", not_delivered_by=now - timedelta(minutes=30), unreachable_codes=CODES
    )
    assert frame.select("customer_id", "error_code").rows() == [
        ("closed", "whatsapp_outside_window")
    ]
    ledger.dispose()
