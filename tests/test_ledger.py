"""The ledger's promises, on SQLite and on a real PostgreSQL (when TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from cdp_activation.connectors.base import Outcome, SendResult
from cdp_activation.ledger import Ledger, idempotency_key, sends
from cdp_activation.ledger.base import as_time


def chosen(n: int, start: int = 1) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "customer_id": list(range(start, start + n)),
            "phone_e164": [f"+4471234{i:05d}" for i in range(start, start + n)],
            "channel": ["whatsapp"] * n,
            "connector": ["meta_whatsapp"] * n,
            "step": ["initial"] * n,
            "template_name": ["winback_offer"] * n,
            "template_language": ["en"] * n,
            "variables": [["Ann", str(i)] for i in range(start, start + n)],
            "body": [None] * n,
        }
    )


def test_planning_twice_writes_each_key_once(ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    first = ledger.plan("winback", "2026-11-23", chosen(100))
    second = ledger.plan("winback", "2026-11-23", chosen(150))  # 100 known + 50 new
    assert first.planned == 100
    assert second.planned == 50
    assert second.existing == {"planned": 100}
    assert ledger.counts("winback", "2026-11-23") == {"planned": 150}
    # Another partition or activation is another key.
    assert ledger.plan("winback", "2026-11-24", chosen(10)).planned == 10
    assert ledger.plan("other", "2026-11-23", chosen(10)).planned == 10
    ledger.dispose()


def test_a_planned_row_the_policy_now_sends_another_way_goes_that_way(ledger_url: str) -> None:
    """Customer 1's WhatsApp message waited for the morning; overnight its WhatsApp consent
    was withdrawn, and the morning's run decides SMS: the planned row takes the SMS, and the
    WhatsApp message never goes. Customer 2's row, kept in a request its provider may hold,
    goes out as that request."""
    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(3))
    with ledger.engine.begin() as con:
        con.execute(sends.update().where(sends.c.customer_id == "2").values(request_id=7))
    sms = chosen(3).with_columns(
        channel=pl.lit("sms"),
        connector=pl.lit("twilio"),
        template_name=pl.lit(None, pl.String),
        template_language=pl.lit(None, pl.String),
        variables=pl.lit(None, pl.List(pl.String)),
        body=pl.lit("Ann, 20% off this week"),
    )
    # Customer 3's message was tried once already (a 429): a provider that de-duplicates
    # may hold it, so it keeps its route; customer 4's number changed: the new one.
    with ledger.engine.begin() as con:
        con.execute(sends.update().where(sends.c.customer_id == "3").values(attempts=1))
    ledger.plan("winback", "p", chosen(1, start=4))
    moved = chosen(1, start=4).with_columns(phone_e164=pl.lit("+447123499999"))
    assert ledger.plan("winback", "p", pl.concat([sms.head(3), moved])).planned == 0
    rows = ledger.rows("winback", "p").sort("customer_id")
    assert rows.select("customer_id", "channel", "connector", "recipient").rows() == [
        ("1", "sms", "twilio", "+447123400001"),
        ("2", "whatsapp", "meta_whatsapp", "+447123400002"),
        ("3", "whatsapp", "meta_whatsapp", "+447123400003"),
        ("4", "whatsapp", "meta_whatsapp", "+447123499999"),
    ]
    assert "20% off" in rows["message"][0] and "winback_offer" not in rows["message"][0]
    assert ledger.counts("winback", "p") == {"planned": 4}
    ledger.dispose()


def test_a_plan_built_a_slice_at_a_time_is_one_plan(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows are built from the decisions a slice at a time (bounded memory): every row is
    written once, with its own message, and the whole plan shares one planning time."""
    from cdp_activation.ledger import state_machine

    monkeypatch.setattr(state_machine, "_PLAN_BUILD_SLICE", 7)
    ledger = Ledger(ledger_url)
    assert ledger.plan("winback", "p", chosen(50)).planned == 50
    rows = ledger.rows("winback", "p").sort("customer_id")
    assert rows.height == 50 and rows["idempotency_key"].n_unique() == 50
    assert rows["planned_at"].n_unique() == 1
    assert [json.loads(m)["parameters"][1] for m in rows.sort("id")["message"]] == [
        str(c) for c in rows.sort("id")["customer_id"].cast(pl.Int64)
    ]
    assert ledger.plan("winback", "p", chosen(50)).existing == {"planned": 50}
    ledger.dispose()


def test_state_machine_moves_only_forward(ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(3))
    rows = ledger.pending("winback", "p")
    assert [r.message["parameters"] for r in rows] == [["Ann", "1"], ["Ann", "2"], ["Ann", "3"]]
    assert {r.purpose for r in rows} == {"marketing"}  # providers that tag it (Viber) need it
    ids = [r.id for r in rows]
    ledger.mark_in_flight(ids)
    assert ledger.pending("winback", "p") == []
    ledger.record(
        [
            (ids[0], SendResult(rows[0].idempotency_key, Outcome.SENT, "wamid.1"), 1),
            (ids[1], SendResult(rows[1].idempotency_key, Outcome.FAILED, None, "131026"), 1),
        ]
    )
    # A result for a row that is no longer in flight changes nothing.
    ledger.record([(ids[0], SendResult(rows[0].idempotency_key, Outcome.FAILED), 2)])
    table = ledger.rows("winback", "p").sort("id")
    assert table["state"].to_list() == ["sent", "failed", "in_flight"]
    assert table["provider_message_id"][0] == "wamid.1"
    assert table["error_code"][1] == "131026"
    assert table["attempts"].to_list() == [1, 1, 1]
    ledger.dispose()


def test_rows_left_in_flight_by_a_crash_become_unknown_not_resent(ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(4))
    rows = ledger.pending("winback", "p")
    ledger.mark_in_flight([r.id for r in rows[:2]])
    # ... the process dies here; the next run starts by recovering:
    assert ledger.recover_interrupted("winback", "p") == 2
    assert ledger.counts("winback", "p") == {"unknown": 2, "planned": 2}
    assert [r.id for r in ledger.pending("winback", "p")] == [r.id for r in rows[2:]]
    # Planning the same decisions again does not revive them.
    assert ledger.plan("winback", "p", chosen(4)).planned == 0
    ledger.dispose()


