"""The delivery engine against the sandbox provider over real HTTP, with a real ledger."""

from __future__ import annotations

import socket
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest

from cdp_activation.connectors import connector_from_settings
from cdp_activation.connectors.base import TemplateError
from cdp_activation.delivery.engine import (
    DeliveryOptions,
    DeliveryScope,
    ProviderUnavailable,
    deliver,
)
from cdp_activation.ledger import Ledger
from cdp_activation.ledger.base import as_time
from cdp_activation.sandbox import SandboxServer
from cdp_activation.settings import Settings


def decisions(numbers: list[str], template: str = "winback_offer") -> pl.DataFrame:
    n = len(numbers)
    half = n // 2
    channel = ["whatsapp"] * half + ["sms"] * (n - half)
    return pl.DataFrame(
        {
            "customer_id": list(range(1, n + 1)),
            "phone_e164": numbers,
            "channel": channel,
            "connector": ["meta_whatsapp" if c == "whatsapp" else "twilio" for c in channel],
            "step": ["initial"] * n,
            "template_name": [template if c == "whatsapp" else None for c in channel],
            "template_language": ["en" if c == "whatsapp" else None for c in channel],
            "variables": [
                ["Ann", "90", f"C{i}"] if c == "whatsapp" else None for i, c in enumerate(channel)
            ],
            "body": [None if c == "whatsapp" else f"Hi {i}" for i, c in enumerate(channel)],
        },
        schema_overrides={"variables": pl.List(pl.String)},
    )


def numbers(n: int) -> list[str]:
    return [f"+4471234{i:05d}" for i in range(10, 10 + n)]


def connectors(settings: Settings) -> dict:
    return {name: connector_from_settings(name, settings) for name in ("meta_whatsapp", "twilio")}


HOUR, MINUTE = timedelta(hours=1), timedelta(minutes=1)
FAST = DeliveryOptions(backoff_initial=0.01, backoff_max=0.05, max_attempts=3)
SCOPE = DeliveryScope("winback", "p")


