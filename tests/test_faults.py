"""Fault injection: the delivery engine against a misbehaving provider, over real HTTP.

The sandbox throttles (429 + Retry-After), fails (500/503), never answers (the client times out)
and, worst of all, accepts a message and then drops the connection. Whatever happens, every row
must end in exactly one terminal state, no message may be accepted twice, and a message the
provider has must be `sent` or `unknown` in the ledger, never resent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import Iterator

import httpx
import polars as pl
import pytest

from cdp_activation.connectors.base import OutboundMessage, Outcome, TemplateError, TemplateRef
from cdp_activation.delivery.engine import DeliveryOptions, DeliveryScope, deliver
from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import (
    Fault,
    SandboxAttempt,
    SandboxConfig,
    SandboxServer,
    request_fault,
)
from crash_worker import audience, line_audience, sandbox_connectors

pytestmark = pytest.mark.integration

TERMINAL = {"sent", "failed", "unknown", "dead_letter"}
FAULTS = {
    "seed": 20250101,
    "rate_429": 0.10,
    "rate_5xx": 0.05,
    "rate_timeout": 0.02,
    "rate_drop_after_accept": 0.01,
    "rate_504_after_accept": 0.01,
    "retry_after_s": 0.1,  # fractional, so thousands of rows still take seconds
    "timeout_hold_ms": 5_000,
}
CLIENT_TIMEOUT = 0.5  # the sandbox holds timed-out requests far longer than this
OPTIONS = DeliveryOptions(
    # A message tries this often in one run before it waits for the next: 15% of requests
    # are throttled or fail here, so 4 tries in a row happen to one message in a few
    # thousand, and the run would (rightly) end incomplete.
    max_attempts=10,
    rate_per_second=2000,  # the sandbox has no limit of its own; 429s are what slow us down
    backoff_initial=0.02,
    backoff_max=0.2,
    timeout_seconds=CLIENT_TIMEOUT,
)
EPSILON = 0.005  # seconds of clock slack when comparing the sandbox's times


@pytest.fixture(scope="module")
def faulty() -> Iterator[SandboxServer]:
    """A sandbox of our own, so changing its faults cannot disturb other tests' sandbox."""
    with SandboxServer() as server:
        yield server


@pytest.fixture
def sandbox(faulty: SandboxServer) -> Iterator[SandboxServer]:
    faulty.reset()
    faulty.config = SandboxConfig()
    yield faulty
    faulty.config = SandboxConfig()


# --- the sandbox's faults themselves ----------------------------------------------------------


def test_fault_draws_are_deterministic_and_follow_the_rates() -> None:
    config = SandboxConfig(**FAULTS)
    hashes = [f"{i:064x}" for i in range(20_000)]
    first = [request_fault(config, "twilio", h, 1) for h in hashes]
    assert first == [request_fault(config, "twilio", h, 1) for h in hashes]
    assert first != [
        request_fault(SandboxConfig(**{**FAULTS, "seed": 1}), "twilio", h, 1) for h in hashes
    ]
    counts = Counter(first)
    for fault, rate in [
        (Fault.THROTTLED, 0.10),
        (Fault.SERVER_ERROR, 0.05),
        (Fault.TIMEOUT, 0.02),
        (Fault.DROP_AFTER_ACCEPT, 0.01),
        (Fault.GATEWAY_TIMEOUT_AFTER_ACCEPT, 0.01),
    ]:
        assert counts[fault] / len(hashes) == pytest.approx(rate, abs=0.006)
    # A retry of the same message draws afresh (independently): it is not throttled forever.
    retried = [request_fault(config, "twilio", h, 2) for h in hashes]
    twice = sum(a == b == Fault.THROTTLED for a, b in zip(first, retried, strict=True))
    assert twice == pytest.approx(0.10 * 0.10 * len(hashes), rel=0.25)


def test_faults_are_read_and_changed_through_the_control_route(sandbox: SandboxServer) -> None:
    with httpx.Client(base_url=f"{sandbox.url}/_sandbox", timeout=5) as client:
        assert client.get("/faults").json()["rate_429"] == 0.0
        changed = client.post("/faults", json={"rate_429": 0.25, "seed": 7}).json()
        assert changed["rate_429"] == 0.25 and changed["seed"] == 7
        assert sandbox.config.rate_429 == 0.25
        for bad in ({"rate_5xx": 0.9}, {"rate_429": -1}, {"meta_token": "x"}, {"seed": "a"}):
            answer = client.post("/faults", json=bad)
            assert answer.status_code == 400, bad
            assert "error" in answer.json()
        assert client.get("/faults").json() == changed  # a refused change changes nothing
        assert "meta_token" not in changed  # credentials are neither shown nor settable