def test_idempotency_key_names_activation_partition_customer_and_step() -> None:
    assert idempotency_key("winback", "2026-11-23", "42", "initial") == (
        "winback|2026-11-23|42|initial"
    )


def test_large_plans_are_bulk_written(ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    assert ledger.plan("winback", "p", chosen(12_000)).planned == 12_000
    held = ledger.partition_states("winback", "p")
    one = held.filter(pl.col("idempotency_key") == idempotency_key("winback", "p", "1", "initial"))
    assert one["state"].to_list() == ["planned"]
    # Written a slice at a time (the driver's batches, SQLite's statements): every row once.
    rows = ledger.rows("winback")
    assert rows.height == 12_000 and rows["idempotency_key"].n_unique() == 12_000
    assert ledger.plan("winback", "p", chosen(12_000)).existing == {"planned": 12_000}
    ledger.dispose()


def test_a_bulk_plan_leaves_postgresql_planning_lookups_by_index(ledger_url: str) -> None:
    """A fresh ledger's first big plan: until the statistics describe it, PostgreSQL planned
    a status webhook's lookup by provider id as a scan of every send (once per batch of
    reports). The plan refreshes them; a small plan on top of a large table does not."""
    if not ledger_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's planner statistics; SQLite plans by its indexes alone")
    ledger = Ledger(ledger_url)
    try:
        ledger.plan("winback", "p", chosen(12_000))
        with ledger.engine.connect() as con:
            known = con.exec_driver_sql(
                "SELECT reltuples FROM pg_class WHERE oid = 'sends'::regclass"
            ).scalar_one()
            assert known == 12_000
            ids = ", ".join(f"'wamid.{i}'" for i in range(47))
            plan = (
                con.exec_driver_sql(
                    f"EXPLAIN SELECT planned_at FROM sends WHERE provider_message_id IN ({ids})"
                )
                .scalars()
                .all()
            )
        assert "ix_sends_provider_message_id" in plan[0], plan
        ledger.plan("winback", "p", chosen(1_100, start=20_000))  # under a tenth of it
        with ledger.engine.connect() as con:
            again = con.exec_driver_sql(
                "SELECT reltuples FROM pg_class WHERE oid = 'sends'::regclass"
            ).scalar_one()
        assert again == 12_000  # not analyzed again for a small addition
    finally:
        ledger.dispose()


def test_a_large_plan_stores_exactly_what_a_small_one_does(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large plans take the bulk path (PostgreSQL: COPY through a temporary table); every
    value comes back as the row-by-row path writes it: nulls stay nulls, empty text stays
    empty, quotes, commas, new lines and non-Latin text in messages survive, times and the
    refused fallback's reason are kept."""
    from datetime import UTC, datetime, timedelta

    from cdp_activation.ledger import state_machine

    n = 1_500
    later = datetime(2026, 12, 5, 18, 30, 15, 123456, tzinfo=UTC)
    frame = chosen(n).with_columns(
        variables=pl.Series(
            [[f'Ann "the, first"\n{i}', "日本語 ✓"] if i % 3 else None for i in range(n)],
            dtype=pl.List(pl.String),
        ),
        body=pl.Series([None if i % 2 else f'Hi, "{i}"\nbye' for i in range(n)]),
        template_name=pl.Series([None if i % 2 == 0 else "winback_offer" for i in range(n)]),
        phone_e164=pl.Series([None if i % 5 == 0 else f"+4471234{i:05d}" for i in range(n)]),
        not_before=pl.Series(
            [later + timedelta(hours=i) if i % 4 == 0 else None for i in range(n)]
        ),
        decision=pl.Series(["exclude" if i % 7 == 0 else "send" for i in range(n)]),
        reason=pl.Series(["fallback_sms_no_consent" if i % 7 == 0 else None for i in range(n)]),
        fallback_of=pl.Series([i if i % 6 == 0 else None for i in range(n)], dtype=pl.Int64),
        fallback_reason=pl.Series(["" if i % 6 == 0 else None for i in range(n)]),
    )
    ledger = Ledger(ledger_url)
    assert ledger.plan("bulk", "p", frame, run_id=None).planned == n
    monkeypatch.setattr(state_machine, "_COPY_FROM", 10**9)
    monkeypatch.setattr(state_machine, "_sqlite_rows_per_statement", lambda con, columns: 1)
    assert ledger.plan("bulk", "q", frame, run_id=None).planned == n
    rows = ledger.rows("bulk").drop("id", "idempotency_key", "planned_at", "updated_at")
    ledger.dispose()
    assert rows.height == 2 * n
    bulk = rows.filter(pl.col("partition_key") == "p").drop("partition_key").sort("customer_id")
    one_by_one = rows.filter(pl.col("partition_key") == "q").drop("partition_key")
    assert bulk.equals(one_by_one.sort("customer_id"))
    assert bulk.filter(pl.col("customer_id") == "2")["message"][0] == (
        '{"template":"winback_offer","language":"en","parameters":'
        '["Ann \\"the, first\\"\\n1","日本語 ✓"]}'
    )
    assert bulk["recipient"].null_count() == 0 and (bulk["recipient"] == "").sum() == n // 5
    assert (bulk["fallback_reason"] == "").sum() == n // 6  # empty, not null
    assert bulk["error_code"].drop_nulls().unique().to_list() == ["fallback_sms_no_consent"]


def test_recent_sends_count_accepted_messages_per_customer_channel_and_purpose(
    ledger_url: str,
) -> None:
    from datetime import UTC, datetime, timedelta

    ledger = Ledger(ledger_url)
    ledger.plan("winback", "d1", chosen(3), purpose="marketing")
    ledger.plan("shipped", "d1", chosen(1), purpose="transactional")
    rows = ledger.pending("winback", "d1") + ledger.pending("shipped", "d1")
    ledger.mark_in_flight([r.id for r in rows])
    outcome = {0: Outcome.SENT, 1: Outcome.FAILED, 2: Outcome.SENT, 3: Outcome.SENT}
    ledger.record(
        [(r.id, SendResult(r.idempotency_key, outcome[i], f"m{i}"), 1) for i, r in enumerate(rows)]
    )
    now = datetime.now(UTC) + timedelta(seconds=5)
    recent = ledger.recent_sends(now).sort(["customer_id", "purpose"])
    assert recent.select("customer_id", "purpose", "sends_24h", "sends_7d").rows() == [
        ("1", "marketing", 1, 1),
        ("1", "transactional", 1, 1),
        ("3", "marketing", 1, 1),
    ]
    # As of a week before, none of this had happened yet.
    assert ledger.recent_sends(now - timedelta(days=7)).is_empty()
    # The caps also count what another activation has on its way: planned (deferred to the
    # morning, say), in flight or unknown; never the run's own partition.
    ledger.plan("cart", "d1", chosen(2), purpose="marketing")
    cart = ledger.pending("cart", "d1")
    ledger.mark_in_flight([cart[0].id])
    week = datetime.now(UTC) - timedelta(days=7)
    counted = ledger.sends_since(week, committed=True)
    assert sorted(counted.filter(pl.col("purpose") == "marketing")["customer_id"]) == [
        "1",
        "1",
        "2",
        "3",
    ]
    assert ledger.sends_since(week).height == 3  # accepted only, as the audience SQL reads it
    assert ledger.sends_since(week, exclude=("cart", "d1"), committed=True).height == 3
    # Two activations planned customer 9 without seeing each other: at their re-runs the
    # one planned first keeps it (the later one's row does not count against it), the later
    # one is capped; never both.
    ledger.plan("first", "d1", chosen(1, start=9), purpose="marketing")
    ledger.plan("second", "d1", chosen(1, start=9), purpose="marketing")

    def nines(exclude: tuple[str, str]) -> int:
        counted = ledger.sends_since(week, exclude=exclude, committed=True)
        return counted.filter(pl.col("customer_id") == "9").height

    assert (nines(("first", "d1")), nines(("second", "d1"))) == (0, 1)
    ledger.dispose()


def test_a_deferred_row_waits_for_its_time_and_takes_the_latest_decision(ledger_url: str) -> None:
    from datetime import UTC, datetime, timedelta

    ledger = Ledger(ledger_url)
    later = datetime.now(UTC) + timedelta(hours=3)
    deferred = chosen(2).with_columns(
        pl.lit("defer").alias("decision"), pl.lit(later).alias("not_before")
    )
    ledger.plan("winback", "p", deferred)
    assert ledger.pending("winback", "p") == []
    assert ledger.deferred("winback", "p") == 2
    assert ledger.due_partitions("winback") == {}
    assert set(ledger.due_partitions("winback", later + timedelta(seconds=1))) == {"p"}
    assert len(ledger.pending("winback", "p", later + timedelta(seconds=1))) == 2
    # A later run decides "send now" for customer 1: its row becomes due at once.
    now_row = deferred.head(1).with_columns(
        pl.lit("send").alias("decision"),
        pl.lit(None, dtype=pl.Datetime("us", "UTC")).alias("not_before"),
    )
    assert ledger.plan("winback", "p", now_row).planned == 0
    assert [r.idempotency_key for r in ledger.pending("winback", "p")] == ["winback|p|1|initial"]
    # ... and a run that no longer chooses customer 2 cancels its planned row, with the
    # policy's reason code.
    why = pl.LazyFrame({"customer_id": ["2", "3"], "reason": ["whatsapp_opted_out", "x"]})
    keep = ["winback|p|1|initial"]
    assert ledger.cancel_unchosen("winback", "p", keep, "consent withdrawn", excluded=why) == 1
    assert ledger.counts("winback", "p") == {"planned": 1, "cancelled": 1}
    cancelled = ledger.rows("winback", "p").filter(pl.col("state") == "cancelled")
    assert cancelled.select("customer_id", "error_code").rows() == [("2", "whatsapp_opted_out")]
    ledger.dispose()


def test_unchosen_rows_are_cancelled_from_a_column_of_chosen_keys(ledger_url: str) -> None:
    """The run hands over the chosen keys as a polars column (a million at 10M customers):
    the same rows are cancelled as from a list, and a row claimed since is left alone."""
    from cdp_activation.ledger import ClaimRequest
    from cdp_activation.vocabulary import idempotency_key_expr

    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(2_000))
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    [claimed] = ledger.claim(worker, "winback", "p", "initial", [ClaimRequest("meta_whatsapp", 1)])
    assert len(claimed) == 1
    still = chosen(2_000).filter(pl.col("customer_id").cast(pl.Int64) % 3 == 0)
    keys = still.select(
        idempotency_key_expr(
            "winback", "p", pl.col("customer_id").cast(pl.String), pl.lit("initial")
        )
    ).to_series()
    unchosen = 2_000 - still.height - 1  # the claimed row is not planned any more
    assert ledger.cancel_unchosen("winback", "p", keys, "consent withdrawn") == unchosen
    counts = ledger.counts("winback", "p")
    assert counts == {"planned": still.height, "cancelled": unchosen, "in_flight": 1}
    assert claimed[0].idempotency_key not in set(keys.to_list())
    assert ledger.cancel_unchosen("winback", "p", keys.to_list(), "again") == 0
    ledger.dispose()


def test_holdout_rows_are_recorded_and_never_pending(ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    held = chosen(3).with_columns(pl.lit("holdout").alias("decision"))
    ledger.plan("winback", "p", held)
    assert ledger.counts("winback", "p") == {"holdout": 3}
    assert ledger.pending("winback", "p") == []
    ledger.dispose()


def test_interrupted_rows_of_an_idempotent_connector_are_planned_again(ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    frame = pl.concat(
        [chosen(2), chosen(2, start=3).with_columns(pl.lit("webhook").alias("connector"))]
    )
    ledger.plan("winback", "p", frame)
    ledger.mark_in_flight([r.id for r in ledger.pending("winback", "p")])
    assert ledger.recover_interrupted("winback", "p", idempotent=["webhook"]) == 4
    rows = ledger.rows("winback", "p").sort("customer_id")
    assert rows.select("connector", "state").rows() == [
        ("meta_whatsapp", "unknown"),
        ("meta_whatsapp", "unknown"),
        ("webhook", "planned"),
        ("webhook", "planned"),
    ]
    ledger.dispose()


def test_a_row_planned_again_takes_the_latest_decision_s_send_window(ledger_url: str) -> None:
    # A row a stopped run left planned is decided again by the next run, whose window (the
    # customer's next quiet hours) is a later one: the claim must check that one.
    from datetime import UTC, datetime

    def windowed(until: datetime) -> pl.DataFrame:
        utc = pl.Datetime("us", "UTC")
        return chosen(2).with_columns(
            pl.lit(until).cast(utc).alias("send_until"),
            pl.lit(until + timedelta(hours=12)).cast(utc).alias("reopens_at"),
        )

    ledger = Ledger(ledger_url)
    yesterday = datetime(2026, 12, 5, 21, 0, tzinfo=UTC)
    ledger.plan("winback", "p", windowed(yesterday))
    ledger.plan("winback", "p", windowed(yesterday + timedelta(days=1)))
    rows = ledger.rows("winback", "p")
    assert {as_time(t) for t in rows["send_until"]} == {yesterday + timedelta(days=1)}
    assert {as_time(t) for t in rows["reopens_at"]} == {yesterday + timedelta(days=1, hours=12)}
    ledger.dispose()


def test_the_partition_s_states_mark_what_a_run_would_recover_and_change_nothing(
    ledger_url: str,
) -> None:
    # A preview reads which rows in flight the next run recovers: those of a stopped worker
    # and those with none, not a living worker's. Reading marks no worker expired.
    from cdp_activation.ledger import ClaimRequest

    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(6))
    want = [ClaimRequest("meta_whatsapp", 2)]
    alive = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    [held_alive] = ledger.claim(alive, "winback", "p", "initial", want)
    stopped = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    [held_stopped] = ledger.claim(stopped, "winback", "p", "initial", want)
    ledger.stop_worker(stopped)
    ledger.mark_in_flight([r.id for r in ledger.pending("winback", "p")])  # no worker
    states = ledger.partition_states("winback", "p")
    orphaned = set(states.filter("orphaned")["idempotency_key"])
    assert orphaned.isdisjoint(r.idempotency_key for r in held_alive)
    assert len(orphaned) == 4 and {r.idempotency_key for r in held_stopped} <= orphaned
    assert ledger.heartbeat(alive)
    before = dict(ledger.rows("winback", "p").select("idempotency_key", "state").iter_rows())
    assert ledger.recover_interrupted("winback", "p") == 4
    after = dict(ledger.rows("winback", "p").select("idempotency_key", "state").iter_rows())
    assert {k for k in after if after[k] != before[k]} == orphaned
    ledger.dispose()


def test_every_state_change_is_in_the_history_with_its_time_and_attempts(
    ledger_url: str,
) -> None:
    ledger = Ledger(ledger_url)
    from cdp_activation.ledger import ClaimRequest, Settlement

    ledger.plan("winback", "p", chosen(3), run_id="run-1")
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    [rows] = ledger.claim(worker, "winback", "p", "initial", [ClaimRequest("meta_whatsapp", 3)])
    ids = [r.id for r in rows]
    ledger.settle(
        worker,
        [
            Settlement(ids[0], "sent", provider_message_id="wamid.1"),
            Settlement(ids[1], "failed", error_code="131026"),
            # Never requested: back to planned, its attempt given back.
            Settlement(ids[2], "planned", unsent=True),
        ],
    )
    # A write that changes no state (a stale result for a row no longer held) leaves no event.
    ledger.settle(worker, [Settlement(ids[0], "failed")])
    history = ledger.history()
    by_key = {
        key: list(zip(group["from_state"], group["to_state"], group["attempts"], strict=True))
        for (key,), group in history.group_by("idempotency_key", maintain_order=True)
    }
    assert by_key[rows[0].idempotency_key] == [
        (None, "planned", 0),
        ("planned", "in_flight", 1),
        ("in_flight", "sent", 1),
    ]
    assert by_key[rows[1].idempotency_key][-1] == ("in_flight", "failed", 1)
    assert by_key[rows[2].idempotency_key] == [
        (None, "planned", 0),
        ("planned", "in_flight", 1),
        ("in_flight", "planned", 0),
    ]
    failed = history.filter(pl.col("to_state") == "failed")
    assert failed["error_code"].to_list() == ["131026"]
    assert history["at"].is_sorted() and history["at"].null_count() == 0
    assert history.filter(pl.col("from_state").is_null())["run_id"].unique().to_list() == ["run-1"]
    ledger.dispose()


def test_unknown_rows_are_planned_again_only_when_asked(ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(3))
    rows = ledger.pending("winback", "p")
    ledger.mark_in_flight([r.id for r in rows])
    ledger.record([(rows[0].id, SendResult(rows[0].idempotency_key, Outcome.UNKNOWN), 1)])
    assert ledger.recover_interrupted("winback", "p") == 2  # killed with two in flight
    assert ledger.counts("winback", "p") == {"unknown": 3}
    assert ledger.pending("winback", "p") == []  # by default never resent
    assert ledger.replan_unknown("winback", "p") == 3  # the activation opted in
    assert sorted(r.id for r in ledger.pending("winback", "p")) == sorted(r.id for r in rows)
    transitions = ledger.history()[["from_state", "to_state"]].rows()
    assert transitions.count(("unknown", "planned")) == 3
    ledger.dispose()


def test_a_ledger_from_an_earlier_version_gains_the_new_columns(tmp_path: Path) -> None:
    """A ledger file made before `request_id` existed opens, keeps its rows, and works."""
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    ledger = Ledger(url)
    ledger.plan("winback", "p", chosen(2))
    with ledger.engine.begin() as con:  # as it was: no request_id, nor the index on it
        con.exec_driver_sql("DROP INDEX ix_sends_requests")
        con.exec_driver_sql("ALTER TABLE sends DROP COLUMN request_id")
    ledger.dispose()

    import cdp_activation.ledger as ledger_module

    ledger_module._MIGRATED.discard(url)  # as a new process of the new version finds it
    upgraded = Ledger(url)
    columns = {c["name"] for c in sa.inspect(upgraded.engine).get_columns("sends")}
    assert "request_id" in columns
    rows = upgraded.pending("winback", "p")
    assert [r.request_id for r in rows] == [None, None]
    upgraded.mark_in_flight([], [(rows[0].id, rows[0].id), (rows[1].id, rows[0].id)])
    assert upgraded.recover_interrupted("winback", "p", idempotent=["meta_whatsapp"]) == 2
    assert [r.request_id for r in upgraded.pending("winback", "p")] == [rows[0].id] * 2
    upgraded.dispose()


def test_a_bulk_plan_does_not_wait_on_a_lock_its_statistics_refresh_would_need(
    ledger_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another session holds what ANALYZE needs (a vacuum, an index built CONCURRENTLY: here a
    lock of the same kind, held open): the plan is written, its statistics refresh gives up
    after its short lock timeout with a warning, and the plan returns; it never waits it out."""
    import time

    if not ledger_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's ANALYZE and its lock; SQLite plans without one")
    ledger = Ledger(ledger_url)
    holder = ledger.engine.connect()
    try:
        holder.exec_driver_sql("LOCK TABLE sends IN SHARE UPDATE EXCLUSIVE MODE")
        began = time.monotonic()
        assert ledger.plan("winback", "p", chosen(12_000)).planned == 12_000
        assert time.monotonic() - began < 15  # the lock is held for good: only a timeout ends it
        assert "could not refresh the statistics of sends" in caplog.text
    finally:
        holder.rollback()
        holder.close()
    assert ledger.rows("winback").height == 12_000
    ledger.dispose()


def test_a_partition_s_states_are_read_by_the_due_index_and_the_retired_one_goes(
    ledger_url: str,
) -> None:
    """ix_sends_activation_partition_state was the first columns of ix_sends_due again, and
    one more index for every write to keep: it is no longer made, a SQLite ledger an older
    version made loses it, and a partition's rows by state are read by ix_sends_due."""
    from cdp_activation.ledger.schema import RETIRED_INDEX

    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(500))
    postgres = ledger.dialect == "postgresql"
    listing = (
        "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
        if postgres
        else "SELECT name FROM sqlite_master WHERE type = 'index'"
    )
    with ledger.engine.begin() as con:
        assert RETIRED_INDEX not in set(con.exec_driver_sql(listing).scalars())
        if not postgres:  # as an older version left it
            con.exec_driver_sql(
                f"CREATE INDEX {RETIRED_INDEX} ON sends (activation, partition_key, state)"
            )
    ledger.migrate()
    with ledger.engine.connect() as con:
        assert RETIRED_INDEX not in set(con.exec_driver_sql(listing).scalars())
        if not postgres:
            plan = con.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT state, count(*) FROM sends "
                "WHERE activation = 'winback' AND partition_key = 'p' GROUP BY state"
            ).all()
            assert "ix_sends_due" in str(plan), plan
    assert ledger.progress("winback", "p") == (0, 500)  # every row planned and due
    ledger.dispose()


def test_the_schema_is_migrated_once_per_process_not_on_every_opening(ledger_url: str) -> None:
    """A sensor opens the ledger every minute: only the first opening in a process creates or
    upgrades the schema (and on PostgreSQL takes the schema lock); a dropped schema is seen."""
    import sqlalchemy as sa

    import cdp_activation.ledger as ledger_module

    ledger_module._MIGRATED.discard(ledger_url)
    first = Ledger(ledger_url)
    first.dispose()
    statements: list[str] = []

    def record(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    sa.event.listen(sa.Engine, "before_cursor_execute", record)
    try:
        again = Ledger(ledger_url)
        again.plan("winback", "p", chosen(1))
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", record)
    schema_work = [
        s for s in statements if re.search(r"\b(CREATE|ALTER|advisory|ledger_schema_lock)", s)
    ]
    assert schema_work == [] and statements  # it did work, and none of it was DDL
    with again.engine.begin() as con:  # the schema goes away (a test, an operator)
        for table in ("send_events", "sends"):
            con.exec_driver_sql(f"DROP TABLE {table}")
    again.dispose()
    reopened = Ledger(ledger_url)  # sees it is gone and creates it again
    assert reopened.counts("winback", "p") == {}
    reopened.dispose()


def test_a_run_opens_the_ledger_once_and_closes_it_at_teardown(ledger_url: str) -> None:
    """Every step of a run in one process shares one ledger (one engine, one pool), opened on
    first use and closed when Dagster tears the run's resources down."""
    import dagster as dg

    from cdp_activation.components.resources import LedgerResource

    with dg.build_resources({"ledger": LedgerResource(url=ledger_url)}) as resources:
        first = resources.ledger.ledger()
        first.plan("winback", "p", chosen(2))
        again = resources.ledger.ledger()
        assert again is first
        assert again.counts("winback", "p") == {"planned": 2}
        pool = first.engine.pool
        assert pool.checkedin() >= 1  # the connection stays pooled for the next step
    assert first.engine.pool is not pool  # disposed at teardown: its pool was replaced
    assert pool.checkedin() == 0


def test_a_free_form_whatsapp_message_whose_window_closed_is_cancelled_at_its_claim(
    ledger_url: str,
) -> None:
    """A long send (or a retry, or quiet hours) can reach a free-form WhatsApp message after
    its customer's 24-hour window closed: the claim cancels it with the policy's reason code
    instead of sending it (Meta would refuse it, and the policy forbids it). One kept in a
    request its provider may hold cannot leave it alone: that request is given up. A
    customer who wrote again meanwhile has a later window, which the next plan writes; one
    the next decision sends a template instead gets the template."""
    from datetime import UTC, datetime

    from cdp_activation.ledger import ClaimRequest

    utc = pl.Datetime("us", "UTC")
    now = datetime.now(UTC)
    closed, open_ = now - timedelta(hours=1), now + timedelta(hours=3)
    windows = [closed, now - timedelta(seconds=1), open_, closed, open_, closed]
    free_form = (
        chosen(6)
        .with_columns(
            template_name=pl.lit(None, pl.String),
            template_language=pl.lit(None, pl.String),
            variables=pl.lit(None, pl.List(pl.String)),
            body=pl.lit("Your order is ready"),
        )
        .with_columns(pl.Series("window_until", windows, dtype=utc))
    )
    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", free_form)
    with ledger.engine.begin() as con:
        kept = sends.c.customer_id.in_(["4", "5"])
        con.execute(sends.update().where(kept).values(request_id=7))
        # Customer 2's message was tried once (a 429).
        con.execute(sends.update().where(sends.c.customer_id == "2").values(attempts=1))
    # The next run: customer 3 wrote again (a later window); customer 2 would now get an SMS,
    # but a row tried before keeps its route, so it is still that WhatsApp message, window
    # and all; customer 6 gets the plan's template instead (same connector, no window).
    later = now + timedelta(hours=20)
    customer = pl.col("customer_id")
    replanned = free_form.with_columns(
        window_until=pl.when(customer == 3)
        .then(pl.lit(later).cast(utc))
        .when(customer.is_in([2, 6]))
        .then(None)
        .otherwise(pl.col("window_until")),
        channel=pl.when(customer == 2).then(pl.lit("sms")).otherwise(pl.col("channel")),
        connector=pl.when(customer == 2).then(pl.lit("twilio")).otherwise(pl.col("connector")),
        template_name=pl.when(customer == 6).then(pl.lit("winback_offer")),
        template_language=pl.when(customer == 6).then(pl.lit("en")),
        variables=pl.when(customer == 6).then(pl.lit(["Ann"])),
        body=pl.when(customer == 6).then(None).otherwise(pl.col("body")),
    )
    ledger.plan("winback", "p", replanned)
    rows = ledger.rows("winback", "p").sort("customer_id")
    assert as_time(rows["window_until"][2]) == later
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    whole = [ClaimRequest("meta_whatsapp", 10, True)]  # (a provider taking requests whole)
    claims = [ledger.claim(worker, "winback", "p", "initial", whole, now=now) for _ in range(2)]
    assert [sorted(r.customer_id for r in c[0]) for c in claims] == [["3", "6"], []]
    assert "winback_offer" in next(r for r in claims[0][0] if r.customer_id == "6").message.get(
        "template", ""
    )
    rows = ledger.rows("winback", "p").sort("customer_id")
    assert rows.select("customer_id", "state", "error_code", "attempts").rows() == [
        ("1", "cancelled", "whatsapp_outside_window", 0),
        ("2", "cancelled", "whatsapp_outside_window", 1),
        ("3", "in_flight", None, 1),
        ("4", "cancelled", "whatsapp_outside_window", 0),
        ("5", "unknown", None, 0),
        ("6", "in_flight", None, 1),
    ]
    assert "window closed" in rows["error_message"][0]
    assert "24-hour WhatsApp window" in rows["error_message"][4]
    ledger.dispose()


def test_the_claim_finds_closed_windows_by_their_own_index(tmp_path: Path) -> None:
    """The claim looks for closed windows every time: an index probe over planned free-form
    WhatsApp rows only, never a walk of the partition's planned rows."""
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.sqlite")
    ledger.plan("winback", "p", chosen(50))
    with ledger.engine.connect() as con:
        plan = con.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT id FROM sends WHERE activation = 'winback' "
            "AND partition_key = 'p' AND step = 'initial' AND window_until <= '2026-12-07' "
            "AND state = 'planned' AND request_id IS NULL"
        ).all()
    assert "USING INDEX ix_sends_window" in str(plan), plan
    ledger.dispose()


def test_claims_hand_each_row_to_one_worker_and_only_gone_workers_are_recovered(
    ledger_url: str,
) -> None:
    from datetime import UTC, datetime, timedelta

    from cdp_activation.ledger import ClaimRequest, LeaseLost, Settlement

    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(10))
    first = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    second = ledger.register_worker("winback", "p", "initial", lease_seconds=0.2)
    want = [ClaimRequest("meta_whatsapp", 3)]
    [a] = ledger.claim(first, "winback", "p", "initial", want)
    [b] = ledger.claim(second, "winback", "p", "initial", want)
    assert len(a) == len(b) == 3 and not {r.id for r in a} & {r.id for r in b}
    assert {r.attempts for r in a + b} == {1}
    # A retryable answer waits in the ledger (planned, due later), not in flight.
    retry_at = datetime.now(UTC) + timedelta(minutes=5)
    ledger.settle(first, [Settlement(a[0].id, "planned", error_code="429", not_before=retry_at)])
    ledger.settle(first, [Settlement(a[1].id, "sent", provider_message_id="wamid.1")])
    # Another worker's answer for a row it does not hold changes nothing.
    ledger.settle(second, [Settlement(a[2].id, "failed")])
    assert ledger.counts("winback", "p") == {"planned": 5, "in_flight": 4, "sent": 1}
    # Both workers live (this process): nothing is recovered, whatever their rows.
    assert ledger.recover_interrupted("winback", "p") == 0
    # The second one's lease lapses (it stopped renewing): its rows are recovered, and it
    # may not claim again; the first one's are left alone.
    import time

    time.sleep(0.3)
    assert ledger.recover_interrupted("winback", "p") == 3
    try:
        ledger.claim(second, "winback", "p", "initial", want)
        raise AssertionError("a worker that lost its lease claimed rows")
    except LeaseLost:
        pass
    assert not ledger.heartbeat(second) and ledger.heartbeat(first)
    assert ledger.counts("winback", "p") == {"planned": 5, "in_flight": 1, "sent": 1, "unknown": 3}
    # A stopped worker's rows are recovered at once.
    ledger.stop_worker(first)
    assert ledger.recover_interrupted("winback", "p") == 1
    # Planned rows a stopped run left are due: the deferred-sends sensor sees the partition.
    assert set(ledger.due_partitions("winback")) == {"p"}
    # Rows past the send deadline are dead-lettered with their reason, not sent late; the
    # one backing off until later is not due yet, so not late either.
    assert ledger.expire_overdue("winback", "p", "initial", timedelta(seconds=0)) == 4
    assert ledger.dead_letters_by_reason("winback", "p") == {"send_deadline_passed": 4}
    ledger.dispose()


