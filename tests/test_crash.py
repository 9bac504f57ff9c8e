"""kill -9 mid-delivery, several times, then a run to completion: nobody twice, nobody lost.

The delivery runs in a subprocess (tests/crash_worker.py: real `Ledger` on a SQLite file, real
`deliver`, real connectors) against a sandbox served from a thread of this process, so killing
the worker leaves the provider running, as in production. The sandbox answers after 20-50 ms,
so each kill lands with requests in flight: some the sandbox goes on to accept after the
client is gone, exactly the case "never twice" is about.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from cdp_activation.delivery.engine import DeliveryOptions
from cdp_activation.ledger import Ledger
from cdp_activation.sandbox import SandboxConfig, SandboxServer
from crash_worker import ACTIVATION, PARTITION, Worker

pytestmark = pytest.mark.integration

N = 3000
KILLS = 6
SEED = 20250101
TERMINAL = {"sent", "failed", "unknown", "dead_letter"}


@pytest.mark.parametrize("concurrency", [DeliveryOptions.concurrency, 4])
def test_sigkill_at_random_points_sends_nobody_twice_and_loses_nobody(
    tmp_path: Path, concurrency: int
) -> None:
    """With many requests in the air a kill lands mid-request mostly; with few it also lands
    between requests and while outcomes are being written."""
    rng = random.Random(SEED)
    ledger_file = tmp_path / "ledger.sqlite"
    config = SandboxConfig(latency_ms=20, latency_jitter_ms=30, seed=SEED)
    with SandboxServer(config=config) as sandbox:
        landed: list[str] = []
        # The first kill is timed from the start, so it may land in start-up or planning; the
        # others from the moment the worker starts sending, so they land mid-delivery.
        worker = Worker(ledger_file, sandbox.url, concurrency, n=N)
        time.sleep(rng.uniform(0.2, 1.5))
        landed.append(f"start+{'killed' if worker.kill() else 'finished'}")
        for _ in range(KILLS):
            worker = Worker(ledger_file, sandbox.url, concurrency, n=N)
            started = worker.wait_for("delivering", timeout=30)
            time.sleep(rng.uniform(0.2, 1.5))
            landed.append(f"{started.split()[1]}:{'killed' if worker.kill() else 'finished'}")
        final = Worker(ledger_file, sandbox.url, concurrency, n=N)
        final.wait_for("delivering", timeout=30)
        summary = json.loads(final.wait_for("{", timeout=60))
        assert final.process.wait(10) == 0
        sandbox.wait_idle()  # requests of killed workers still being answered
        accepted = sandbox.messages()
        gone = sum(a.result == "client_gone" for a in sandbox.attempts())

    ledger = Ledger(f"sqlite:///{ledger_file}")
    rows = ledger.rows(ACTIVATION, PARTITION)
    ledger.dispose()
    states = Counter(rows["state"].to_list())
    by_recipient = {r["recipient"]: r for r in rows.iter_rows(named=True)}
    accepted_to = {m.to for m in accepted}
    unknown = rows.filter(pl.col("state") == "unknown")["recipient"].to_list()
    print(
        f"\ncrash ({concurrency} in flight): kills {landed}; final run {summary}; "
        f"ledger {dict(states)}; sandbox accepted {len(accepted)}, duplicates "
        f"{len(sandbox.duplicates())}; unknown rows the sandbox "
        f"had accepted: {len(accepted_to & set(unknown))} of {len(unknown)}; requests whose "
        f"client died before the sandbox read them: {gone}"
    )

    # The kills really interrupted deliveries, and left rows in flight to recover.
    assert sum(outcome.endswith("killed") for outcome in landed) >= 5
    assert states["unknown"] > 0
    # Rows are marked in flight just before their request and recorded just after the answer,
    # so a kill leaves `unknown` only what was in the air: at most the requests in flight
    # plus answers not yet written, per kill.
    never_reached = set(unknown) - accepted_to
    assert len(never_reached) <= KILLS * 2 * concurrency, len(never_reached)

    # Nobody twice: no message (or recipient) accepted more than once by the provider.
    assert sandbox.duplicates() == {}
    assert max(Counter(m.to for m in accepted).values()) == 1

    # Nobody lost: every row in exactly one terminal state, none planned or in flight.
    assert rows.height == N == rows["idempotency_key"].n_unique()
    assert set(states) <= TERMINAL
    assert states["sent"] + states["failed"] + states["unknown"] + states["dead_letter"] == N

    # What the provider has is `sent` (with its id) or `unknown` in the ledger, never anything
    # that would let a later run send it again; and every `sent` row is at the provider.
    for message in accepted:
        row = by_recipient[message.to]
        assert row["state"] in {"sent", "unknown"}, (message, row)
        if row["state"] == "sent":
            assert row["provider_message_id"] == message.provider_message_id
    sent_ids = set(rows.filter(pl.col("state") == "sent")["provider_message_id"].to_list())
    assert sent_ids <= {m.provider_message_id for m in accepted}
    assert len(sent_ids) == states["sent"]


def test_sigkill_through_line_resends_each_interrupted_request_whole_and_nobody_twice(
    tmp_path: Path,
) -> None:
    """LINE de-duplicates a request on its retry key, so rows a kill left in flight are sent
    again, not given up: every recipient ends `sent`. The retry key is made from the
    request's rows, so it only matches if the request is rebuilt exactly; deferred rows falling
    due between runs would change fresh batches, which is why the ledger keeps each row's
    request (`request_id`). The sandbox answers a repeated key 409 and sends nothing."""
    n, kills = 6000, 6
    rng = random.Random(SEED + 1)
    ledger_file = tmp_path / "ledger.sqlite"
    # Requests take 600-800 ms, most of each 500-row batch's 1 s at 500/s: kills land
    # mid-request. Deferred rows fall due 3 s in, between the kills.
    config = SandboxConfig(latency_ms=600, latency_jitter_ms=200, seed=SEED)
    deferred_until = str(time.time() + 3)
    args = ("line", deferred_until)
    with SandboxServer(config=config) as sandbox:
        landed = []
        recovered = 0
        for _ in range(kills):
            worker = Worker(ledger_file, sandbox.url, 4, *args, n=n)
            started = worker.wait_for("delivering", timeout=30)
            recovered += int(started.split("recovered ")[1].rstrip(")"))
            time.sleep(rng.uniform(0.3, 1.5))
            landed.append(worker.kill())
        final = Worker(ledger_file, sandbox.url, 4, *args, n=n)
        started = final.wait_for("delivering", timeout=30)
        recovered += int(started.split("recovered ")[1].rstrip(")"))
        summary = json.loads(final.wait_for("{", timeout=90))
        assert final.process.wait(10) == 0
        sandbox.wait_idle()  # requests of killed workers still being answered
        accepted = sandbox.messages()
        replayed = [a for a in sandbox.attempts() if a.result == "replayed"]

    ledger = Ledger(f"sqlite:///{ledger_file}")
    rows = ledger.rows(ACTIVATION, PARTITION)
    ledger.dispose()
    states = Counter(rows["state"].to_list())
    print(
        f"\nLINE crash: kills interrupted {sum(landed)} of {kills}; rows recovered from flight "
        f"{recovered}; requests answered 409 (already accepted) {len(replayed)}; final run "
        f"{summary}; ledger {dict(states)}; sandbox accepted {len(accepted)}"
    )

    assert sum(landed) >= kills - 1
    assert recovered > 0 and replayed, "no kill landed mid-request: nothing was tested"
    # Nobody twice: each user messaged once, whatever was resent.
    assert sandbox.duplicates() == {}
    assert max(Counter(m.to for m in accepted).values()) == 1
    # Nobody lost, and nothing left unknown: an idempotent provider lets every row finish.
    assert rows.height == n and states == {"sent": n}
    assert {m.to for m in accepted} == set(rows["recipient"].to_list())
    by_recipient = dict(zip(rows["recipient"], rows["provider_message_id"], strict=True))
    assert all(by_recipient[m.to] == m.provider_message_id for m in accepted)


def test_line_s_monthly_quota_running_out_under_two_workers_and_a_kill_sends_nobody_twice(
    tmp_path: Path,
) -> None:
    """Two workers send to LINE, one killed at a random instant, when the channel's monthly
    quota runs out. A batch of three texts goes as three multicasts at once: those LINE took
    beside the one it refused are recorded sent (`ConnectorError.answered`), never made
    planned and sent again under a new retry key; the refused and the rest wait `planned`.
    Once the quota is raised, a run sends every one of them, and each user gets one message."""
    n, quota = 3000, 1400
    rng = random.Random(SEED + 2)
    ledger_file = tmp_path / "ledger.sqlite"
    config = SandboxConfig(
        latency_ms=300, latency_jitter_ms=300, seed=SEED, line_monthly_quota=quota
    )
    args = ("line", "0")  # every fifth row deferred until 1970: all due
    env = {"CRASH_WORKER_LINE_TEXTS": "3"}
    with SandboxServer(config=config) as sandbox:
        killed, other = (Worker(ledger_file, sandbox.url, 4, *args, n=n, env=env) for _ in "ab")
        killed.wait_for("delivering", timeout=30)
        other.wait_for("delivering", timeout=30)
        time.sleep(rng.uniform(0.2, 0.8))
        landed = killed.kill()
        stopped = other.summary(timeout=90)
        assert other.process.wait(10) == 3, stopped
        assert "monthly" in str(stopped["error"]), stopped
        sandbox.wait_idle()  # the killed worker's requests are answered too
        taken = {m.to for m in sandbox.messages()}
        ledger = Ledger(f"sqlite:///{ledger_file}")
        before = ledger.rows(ACTIVATION, PARTITION)
        refused = [a for a in sandbox.attempts() if a.result == "refused"]

        sandbox.configure(line_monthly_quota=0)  # the plan's limit raised
        final = Worker(ledger_file, sandbox.url, 4, *args, n=n, env=env)
        summary = final.summary(timeout=90)
        assert final.process.wait(10) == 0, summary
        sandbox.wait_idle()
        accepted = sandbox.messages()
        replayed = [a for a in sandbox.attempts() if a.result == "replayed"]
    rows = ledger.rows(ACTIVATION, PARTITION)
    ledger.dispose()
    states = Counter(before["state"].to_list())
    print(
        f"\nLINE quota: kill landed {landed}; at the stop {dict(states)}, the sandbox had "
        f"{len(taken)} (quota {quota}), {len(refused)} requests refused; final run {summary}; "
        f"{len(replayed)} requests answered 409"
    )
    assert refused and len(taken) <= quota
    # What LINE took is recorded sent, but for the requests of the killed worker left in
    # flight (sent again with the same retry key: 409); nothing else it took was put back.
    sent = set(before.filter(pl.col("state") == "sent")["recipient"].to_list())
    in_air = set(before.filter(pl.col("state") == "in_flight")["recipient"].to_list())
    assert sent <= taken and taken <= sent | in_air
    assert set(before["state"].to_list()) <= {"sent", "planned", "in_flight"}
    # Nobody twice, nobody lost.
    assert sandbox.duplicates() == {}
    assert max(Counter(m.to for m in accepted).values()) == 1
    assert rows.height == n and Counter(rows["state"].to_list()) == {"sent": n}
    assert {m.to for m in accepted} == set(rows["recipient"].to_list())


@pytest.mark.serial  # its kills must land mid-request: under another test's load they did not
def test_kills_and_faults_while_two_workers_hand_off_to_braze_lose_nobody(
    tmp_path: Path,
) -> None:
    """The Braze audience handoff under the worst of it: two workers claiming from one
    partition at once, one of them killed again and again at random instants, a provider that
    throttles, fails, hangs and drops answers after applying the push. `/users/track` sets
    values, so a push that may have landed is pushed again: every customer ends `sent`, with
    exactly the values planned, and no profile is changed twice."""
    from crash_worker import HANDOFF_AT

    n, kills = 3000, 5
    rng = random.Random(SEED + 2)
    ledger_file = tmp_path / "ledger.sqlite"
    config = SandboxConfig(
        latency_ms=250,  # requests of 75 profiles in the air when a kill lands
        latency_jitter_ms=250,
        seed=SEED,
        rate_429=0.05,
        rate_5xx=0.05,
        rate_timeout=0.03,
        rate_drop_after_accept=0.05,
        retry_after_s=0.1,
        timeout_hold_ms=2_000,
    )
    args = ("braze_audience",)
    with SandboxServer(config=config) as sandbox:
        steady = Worker(ledger_file, sandbox.url, 2, *args, n=n)
        steady.wait_for("delivering", timeout=30)
        landed = []
        for _ in range(kills):
            victim = Worker(ledger_file, sandbox.url, 8, *args, n=n)
            victim.wait_for("delivering", timeout=30)
            time.sleep(rng.uniform(0.05, 0.6))
            landed.append(victim.kill())
        steady.summary(timeout=120)
        final = Worker(ledger_file, sandbox.url, 8, *args, n=n)
        final.wait_for("delivering", timeout=30)
        summary = final.summary(timeout=120)
        sandbox.wait_idle()
        changed = Counter(m.to for m in sandbox.messages())
        profiles = sandbox.profiles()
        results = Counter(a.result for a in sandbox.attempts())

    ledger = Ledger(f"sqlite:///{ledger_file}")
    rows = ledger.rows(ACTIVATION, PARTITION)
    ledger.dispose()
    states = Counter(rows["state"].to_list())
    print(f"\nBraze handoff: kills {sum(landed)}/{kills}; final {summary}; ledger {dict(states)}")
    print(f"sandbox answers {dict(results)}")

    assert sum(landed) >= kills - 1, "the killed workers had finished: nothing was tested"
    assert results["dropped_after_accept"] > 0 and results["timeout"] > 0, "no lost answer"
    # Nobody lost: every customer written, with what was planned for them.
    assert rows.height == n and states == {"sent": n}
    assert len(profiles) == n
    for i in (1, 2, 3, n // 2, n):
        profile = profiles[str(i)]
        assert profile["cdp_winback_at"] == HANDOFF_AT
        assert (profile["first_name"], profile["offer_code"]) == (f"Name{i}", f"CODE{i}")
        group = "winback_sms_group" if i % 3 == 0 else "winback_whatsapp_group"
        assert profile["subscription_groups"][0]["subscription_group_id"] == group
    # Nobody twice: a push again after a lost answer changed no profile a second time.
    assert set(changed) == set(rows["recipient"].to_list())
    assert max(changed.values()) == 1