def test_every_planned_row_is_sent_once_and_recorded(
    tmp_path, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    frame = decisions(numbers(300))
    ledger.plan("winback", "p", frame)
    report = deliver(ledger, SCOPE, connectors(sandbox_settings), FAST)

    rows = ledger.rows("winback", "p")
    received = sandbox.messages()
    not_on_whatsapp = [n for n in numbers(150) if n.endswith("13")]
    assert report.failed == len(not_on_whatsapp) == rows.filter(pl.col("state") == "failed").height
    assert report.sent == 300 - len(not_on_whatsapp) == len(received)
    # The provider's id of every accepted message is in the ledger, each exactly once.
    assert sorted(rows.filter(pl.col("state") == "sent")["provider_message_id"].to_list()) == (
        sorted(m.provider_message_id for m in received)
    )
    assert max(Counter(m.to for m in received).values()) == 1
    assert Counter(m.provider for m in received) == {
        "meta_whatsapp": 150 - len(not_on_whatsapp),
        "twilio": 150,
    }
    failed = rows.filter(pl.col("state") == "failed")
    assert set(failed["error_code"].to_list()) == {"131026"}
    # Nothing is left to send: a second pass is a no-op.
    assert ledger.pending("winback", "p") == []


def test_a_template_problem_stops_the_activation_and_sends_nothing(
    tmp_path, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    frame = decisions(numbers(40), template="spring_sale").filter(pl.col("channel") == "whatsapp")
    ledger.plan("winback", "p", frame)
    with pytest.raises(TemplateError) as raised:
        deliver(ledger, SCOPE, connectors(sandbox_settings), FAST)
    assert "spring_sale" in str(raised.value)
    assert sandbox.messages() == []
    # Nobody is lost: every row is back to planned, to go once the template is fixed.
    assert ledger.counts("winback", "p") == {"planned": 20}


def test_a_message_claimed_after_its_customer_s_quiet_hours_began_waits_for_them_to_end(
    ledger_url: str, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    """The policy decided these messages before their customers' quiet hours; a long send (a
    slow rate, retries) reached half of them after those began. Those are not sent: each goes
    back, unsent, its attempt given back, until the quiet hours end. Through LINE, whose
    requests carry many users, a request goes without them, and they in requests of their own
    making later (never with the key of one already sent)."""
    from crash_worker import line_audience, sandbox_connectors

    now = datetime.now(UTC)
    began, ends = now - timedelta(minutes=1), now + timedelta(hours=10)

    def windows(frame: pl.DataFrame) -> pl.DataFrame:
        closed = pl.int_range(pl.len()) % 2 == 0
        utc = pl.Datetime("us", "UTC")
        return frame.with_columns(
            pl.when(closed).then(pl.lit(began)).otherwise(ends).cast(utc).alias("send_until"),
            pl.lit(ends + timedelta(hours=14)).cast(utc).alias("reopens_at"),
        )

    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", windows(decisions(numbers(20))))
    ledger.plan(
        "winback", "p", windows(line_audience(20).with_columns(pl.col("customer_id") + 100))
    )
    report = deliver(ledger, SCOPE, sandbox_connectors(sandbox.url), FAST)
    # Half of each: 20 answered (one number is not on WhatsApp), 20 held.
    assert (report.sent + report.failed, report.quiet_hours) == (20, 20)
    rows = ledger.rows("winback", "p")
    waiting = rows.filter(pl.col("state") == "planned")
    assert waiting.height == 20 and waiting.filter(pl.col("connector") == "line").height == 10
    assert set(waiting["recipient"]).isdisjoint(m.to for m in sandbox.messages())
    assert waiting["attempts"].to_list() == [0] * 20
    assert waiting["request_id"].null_count() == 20
    assert {as_time(t) for t in waiting["not_before"]} == {ends + timedelta(hours=14)}
    assert rows.filter(pl.col("state").is_in(["sent", "failed"])).height == 20
    ledger.dispose()


def test_a_free_form_whatsapp_message_reached_after_its_window_closed_is_not_sent(
    ledger_url: str, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    """Free-form WhatsApp messages decided inside their customers' 24-hour windows; a long
    send reached half of them after those closed. Those are never sent: cancelled, with the
    policy's reason code; the others go."""
    now = datetime.now(UTC)
    closed = pl.int_range(pl.len()) % 2 == 0
    frame = (
        decisions(numbers(20))
        .filter(pl.col("channel") == "whatsapp")
        .with_columns(
            template_name=pl.lit(None, pl.String),
            template_language=pl.lit(None, pl.String),
            variables=pl.lit(None, pl.List(pl.String)),
            body=pl.lit("Thanks for your message: your parcel leaves today"),
        )
        .with_columns(
            pl.when(closed)
            .then(pl.lit(now - MINUTE))
            .otherwise(pl.lit(now + HOUR))
            .cast(pl.Datetime("us", "UTC"))
            .alias("window_until")
        )
    )
    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", frame)
    report = deliver(ledger, SCOPE, connectors(sandbox_settings), FAST)
    rows = ledger.rows("winback", "p").sort("customer_id")
    cancelled = rows.filter(pl.col("state") == "cancelled")
    assert cancelled["recipient"].to_list() == frame.filter(closed)["phone_e164"].to_list()
    assert ledger.cancelled_by_reason("winback", "p") == {"whatsapp_outside_window": 5}
    received = {m.to for m in sandbox.messages()}
    assert received.isdisjoint(cancelled["recipient"])
    assert report.sent + report.failed == 5  # (one number is not on WhatsApp)
    assert report.sent == len(received)
    assert ledger.pending("winback", "p") == []
    ledger.dispose()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_line_request_answered_5xx_after_line_took_it_goes_again_under_its_retry_key(
    ledger_url: str, sandbox: SandboxServer, seed: int
) -> None:
    """LINE warns that a 5xx may come after it sent the message, and de-duplicates only a
    request asked again with the same X-Line-Retry-Key. Half the multicasts are taken, then
    answered 500: each goes out again whole, under its key (LINE answers 409), never re-grouped
    with other users under a new key, which LINE would send again."""
    from crash_worker import line_audience, sandbox_connectors

    sandbox.configure(rate_5xx_after_accept=0.5, seed=seed)
    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", line_audience(1200, texts=3))
    options = DeliveryOptions(backoff_initial=0.01, backoff_max=0.05, max_attempts=10)
    deliver(ledger, SCOPE, {"line": sandbox_connectors(sandbox.url)["line"]}, options)
    faulted = [a for a in sandbox.attempts() if a.result == "server_error_after_accept"]
    assert faulted  # the fault did happen
    received = Counter(m.to for m in sandbox.messages())
    assert len(received) == 1200 and max(received.values()) == 1  # nobody twice, nobody lost
    assert ledger.counts("winback", "p") == {"sent": 1200}
    ledger.dispose()


def test_quiet_hours_are_kept_on_every_day_a_send_lasts_and_end_when_they_end(
    ledger_url: str, sandbox: SandboxServer
) -> None:
    """A message planned yesterday evening whose night is over goes now (it is not held
    again and again until yesterday's morning); one whose window has come round to today's
    night waits for today's morning."""
    from crash_worker import sandbox_connectors

    now = datetime.now(UTC)
    day, utc = timedelta(days=1), pl.Datetime("us", "UTC")
    frame = decisions(numbers(4)).with_columns(
        # Rows 0, 2 (WhatsApp, SMS): yesterday's night, over an hour ago. Rows 1, 3: the
        # night planned began a day and a minute ago, so today's began a minute ago.
        pl.Series("send_until", [now - 13 * HOUR, now - day - MINUTE] * 2, dtype=utc),
        pl.Series("reopens_at", [now - HOUR, now - day + 10 * HOUR] * 2, dtype=utc),
    )
    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", frame)
    report = deliver(ledger, SCOPE, sandbox_connectors(sandbox.url), FAST)
    assert (report.sent, report.quiet_hours) == (2, 2)
    rows = ledger.rows("winback", "p").sort("customer_id")
    assert rows["state"].to_list() == ["sent", "planned", "sent", "planned"]
    # Today's morning, an hour late at most (a clock change may have moved it since).
    assert as_time(rows["not_before"][1]) == now + 10 * HOUR + HOUR
    ledger.dispose()


@pytest.mark.parametrize(
    ("first_ends", "second_quiet", "outcome"),
    [
        # The first pair is quiet for 8 hours from a minute ago, the second from 2 to 9 hours
        # from now: all four are awake together in 9 hours.
        (8 * HOUR, (2 * HOUR, 9 * HOUR), "planned"),
        # The first pair is quiet until 12 hours from now, the second from 11 to 23 hours
        # from now: no moment within 12 hours finds them all awake.
        (12 * HOUR, (11 * HOUR, 23 * HOUR), "unknown"),
    ],
)
def test_a_request_the_provider_may_hold_goes_again_whole_only_when_all_are_awake(
    ledger_url: str,
    sandbox: SandboxServer,
    first_ends: timedelta,
    second_quiet: tuple[timedelta, timedelta],
    outcome: str,
) -> None:
    """A LINE request whose answer was lost goes out again whole, with its key, or not at
    all. Due again while some of its users are in quiet hours, it is not sent and not split:
    it waits, in its request, for the first moment none is; with none within 12 hours it is
    not sent again (unknown, as through a provider without a key)."""
    from cdp_activation.ledger import ClaimRequest, Settlement
    from crash_worker import line_audience, sandbox_connectors

    now = datetime.now(UTC)
    utc = pl.Datetime("us", "UTC")
    begins, ends = second_quiet
    frame = line_audience(4).with_columns(
        pl.Series("send_until", [now - MINUTE] * 2 + [now + begins] * 2, dtype=utc),
        pl.Series("reopens_at", [now + first_ends] * 2 + [now + ends] * 2, dtype=utc),
    )
    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", frame)
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    [rows] = ledger.claim(worker, "winback", "p", "initial", [ClaimRequest("line", 4, True)])
    # The answer was lost: the rows wait in their request, which goes out again whole.
    ledger.settle(worker, [Settlement(r.id, "planned", uncertain=True) for r in rows])
    ledger.stop_worker(worker)
    deliver(ledger, SCOPE, sandbox_connectors(sandbox.url), FAST)
    assert sandbox.messages() == []
    after = ledger.rows("winback", "p")
    assert after["state"].to_list() == [outcome] * 4
    if outcome == "planned":
        assert after["request_id"].unique().to_list() == [rows[0].request_id]
        assert {as_time(t) for t in after["not_before"]} == {now + 9 * HOUR}
    ledger.dispose()


def test_a_stop_from_one_customer_of_a_request_the_provider_may_hold_is_never_sent_to(
    ledger_url: str, sandbox: SandboxServer
) -> None:
    """A LINE request whose answer was lost goes out again whole, with its key, or not at
    all. One of its users says STOP meanwhile: sent whole it would reach who said stop, sent
    without them (another key) it could reach the others twice. It is not sent again: the
    user who said stop is cancelled, the others are unknown."""
    from cdp_activation.contracts import OPT_OUT, InboundMessage
    from cdp_activation.ledger import ClaimRequest, Settlement
    from crash_worker import line_audience, sandbox_connectors

    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", line_audience(4))
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    [rows] = ledger.claim(worker, "winback", "p", "initial", [ClaimRequest("line", 4, True)])
    ledger.settle(worker, [Settlement(r.id, "planned", uncertain=True) for r in rows])
    ledger.stop_worker(worker)
    stop = rows[1]
    ledger.record_inbound(
        [
            InboundMessage(
                provider="line",
                event_key="line|stop-1",
                message_id="m1",
                channel="line",
                sender=stop.recipient,
                occurred_at=datetime.now(UTC),
                kind="text",
                text="STOP",
                opt=OPT_OUT,
            )
        ]
    )
    deliver(ledger, SCOPE, sandbox_connectors(sandbox.url), FAST)
    assert sandbox.messages() == []
    states = dict(ledger.rows("winback", "p").select("id", "state").iter_rows())
    assert states == {r.id: "cancelled" if r.id == stop.id else "unknown" for r in rows}
    ledger.dispose()


def test_long_quiet_hours_on_a_later_day_still_leave_time_to_send() -> None:
    # Quiet hours of 22 hours leave 2 a day: the clock-change margin on later days shrinks
    # to half an hour a side, so an hour is left (an hour each side would leave none, and a
    # long send would hold the message for good).
    from cdp_activation.ledger.base import quiet_hours_end

    start = datetime(2026, 12, 1, 20, 0, tzinfo=UTC)
    end = start + 22 * HOUR
    next_day = start + timedelta(days=1)
    assert quiet_hours_end(start, end, next_day + 22 * HOUR + 10 * MINUTE) == (
        next_day + 22 * HOUR + 30 * MINUTE
    )
    assert quiet_hours_end(start, end, next_day + 22 * HOUR + 45 * MINUTE) is None
    assert quiet_hours_end(start, end, next_day - 20 * MINUTE) == next_day + 22 * HOUR + 30 * MINUTE


def test_an_unreachable_provider_stops_the_step_and_gives_up_on_nobody(
    tmp_path, sandbox_settings: Settings
) -> None:
    """A provider that refuses every connection is down, not a reason to dead-letter: the
    step stops naming the connector and its error, and every row stays planned, due again
    after its backoff, for the next run."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = sandbox_settings.model_copy(
        update={
            "meta_base_url": f"http://127.0.0.1:{port}/meta",
            "twilio_base_url": f"http://127.0.0.1:{port}/twilio",
        }
    )
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    ledger.plan("winback", "p", decisions(numbers(4)))
    with pytest.raises(ProviderUnavailable) as stopped:
        deliver(ledger, SCOPE, connectors(settings), FAST)
    assert "accepted nothing" in str(stopped.value) and "ConnectError" in str(stopped.value)
    report = stopped.value.report  # type: ignore[attr-defined]
    assert report.sent == report.failed == report.unknown == 0
    rows = ledger.rows("winback", "p")
    assert rows["state"].to_list() == ["planned"] * 4
    assert rows["claimed_by"].to_list() == [None] * 4
    assert max(rows["attempts"].to_list()) == FAST.max_attempts
    assert rows["not_before"].null_count() == 0  # each waits out its backoff in the ledger


def test_a_long_send_logs_its_progress_with_rate_and_eta(
    tmp_path, sandbox: SandboxServer, sandbox_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    ledger.plan("winback", "p", decisions(numbers(200)))
    sandbox.configure(latency_ms=20)
    options = DeliveryOptions(concurrency=4, progress_seconds=0.1)
    with caplog.at_level("INFO", logger="cdp_activation.delivery.engine"):
        deliver(ledger, SCOPE, connectors(sandbox_settings), options)
    lines = [r.getMessage() for r in caplog.records if "delivery progress" in r.getMessage()]
    assert len(lines) >= 3
    assert all("/200 done" in line and "msg/s" in line and "ETA" in line for line in lines)
    ledger.dispose()


def test_messages_held_for_quiet_hours_reach_the_run_s_summary_and_its_metadata() -> None:
    # The engine's count of messages it reached in their quiet hours is what the step's
    # summary, the Dagster metadata and `cdp-activation run`'s table say.
    from cdp_activation.activation.run import DeliverySummary, _fill_from_report
    from cdp_activation.cli.runner import _DELIVERY_COUNTS
    from cdp_activation.components.metadata import delivery_metadata
    from cdp_activation.delivery.engine import DeliveryReport

    summary = DeliverySummary(activation="winback", partition="p", dry_run=False)
    _fill_from_report(summary, DeliveryReport(sent=5, quiet_hours=3))
    assert summary.held_for_quiet_hours == 3
    assert "held_for_quiet_hours" in _DELIVERY_COUNTS
    assert delivery_metadata(summary)["held_for_quiet_hours"] == 3


class _Player:
    """A real HTTP server on 127.0.0.1 playing a provider: `respond(path, body)` gives the
    status and JSON of each POST; `posted` counts each message id (or user) it took."""

    def __init__(self, respond: Any) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.posted: Counter[str] = Counter()
        self.keys: list[str] = []  # each request's retry key (LINE's X-Line-Retry-Key)
        player = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                player.keys.append(self.headers.get("X-Line-Retry-Key", ""))
                code, payload, taken = respond(self.path, body)
                player.posted.update(taken)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Line-Request-Id", str(uuid.uuid4()))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_messages_a_provider_took_before_it_refused_the_rest_of_a_batch_are_never_sent_again(
    tmp_path,
) -> None:
    """Infobip takes a mixed batch as one request per channel: the WhatsApp request is
    answered (taken, status group ACCEPTED), then the SMS one is refused (a bad key for SMS).
    The WhatsApp messages are recorded sent, the SMS ones stay planned; once SMS is allowed,
    the resumed run sends the SMS and posts no WhatsApp message a second time."""
    from cdp_activation.connectors.base import CredentialsError
    from cdp_activation.connectors.infobip import InfobipConnector

    sms_ok = [False]

    def infobip(path: str, body: dict) -> tuple[int, object, list[str]]:
        if path.startswith("/whatsapp/"):
            ids, group = [m["messageId"] for m in body["messages"]], "ACCEPTED"
        elif sms_ok[0]:
            ids = [d["messageId"] for m in body["messages"] for d in m["destinations"]]
            group = "PENDING"
        else:
            error = {"serviceException": {"messageId": "UNAUTHORIZED", "text": "no"}}
            return 401, {"requestError": error}, []
        status = {"groupId": 1, "groupName": group, "id": 7, "name": f"{group}_X"}
        return 200, {"messages": [{"messageId": i, "status": status} for i in ids]}, ids

    player = _Player(infobip)
    try:
        connector = InfobipConnector(player.url, "key", "447860099299", "InfoSMS")
        ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
        ledger.plan(
            "winback", "p", decisions(numbers(40)).with_columns(connector=pl.lit("infobip"))
        )
        with pytest.raises(CredentialsError):
            deliver(ledger, SCOPE, {"infobip": connector}, FAST)
        rows = ledger.rows("winback", "p")
        states = Counter(zip(rows["channel"], rows["state"], strict=True))
        assert states == {("whatsapp", "sent"): 20, ("sms", "planned"): 20}
        assert len(player.posted) == 20 and max(player.posted.values()) == 1

        sms_ok[0] = True
        deliver(ledger, SCOPE, {"infobip": connector}, FAST)
        rows = ledger.rows("winback", "p")
        assert Counter(rows["state"]) == {"sent": 40}
        assert len(player.posted) == 40 and max(player.posted.values()) == 1  # nobody twice
        ledger.dispose()
    finally:
        player.close()


def test_line_requests_taken_beside_one_refused_for_the_monthly_quota_are_not_sent_again(
    tmp_path,
) -> None:
    """LINE sends a batch as one multicast per text, side by side: one is refused because the
    month's quota is used up while the others are taken. Those are recorded sent; the refused
    ones stay planned and go once the quota allows, and no user is messaged twice."""
    from cdp_activation.connectors.base import ConnectorError
    from cdp_activation.connectors.line import LineConnector
    from crash_worker import line_audience

    quota_left = [False]

    def line(path: str, body: dict) -> tuple[int, object, list[str]]:
        if body["messages"][0]["text"].endswith("(0)") and not quota_left[0]:
            return 429, {"message": "You have reached your monthly limit."}, []
        to = body["to"]  # a multicast's users, or a push's one
        return 200, {}, to if isinstance(to, list) else [to]

    player = _Player(line)
    try:
        connector = LineConnector(player.url, "token")
        ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
        ledger.plan("winback", "p", line_audience(30, texts=3))
        with pytest.raises(ConnectorError, match="monthly"):
            deliver(ledger, SCOPE, {"line": connector}, FAST)
        rows = ledger.rows("winback", "p")
        assert Counter(rows["state"]) == {"sent": 20, "planned": 10}
        assert len(player.posted) == 20 and max(player.posted.values()) == 1

        quota_left[0] = True
        deliver(ledger, SCOPE, {"line": connector}, FAST)
        assert Counter(ledger.rows("winback", "p")["state"]) == {"sent": 30}
        assert len(player.posted) == 30 and max(player.posted.values()) == 1  # nobody twice
        ledger.dispose()
    finally:
        player.close()


def test_a_line_request_asked_again_and_refused_for_the_quota_keeps_its_retry_key(
    tmp_path,
) -> None:
    """A multicast whose answer was lost (LINE may hold it) is asked again with the same retry
    key, and refused there because the month's quota is used up. It keeps its request: when
    the quota allows, it goes once more with that same key, so LINE can tell it is the one it
    may already have sent, never under a new key that would message everyone twice."""
    import time

    from cdp_activation.connectors.base import ConnectorError
    from cdp_activation.connectors.line import LineConnector
    from crash_worker import line_audience

    quota_left = [False]

    def line(path: str, body: dict) -> tuple[int, object, list[str]]:
        if len(player.keys) == 1:
            time.sleep(1.0)  # the first answer comes after the client gave up: lost
            return 200, {}, body["to"]
        if not quota_left[0]:
            return 429, {"message": "You have reached your monthly limit."}, []
        return 200, {}, []  # LINE knows the key: nobody is messaged again

    player = _Player(line)
    try:
        connector = LineConnector(player.url, "token")
        ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
        ledger.plan("winback", "p", line_audience(10))
        impatient = DeliveryOptions(
            backoff_initial=0.01, backoff_max=0.05, max_attempts=3, timeout_seconds=0.3
        )
        with pytest.raises(ConnectorError, match="monthly"):
            deliver(ledger, SCOPE, {"line": connector}, impatient)
        assert Counter(ledger.rows("winback", "p")["state"]) == {"planned": 10}
        ledger.plan("winback", "p", line_audience(11))  # one more user, the same text
        quota_left[0] = True
        deliver(ledger, SCOPE, {"line": connector}, impatient)
        assert Counter(ledger.rows("winback", "p")["state"]) == {"sent": 11}
        # The ten went again exactly as first asked, with its key; the newcomer on its own.
        first, again, resumed, newcomer = player.keys
        assert first == again == resumed != newcomer, player.keys
        ledger.dispose()
    finally:
        player.close()