def test_a_request_that_must_go_out_whole_is_never_split(ledger_url: str) -> None:
    """Through a provider that de-duplicates a whole request on a key made from its rows
    (LINE, the webhook), a request whose answer was lost is asked again with exactly the same
    rows: none of them is cancelled or dead-lettered alone. A request the provider surely
    did not take (a 5xx) forgets its grouping."""
    from datetime import UTC, datetime, timedelta

    from cdp_activation.ledger import ClaimRequest, Settlement

    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(6))
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    [group] = ledger.claim(
        worker, "winback", "p", "initial", [ClaimRequest("meta_whatsapp", 3, True)]
    )
    [other] = ledger.claim(
        worker, "winback", "p", "initial", [ClaimRequest("meta_whatsapp", 3, True)]
    )
    assert len({r.request_id for r in group}) == 1 and group[0].request_id is not None
    soon = datetime.now(UTC) + timedelta(seconds=1)
    # The first request's answer was lost (asked again with its key); the second got a 503.
    ledger.settle(
        worker, [Settlement(r.id, "planned", not_before=soon, uncertain=True) for r in group]
    )
    ledger.settle(worker, [Settlement(r.id, "planned", not_before=soon) for r in other])
    rows = ledger.rows("winback", "p").sort("id")
    assert rows["request_id"].to_list() == [group[0].request_id] * 3 + [None] * 3
    # A later run no longer chooses the first customer of each request: only the one of the
    # request that may already be at the provider stays.
    keys = [idempotency_key("winback", "p", str(c), "initial") for c in (2, 3, 5, 6)]
    assert ledger.cancel_unchosen("winback", "p", keys, "consent withdrawn") == 1
    # Once due, the first request is claimed again whole: the same rows, hence the same key.
    import time

    time.sleep(1.1)
    whole = [ClaimRequest("meta_whatsapp", 3, True)]
    [again] = ledger.claim(worker, "winback", "p", "initial", whole)
    assert sorted(r.id for r in again) == sorted(r.id for r in group)
    # Its answer is lost again; its rows fall due at different times (jitter). Past the
    # deadline a grouped request is dead-lettered whole, or not at all.
    past, later = datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(hours=1)
    ledger.settle(
        worker,
        [
            Settlement(r.id, "planned", not_before=past if i == 0 else later, uncertain=True)
            for i, r in enumerate(again)
        ],
    )
    assert ledger.expire_overdue("winback", "p", "initial", timedelta(seconds=0)) == 2
    with ledger.engine.begin() as con:
        from cdp_activation.ledger import sends

        con.execute(sends.update().where(sends.c.request_id.is_not(None)).values(not_before=past))
    assert ledger.expire_overdue("winback", "p", "initial", timedelta(seconds=0)) == 3
    ledger.dispose()