def one(
    sandbox: SandboxServer, connector: str, to: str
) -> tuple[Outcome, str | None, float | None]:
    """Send one message through a real connector; (outcome, error code, retry_after)."""
    message = (
        OutboundMessage("k", to, "whatsapp", TemplateRef("winback_offer", "en", ("A", "1", "C")))
        if connector == "meta_whatsapp"
        else OutboundMessage("k", to, "sms", body="Hi")
    )

    async def go() -> list:
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
            return await sandbox_connectors(sandbox.url)[connector].send_batch(client, [message])

    [result] = asyncio.run(go())
    return result.outcome, result.error_code, result.retry_after


@pytest.mark.parametrize(
    ("connector", "throttle_code", "server_codes"),
    [("meta_whatsapp", "130429", {"131000", "2"}), ("twilio", "20429", {"20500", "20503"})],
)
def test_each_fault_as_a_connector_sees_it(
    sandbox: SandboxServer, connector: str, throttle_code: str, server_codes: set[str]
) -> None:
    sandbox.configure(rate_429=1.0, retry_after_s=3)
    assert one(sandbox, connector, "+447900000001") == (Outcome.RETRY, throttle_code, 3.0)
    sandbox.configure(rate_429=0.0, rate_5xx=1.0)
    codes = {one(sandbox, connector, f"+4479000001{i:02d}")[1] for i in range(12)}
    assert codes == server_codes
    assert sandbox.messages() == []

    sandbox.configure(rate_5xx=0.0, rate_timeout=1.0)
    # ReadTimeout: the client's own timeout ended the wait (the sandbox never answers).
    assert one(sandbox, connector, "+447900000002")[:2] == (Outcome.UNKNOWN, "ReadTimeout")
    assert sandbox.messages() == []  # held, then never accepted

    sandbox.configure(rate_timeout=0.0, rate_drop_after_accept=1.0)
    outcome, code, _ = one(sandbox, connector, "+447900000003")
    assert (outcome, code) == (Outcome.UNKNOWN, "RemoteProtocolError")
    [kept] = sandbox.messages()  # the provider has it; the client cannot know
    assert kept.to == "+447900000003"

    sandbox.configure(rate_drop_after_accept=0.0, rate_not_on_whatsapp=1.0, rate_opted_out=1.0)
    permanent = "131026" if connector == "meta_whatsapp" else "21610"
    assert one(sandbox, connector, "+447900000004")[:2] == (Outcome.FAILED, permanent)
    results = Counter(a.result for a in sandbox.attempts())
    assert results == {
        "throttled": 1,
        "server_error": 12,
        "timeout": 1,
        "dropped_after_accept": 1,
        "rejected": 1,
    }


def test_latency_jitter_and_slow_requests_delay_answers(sandbox: SandboxServer) -> None:
    sandbox.configure(latency_ms=30, latency_jitter_ms=20, slow_rate=1.0, slow_ms=50)
    began = time.monotonic()
    assert one(sandbox, "twilio", "+447900000005")[0] == Outcome.SENT
    assert time.monotonic() - began >= 0.08  # at least latency + slow (no upper bound:
    # a loaded machine may take longer, and that is not what is tested)
    [attempt] = sandbox.attempts()
    assert attempt.answered - attempt.arrived >= 0.08


# --- the delivery engine under faults ---------------------------------------------------------