def test_one_message_requests_are_claimed_together_each_its_own_request(ledger_url: str) -> None:
    """Requests of one message each through a de-duplicating provider (the webhook with batch
    size 1) are claimed in one statement, each row a request with its own number; one whose
    answer was lost is claimed again first, alone, with its number."""
    from datetime import UTC, datetime, timedelta

    from cdp_activation.ledger import ClaimRequest, Settlement

    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(40))
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    single = ClaimRequest("meta_whatsapp", 1, True)
    first = ledger.claim(worker, "winback", "p", "initial", [single] * 32)
    assert [len(g) for g in first] == [1] * 32
    rows = [g[0] for g in first]
    assert len({r.id for r in rows}) == 32
    numbers = [r.request_id for r in rows]
    assert None not in numbers and len(set(numbers)) == 32
    assert all(0 < n < 2**62 and n not in {r.id for r in rows} for n in numbers)
    # Stored as returned: the number is what a resend must carry.
    stored = ledger.rows("winback", "p").filter(pl.col("state") == "in_flight")
    assert dict(zip(stored["id"], stored["request_id"], strict=True)) == {
        r.id: r.request_id for r in rows
    }
    # One answer is lost: that request goes out again first, whole, with its own number.
    lost = rows[5]
    past = datetime.now(UTC) - timedelta(seconds=1)
    ledger.settle(worker, [Settlement(lost.id, "planned", not_before=past, uncertain=True)])
    second = ledger.claim(worker, "winback", "p", "initial", [single] * 10)
    assert second[0][0].id == lost.id and second[0][0].request_id == lost.request_id
    assert second[0][0].resent_request
    fresh = [g[0] for g in second[1:] if g]
    assert len(fresh) == 8  # the 8 rows left of 40
    assert not {r.request_id for r in fresh} & set(numbers)
    ledger.dispose()


def test_dead_letters_an_earlier_version_gave_up_on_are_planned_again(ledger_url: str) -> None:
    """Before the claiming ledger, a message throttled or failed on every attempt ended
    `dead_letter` (never accepted). Within the send deadline it is planned again; a dead
    letter of the deadline itself is not."""
    from datetime import timedelta

    from cdp_activation.ledger import DEADLINE_PASSED, sends

    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(3))
    with ledger.engine.begin() as con:
        con.execute(sends.update().values(state="dead_letter", error_code="503"))
        con.execute(
            sends.update().where(sends.c.customer_id == "3").values(error_code=DEADLINE_PASSED)
        )
    assert ledger.revive_given_up("winback", "p", "initial", timedelta(hours=24)) == 2
    assert ledger.counts("winback", "p") == {"planned": 2, "dead_letter": 1}
    # Past the deadline nothing comes back.
    with ledger.engine.begin() as con:
        con.execute(sends.update().values(state="dead_letter", error_code=None))
    assert ledger.revive_given_up("winback", "p", "initial", timedelta(seconds=-1)) == 0
    ledger.dispose()


def test_processes_opening_a_new_sqlite_ledger_at_once_all_get_it(tmp_path: Path) -> None:
    """Many processes (a run's claim workers, overlapping runs) open a ledger that does not
    exist yet at the same instant: each one waits for the others' WAL switch and schema
    creation instead of failing with "database is locked"."""
    import subprocess
    import sys
    import time

    opener = (
        "import sys, time; from cdp_activation.ledger import Ledger; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
        "Ledger(sys.argv[1]).dispose(); print('ok')"
    )
    for round_ in range(3):
        url = f"sqlite:///{tmp_path / f'new-{round_}.sqlite'}"
        start = str(time.time() + 2.0)  # all of them at once, after their imports
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", opener, url, start],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        outputs = [w.communicate(timeout=120) for w in workers]
        assert [out.strip() for out, _ in outputs] == ["ok"] * 6, [e[-500:] for _, e in outputs]