def test_faults_end_every_row_in_one_terminal_state_and_nobody_twice(
    ledger_url: str, sandbox: SandboxServer
) -> None:
    n = 2000
    ledger = Ledger(ledger_url)
    ledger.plan("faults", "p", audience(n))
    sandbox.configure(**FAULTS)
    began = time.monotonic()
    report = deliver(ledger, DeliveryScope("faults", "p"), sandbox_connectors(sandbox.url), OPTIONS)
    elapsed = time.monotonic() - began
    sandbox.wait_idle()  # answers already on the wire are logged
    rows = ledger.rows("faults", "p")
    accepted = sandbox.messages()
    attempts = sandbox.attempts()
    results = Counter(a.result for a in attempts)
    states = Counter(rows["state"].to_list())
    print(f"\nfaults [{ledger_url.split(':')[0]}] {elapsed:.1f}s ledger {dict(states)}")
    print(f"  sandbox requests {dict(results)}; accepted {len(accepted)}; {report.throttled=}")

    # The faults really happened, at about the configured rates.
    assert results["throttled"] > 150 and results["server_error"] > 60
    assert results["timeout"] > 20 and results["dropped_after_accept"] > 8
    assert results["gateway_timeout_after_accept"] > 8
    assert report.throttled == results["throttled"]

    # Every row in exactly one terminal state; nobody lost, nothing left to send.
    assert set(states) <= TERMINAL
    assert sum(states.values()) == n == rows.height
    assert rows["idempotency_key"].n_unique() == n
    assert ledger.pending("faults", "p") == []

    # No message accepted twice (same provider, recipient and content), nor any recipient.
    assert sandbox.duplicates() == {}
    assert max(Counter(m.to for m in accepted).values()) == 1

    # Every accepted message is `sent` (with that provider id) or `unknown` in the ledger.
    by_recipient = {r["recipient"]: r for r in rows.iter_rows(named=True)}
    for message in accepted:
        row = by_recipient[message.to]
        assert row["state"] in {"sent", "unknown"}, (message, row)
        if row["state"] == "sent":
            assert row["provider_message_id"] == message.provider_message_id
    sent = rows.filter(pl.col("state") == "sent")
    assert set(sent["provider_message_id"].to_list()) <= {m.provider_message_id for m in accepted}
    taken_unanswered = results["dropped_after_accept"] + results["gateway_timeout_after_accept"]
    assert sent.height + taken_unanswered == len(accepted)

    # A message accepted and then dropped ends `unknown` and is never sent again; a timed-out
    # one too (the client cannot tell it from a drop), and one a gateway answered 504 for
    # after the provider took it. Nothing else is unknown.
    dropped = {
        a.to
        for a in attempts
        if a.result in (Fault.DROP_AFTER_ACCEPT, Fault.GATEWAY_TIMEOUT_AFTER_ACCEPT)
    }
    assert {by_recipient[to]["state"] for to in dropped} == {"unknown"}
    assert states["unknown"] == results["timeout"] + taken_unanswered
    # Throttled and failed requests were tried again until accepted: nobody dead-lettered,
    # and every retry waited in the ledger (planned), not in flight.
    assert states["dead_letter"] == 0
    history = ledger.history()
    retried = history.filter(
        (pl.col("from_state") == "in_flight") & (pl.col("to_state") == "planned")
    )
    assert retried.height >= results["throttled"] + results["server_error"]

    assert_retry_after_honoured(attempts)
    ledger.dispose()


def assert_retry_after_honoured(attempts: list[SandboxAttempt]) -> None:
    """No message is retried before the Retry-After its 429 carried has passed."""
    by_message: dict[tuple[str, str], list[SandboxAttempt]] = defaultdict(list)
    for attempt in attempts:
        by_message[(attempt.provider, attempt.request_hash)].append(attempt)
    gaps = []
    for tries in by_message.values():
        tries.sort(key=lambda a: a.attempt)
        for before, after in itertools.pairwise(tries):
            if before.result == Fault.THROTTLED and before.retry_after is not None:
                gaps.append(after.arrived - before.answered)
                assert after.arrived >= before.answered + before.retry_after - EPSILON, (
                    before,
                    after,
                )
    assert len(gaps) > 100
    print(f"  retries after a 429: {len(gaps)}, shortest wait {min(gaps):.3f}s")


def test_a_429_pauses_every_request_to_that_connector(tmp_path, sandbox: SandboxServer) -> None:
    """Throttling is about the sender: after a 429 no request of that connector starts until
    its Retry-After has passed, not only the throttled message's retry.

    Requests the engine had already started when the 429 was answered still arrive: at most
    `concurrency` of them, and all within `grace` (the client's CPU time to put a burst on the
    wire; about 3 ms a request here). Without the shared pause about a hundred requests would
    arrive in each window.
    """
    retry_after, grace = 0.4, 0.15
    options = dataclasses.replace(OPTIONS, concurrency=8)
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    ledger.plan("pause", "p", audience(120).filter(pl.col("channel") == "sms"))
    sandbox.configure(seed=3, rate_429=0.2, retry_after_s=retry_after)
    report = deliver(ledger, DeliveryScope("pause", "p"), sandbox_connectors(sandbox.url), options)
    assert report.sent == 60
    attempts = sandbox.attempts()
    throttled = [a for a in attempts if a.result == Fault.THROTTLED]
    assert len(throttled) >= 10
    for answer in throttled:
        during = [a.arrived - answer.answered for a in attempts]
        during = [t for t in during if 0 < t < retry_after - EPSILON]
        assert len(during) <= options.concurrency, (answer, sorted(during))
        assert max(during, default=0) < grace, (answer, sorted(during))
    ledger.dispose()