def test_a_claim_failing_in_the_database_raises_sqlalchemys_error(ledger_url: str) -> None:
    """Claims run on the driver's cursor for speed; a database error still comes out as
    SQLAlchemy's (what the engine's retries and error reports look for), not the driver's."""
    import sqlalchemy as sa

    from cdp_activation.ledger import ClaimRequest

    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", chosen(3))
    worker = ledger.register_worker("winback", "p", "initial", lease_seconds=60)
    with ledger.engine.begin() as con:
        con.exec_driver_sql("ALTER TABLE sends RENAME COLUMN request_id TO request_number")
    try:
        for request in (ClaimRequest("meta_whatsapp", 1, True), ClaimRequest("meta_whatsapp", 2)):
            with pytest.raises(sa.exc.DBAPIError) as raised:
                ledger.claim(worker, "winback", "p", "initial", [request])
            assert "request_id" in str(raised.value.orig)
        # The connection went back to the pool in order: the ledger still answers.
        assert ledger.counts("winback", "p") == {"planned": 3}
    finally:
        with ledger.engine.begin() as con:
            con.exec_driver_sql("ALTER TABLE sends RENAME COLUMN request_number TO request_id")
        ledger.dispose()


@pytest.mark.parametrize("frozen_in", ["settle", "claim"])
def test_a_worker_stalled_inside_a_transaction_does_not_hold_the_recovery(
    ledger_url: str, frozen_in: str
) -> None:
    """A worker frozen (SIGSTOP, a lost host) in the middle of a settle or a claim (whose
    lease renewal sets the bound in the same statement) holds its rows' locks
    for as long as its connection lives. On PostgreSQL the server ends that transaction once
    it has sat idle past the worker's lease, so the run that recovers its rows goes on
    instead of waiting for ever (it hung CI once: the late worker of
    test_a_stopped_worker_keeps_its_rows_until_its_lease_expires). SQLite has one writer: a
    stalled one is bounded by the busy timeout instead."""
    import contextlib
    import threading
    import time

    from cdp_activation.ledger import ClaimRequest

    if not ledger_url.startswith("postgresql"):
        pytest.skip("PostgreSQL only: SQLite's single writer is bounded by its busy timeout")
    stalled, fresh = Ledger(ledger_url), Ledger(ledger_url)
    stalled.plan("winback", "p", chosen(4))
    worker = stalled.register_worker("winback", "p", "initial", lease_seconds=1.0)
    [rows] = stalled.claim(worker, "winback", "p", "initial", [ClaimRequest("meta_whatsapp", 4)])
    assert len(rows) == 4
    # Frozen mid-settle: its transaction has updated the rows and never commits.
    con = stalled.engine.connect()
    open_transaction = con.begin()
    if frozen_in == "settle":
        stalled._bound_idle(con, worker)
    else:
        assert stalled._renew(con, worker)
    con.exec_driver_sql(
        "UPDATE sends SET error_message = 'settling' WHERE claimed_by = %s", (worker,)
    )
    time.sleep(1.3)  # the lease has lapsed
    recovered: list[int] = []
    recovery = threading.Thread(
        target=lambda: recovered.append(fresh.recover_interrupted("winback", "p")), daemon=True
    )
    recovery.start()
    recovery.join(timeout=20)
    try:
        assert not recovery.is_alive(), "the recovery waited on the stalled worker's locks"
        assert recovered == [4]
        assert fresh.counts("winback", "p") == {"unknown": 4}
    finally:
        with contextlib.suppress(Exception):  # the server ended it, as it should
            open_transaction.rollback()
        con.close()
        recovery.join(timeout=30)
        stalled.dispose()
        fresh.dispose()


def test_signature_refusals_from_receivers_at_once_add_up(ledger_url: str) -> None:
    """Several receivers count refusals into the same minute at the same time (the upsert of
    `record_refusals`, on SQLite and PostgreSQL): none is lost, and a count older than the
    window asked for is not read."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import UTC, datetime, timedelta

    receivers = [Ledger(ledger_url) for _ in range(4)]
    try:
        with receivers[0].engine.begin() as con:  # a refusal from an hour ago
            con.exec_driver_sql(
                "INSERT INTO webhook_refusals (route, minute, refusals) VALUES ('meta', "
                + ("?" if receivers[0].dialect == "sqlite" else "%s")
                + ", 100)",
                (datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1),),
            )
        began = datetime.now(UTC)

        def count(ledger: Ledger) -> None:
            for _ in range(25):
                ledger.record_refusals({"meta": 2, "twilio": 1})

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(count, receivers))
        assert receivers[1].refusals_since(began) == {"meta": 200, "twilio": 100}
    finally:
        for ledger in receivers:
            ledger.dispose()


def test_a_sqlite_ledger_has_each_commit_on_disk_before_it_returns(tmp_path: Path) -> None:
    """A claim must outlive a power loss or an OS crash (its request goes out right after),
    and so must a status report or a STOP answered 200: SQLite's WAL synced at every commit
    (`synchronous=FULL`), not only at checkpoints, on every connection of the pool."""
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.sqlite")
    try:
        with ledger.engine.connect() as first, ledger.engine.connect() as second:
            for con in (first, second):
                assert con.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
                assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        ledger.dispose()