def test_a_stopped_activation_releases_throttled_messages_instead_of_dead_lettering(
    tmp_path, sandbox: SandboxServer
) -> None:
    """A template error stops the activation while SMS messages wait out a 429: they were not
    accepted and their retries were not used up, so they go back to `planned`."""
    frame = audience(40).with_columns(
        template_name=pl.when(pl.col("channel") == "whatsapp").then(pl.lit("spring_sale"))
    )
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    ledger.plan("stop", "p", frame)
    sandbox.configure(rate_429=1.0, retry_after_s=0.3, latency_ms=20)
    # The connectors take turns, so SMS 429s arrive before and while the WhatsApp template
    # error stops the run.
    with pytest.raises(TemplateError):
        deliver(ledger, DeliveryScope("stop", "p"), sandbox_connectors(sandbox.url), OPTIONS)
    assert Counter(a.result for a in sandbox.attempts())["throttled"] > 0
    assert ledger.counts("stop", "p") == {"planned": 40}
    assert sandbox.messages() == []


@pytest.mark.parametrize("name", ["webhook", "line"])
def test_through_an_idempotent_provider_lost_answers_are_retried_and_nobody_is_unknown(
    name: str, ledger_url: str, sandbox: SandboxServer
) -> None:
    """The webhook receiver de-duplicates on our key, LINE on the request's retry key: a lost
    answer or a crash mid-request is asked again with the same key, so every row ends `sent`
    and the provider has each once."""
    from cdp_activation.connectors import connector_from_settings
    from conftest import settings_for_sandbox

    n = 1000
    if name == "webhook":
        frame = audience(n).with_columns(pl.lit("webhook").alias("connector"))
    else:
        frame = line_audience(n, texts=200)  # 5 users a text: many multicasts, a few pushes
    ledger = Ledger(ledger_url)
    ledger.plan("idem", "p", frame)
    # A crash left some rows in flight: through an idempotent connector they are re-planned.
    ledger.mark_in_flight([r.id for r in ledger.pending("idem", "p")[:50]])
    assert ledger.recover_interrupted("idem", "p", idempotent=[name]) == 50
    sandbox.configure(
        rate_timeout=0.02, rate_drop_after_accept=0.05, rate_5xx=0.05, rate_504_after_accept=0.05
    )
    settings = settings_for_sandbox(sandbox).model_copy(update={"webhook_batch_size": 10})
    connector = connector_from_settings(name, settings)
    report = deliver(ledger, DeliveryScope("idem", "p"), {name: connector}, OPTIONS)
    states = Counter(ledger.rows("idem", "p")["state"].to_list())
    results = Counter(a.result for a in sandbox.attempts())
    assert results["dropped_after_accept"] > 0 and results["timeout"] > 0
    assert results["gateway_timeout_after_accept"] > 0
    assert states == {"sent": n}, (states, report)
    assert sandbox.duplicates() == {}
    assert len({m.to for m in sandbox.messages()}) == len(sandbox.messages()) == n
    ledger.dispose()


def test_a_request_that_may_have_landed_keeps_its_rows_together_whatever_comes_after(
    tmp_path, sandbox: SandboxServer
) -> None:
    """LINE de-duplicates a request on a key made from its recipients. A multicast accepted
    but whose answer was lost must go out again with exactly the same recipients, even if the
    next try is answered 5xx (which says nothing of the first): otherwise a later request of
    other companions carries another key, and LINE sends to the first ones twice."""
    from cdp_activation.connectors import connector_from_settings
    from cdp_activation.delivery.engine import ProviderUnavailable
    from conftest import settings_for_sandbox

    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    ledger.plan("land", "p", line_audience(60, texts=3))
    line = {"line": connector_from_settings("line", settings_for_sandbox(sandbox))}
    options = dataclasses.replace(OPTIONS, outage_after=1, max_attempts=1, retry_later_seconds=0.01)
    scope = DeliveryScope("land", "p")

    def requests() -> dict[int, int]:
        return dict(Counter(ledger.rows("land", "p")["request_id"].to_list()))

    sandbox.configure(rate_drop_after_accept=1.0)  # accepted, answer lost
    with pytest.raises(ProviderUnavailable):
        deliver(ledger, scope, line, options)
    first = requests()
    assert None not in first and len(sandbox.messages()) == 60
    sandbox.configure(rate_drop_after_accept=0.0, rate_5xx=1.0)  # the retry: 503
    with pytest.raises(ProviderUnavailable):
        deliver(ledger, scope, line, options)
    assert requests() == first  # still grouped as when they may have landed
    sandbox.configure(rate_5xx=0.0)
    report = deliver(ledger, scope, line, OPTIONS)
    assert report.sent == 60 and ledger.counts("land", "p") == {"sent": 60}
    assert sandbox.duplicates() == {} and len(sandbox.messages()) == 60
    assert Counter(a.result for a in sandbox.attempts())["replayed"] > 0
    ledger.dispose()
