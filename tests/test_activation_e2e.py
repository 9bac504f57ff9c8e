"""The whole activation through Dagster: real DuckDB warehouse, real sandbox over HTTP, real
SQLite ledger, a real Dagster instance in a temporary DAGSTER_HOME."""

from __future__ import annotations

import copy
import os
import shutil
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import polars as pl
import pytest
import sqlalchemy as sa
import yaml
from time_machine import TimeMachineFixture

from cdp_activation.activation.run import Activation, DeliverySummary, compute_audience
from cdp_activation.audience.sql import AudienceSQLError
from cdp_activation.audience.warehouse import Warehouse
from cdp_activation.cli.runner import RunSummary, run_activation
from cdp_activation.components.activation import build_activation_defs
from cdp_activation.defs.resources import resources
from cdp_activation.demo.data import generate_demo_warehouse
from cdp_activation.ledger import Ledger, sends
from cdp_activation.sandbox import SandboxServer, twilio_content_sid
from cdp_activation.settings import project_root
from cdp_activation.spec import ActivationSpec

pytestmark = pytest.mark.e2e

ROOT = project_root()
WINBACK_YAML = ROOT / "src/cdp_activation/defs/activations/winback_whatsapp/defs.yaml"
TODAY = datetime.now(UTC).date()


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("warehouse") / "demo.duckdb"
    as_of = datetime.combine(TODAY, time.min, tzinfo=UTC)
    generate_demo_warehouse(path, customers=4_000, seed=7, as_of=as_of)
    return path


# Quiet hours depend on the hour: every run here happens at 14:00 UTC of today (clock ticking),
# when the demo's customers are awake except in Mexico (08:00), so sends, failures and deferrals
# all occur whatever the hour CI runs at.
RUN_AT = datetime.combine(TODAY, time(14, 0), tzinfo=UTC)


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    warehouse: Path,
    sandbox: SandboxServer,
    time_machine: TimeMachineFixture,
) -> SimpleNamespace:
    time_machine.move_to(RUN_AT, tick=True)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("CDP_WAREHOUSE_URL", f"duckdb:///{warehouse}")
    monkeypatch.setenv("CDP_LEDGER_URL", ledger_url)
    monkeypatch.setenv("CDP_META_BASE_URL", f"{sandbox.url}/meta")
    monkeypatch.setenv("CDP_TWILIO_BASE_URL", f"{sandbox.url}/twilio")
    monkeypatch.setenv("CDP_TWILIO_CONTENT_BASE_URL", f"{sandbox.url}/twilio")
    monkeypatch.setenv("CDP_META_RATE_PER_SECOND", "5000")
    monkeypatch.setenv("CDP_TWILIO_RATE_PER_SECOND", "5000")
    for var in ("CDP_META_ACCESS_TOKEN", "CDP_TWILIO_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return SimpleNamespace(home=home, ledger_url=ledger_url, sandbox=sandbox, tmp=tmp_path)


def winback_attributes() -> dict[str, Any]:
    return yaml.safe_load(WINBACK_YAML.read_text())["attributes"]


def custom_definitions(
    tmp: Path, name: str, attributes: dict[str, Any], sql: str | None = None
) -> dg.Definitions:
    """An activation defined in a scratch project (its own sql/), with the real resources."""
    root = tmp / "project"
    if not root.exists():
        shutil.copytree(ROOT / "sql", root / "sql")
    if sql is not None:
        (root / "sql" / "audiences" / f"{name}.sql").write_text(sql)
        attributes = {
            **attributes,
            "audience": {**attributes["audience"], "sql": f"sql/audiences/{name}.sql"},
        }
    activation = Activation.from_spec(name, ActivationSpec.model_validate(attributes), root)
    return dg.Definitions.merge(build_activation_defs(activation), resources())


def ledger_rows(env: SimpleNamespace, activation: str = "winback_whatsapp") -> pl.DataFrame:
    ledger = Ledger(env.ledger_url)
    try:
        return ledger.rows(activation)
    finally:
        ledger.dispose()


def assert_nothing_sent(env: SimpleNamespace, summary: RunSummary, activation: str) -> None:
    assert summary.sent == 0
    assert env.sandbox.messages() == []
    assert ledger_rows(env, activation).is_empty()


def test_winback_runs_end_to_end_and_a_rerun_sends_nothing_twice(env: SimpleNamespace) -> None:
    first = run_activation("winback_whatsapp", TODAY.isoformat())
    assert first.success, first.error
    assert first.audience > 500
    assert first.eligible["whatsapp"] > first.eligible["sms"] > 0
    assert sum(first.eligible.values()) + sum(first.excluded.values()) == first.audience
    assert {"invalid_phone", "suppressed", "whatsapp_no_consent+sms_no_consent"} <= set(
        first.excluded
    )
    received = env.sandbox.messages()
    assert first.sent == len(received) > 0
    assert first.failed == first.error_codes.get("131026", 0) > 0  # "not on WhatsApp"
    # Recipients in their quiet hours right now (the test may run at any time) are deferred.
    assert first.sent + first.failed + first.deferred == sum(first.eligible.values())

    rows = ledger_rows(env)
    assert rows.height == sum(first.eligible.values())
    assert rows["idempotency_key"].n_unique() == rows.height
    # Every message knows until when it may go: its customer's next quiet hours.
    assert rows["send_until"].null_count() == rows["reopens_at"].null_count() == 0
    assert set(rows.filter(pl.col("state") == "sent")["provider_message_id"]) == {
        m.provider_message_id for m in received
    }
    # Only channels the customer consented to, and only approved templates went out.
    assert {m.template_name for m in received if m.channel == "whatsapp"} == {"winback_offer"}

    second = run_activation("winback_whatsapp", TODAY.isoformat())
    assert second.success, second.error
    assert second.sent == 0
    assert second.already_sent == first.sent
    assert len(env.sandbox.messages()) == len(received)

    # The run is in the Dagster instance, with its metadata, like a run launched from the UI.
    instance = dg.DagsterInstance.get()
    event = instance.get_latest_materialization_event(
        dg.AssetKey(["winback_whatsapp", "decisions"])
    )
    assert event is not None
    metadata = event.asset_materialization.metadata
    assert metadata["eligible_whatsapp"].value == first.eligible["whatsapp"]
    # The sample shows messages, never a whole phone number.
    sample = metadata["sample_messages"].value
    assert "winback_offer" in sample and "*****" in sample
    assert not any(m.to in sample for m in received)
    assert not any(phone in sample for phone in rows["recipient"].to_list())
    # Each step's part of the run summary is one JSON entry, from which the CLI rebuilds it.
    assert metadata["summary"].value["eligible"] == first.eligible
    deliveries = instance.get_latest_materialization_event(
        dg.AssetKey(["winback_whatsapp", "deliveries"])
    )
    assert deliveries is not None
    recorded = DeliverySummary.from_json(deliveries.asset_materialization.metadata["summary"].value)
    assert (recorded.already_sent, recorded.sent) == (first.sent, 0)  # the second run's
    assert recorded.ledger_states == second.partition_states


def test_dry_run_previews_and_sends_nothing(env: SimpleNamespace) -> None:
    summary = run_activation("winback_whatsapp", TODAY.isoformat(), dry_run=True)
    assert summary.success, summary.error
    assert summary.to_send + summary.deferred == sum(summary.eligible.values()) > 0
    assert summary.estimated_seconds is not None and summary.estimated_seconds > 0
    assert_nothing_sent(env, summary, "winback_whatsapp")


def test_a_preview_after_a_run_counts_what_the_next_run_sends(env: SimpleNamespace) -> None:
    # The first run sends who is awake and defers the rest (planned, waiting in the ledger).
    first = run_activation("winback_whatsapp", TODAY.isoformat())
    assert first.success, first.error
    assert first.deferred > 0 and first.sent > 0
    # Previewed with every hour open, the deferred customers are due now: the preview must
    # say so. It said "would send 0" (every key the ledger held was subtracted, planned ones
    # too), and the run then sent all of them.
    everyone = ("00:00", "23:59")
    preview = run_activation(
        "winback_whatsapp", TODAY.isoformat(), dry_run=True, send_window=everyone
    )
    assert preview.success, preview.error
    assert (preview.to_send, preview.deferred) == (first.deferred, 0)
    assert preview.already_sent == first.sent
    sent_before = len(env.sandbox.messages())
    second = run_activation("winback_whatsapp", TODAY.isoformat(), send_window=everyone)
    assert second.success, second.error
    assert second.sent + second.failed == preview.to_send
    assert len(env.sandbox.messages()) == sent_before + second.sent
    # And once they are sent, the preview has nothing left to send.
    after = run_activation(
        "winback_whatsapp", TODAY.isoformat(), dry_run=True, send_window=everyone
    )
    assert (after.to_send, after.deferred) == (0, 0)
    assert after.already_sent == first.sent + second.sent


def test_a_preview_days_later_counts_what_waited_past_the_deadline_as_not_sent(
    env: SimpleNamespace, time_machine: TimeMachineFixture
) -> None:
    # The deferred customers wait in the ledger; three days later (the deadline is a day)
    # the run gives them up as dead letters instead of sending them: the preview must not
    # promise them.
    first = run_activation("winback_whatsapp", TODAY.isoformat())
    assert first.success, first.error
    assert first.deferred > 0
    time_machine.move_to(RUN_AT + timedelta(days=3), tick=True)
    everyone = ("00:00", "23:59")
    preview = run_activation(
        "winback_whatsapp", TODAY.isoformat(), dry_run=True, send_window=everyone
    )
    assert preview.success, preview.error
    assert (preview.to_send, preview.deferred) == (0, 0)
    later = run_activation("winback_whatsapp", TODAY.isoformat(), send_window=everyone)
    assert later.success, later.error
    assert later.sent == 0
    assert later.dead_letter_by_reason.get("send_deadline_passed") == first.deferred


def test_dead_letters_an_earlier_run_gave_up_on_are_decided_again_before_they_are_sent(
    env: SimpleNamespace, warehouse: Path
) -> None:
    # Messages an earlier version gave up on after their retries (dead letters the provider
    # never accepted) are revived within the deadline, and then decided like any planned
    # message: one whose customer is in quiet hours now waits, one the policy no longer
    # chooses is cancelled, the rest are sent; and the preview counts them the same way.
    first = run_activation("winback_whatsapp", TODAY.isoformat())
    assert first.success, first.error
    rows = ledger_rows(env)
    strict = {"lapse_threshold": 0.95}
    activation = Activation.from_spec(
        "winback_whatsapp", ActivationSpec.model_validate(winback_attributes())
    )
    kept = compute_audience(
        activation, Warehouse(f"duckdb:///{warehouse}"), TODAY.isoformat(), strict
    )["customer_id"].cast(pl.String)
    sent = rows.filter(pl.col("state") == "sent", pl.col("step") == "initial")
    still_chosen = sent.filter(pl.col("customer_id").is_in(kept.implode()))["id"].head(5)
    unchosen = sent.filter(~pl.col("customer_id").is_in(kept.implode()))["id"].head(5)
    asleep = rows.filter(pl.col("state") == "planned", pl.col("customer_id").is_in(kept.implode()))[
        "id"
    ].head(5)
    assert len(still_chosen) == len(unchosen) == len(asleep) == 5
    given_up = [*still_chosen, *unchosen, *asleep]
    engine = sa.create_engine(env.ledger_url)
    with engine.begin() as con:
        con.execute(
            sa.text(
                "UPDATE sends SET state = 'dead_letter', error_code = 'http_503', "
                "provider_message_id = NULL, sent_at = NULL, not_before = NULL "
                f"WHERE id IN ({', '.join(map(str, given_up))})"
            )
        )
    engine.dispose()
    preview = run_activation("winback_whatsapp", TODAY.isoformat(), dry_run=True, parameters=strict)
    again = run_activation("winback_whatsapp", TODAY.isoformat(), parameters=strict)
    assert again.success, again.error
    assert again.sent == preview.to_send == 5
    states = dict(ledger_rows(env).select("id", "state").iter_rows())
    assert [states[i] for i in still_chosen] == ["sent"] * 5
    assert [states[i] for i in unchosen] == ["cancelled"] * 5  # not sent: no longer chosen
    codes = dict(ledger_rows(env).select("id", "error_code").iter_rows())
    assert [codes[i] for i in unchosen] == ["left_audience"] * 5  # each with its reason code
    # The run's summary counts the partition's cancelled rows by code (deferred ones too).
    cancelled = ledger_rows(env).filter(pl.col("state") == "cancelled").height
    assert again.cancelled_by_reason == {"left_audience": cancelled} and cancelled >= 5
    assert [states[i] for i in asleep] == ["planned"] * 5  # not sent: in quiet hours


def held_rows(*rows: tuple[str, str, str, str | None, datetime, bool]) -> pl.DataFrame:
    """A partition's rows as `Ledger.partition_states` reads them (none deferred): key,
    state, connector, error code, when planned, and whether a gone worker left it in flight."""
    utc = pl.Datetime("us", "UTC")
    return pl.DataFrame(
        list(rows),
        schema={
            "idempotency_key": pl.String,
            "state": pl.String,
            "connector": pl.String,
            "error_code": pl.String,
            "planned_at": utc,
            "orphaned": pl.Boolean,
        },
        orient="row",
    ).with_columns(
        *(pl.lit(None, dtype=utc).alias(c) for c in ("not_before", "send_until", "reopens_at"))
    )


@pytest.mark.parametrize("resend_unknown", [False, True])
def test_the_preview_counts_unknown_rows_as_the_run_treats_them(resend_unknown: bool) -> None:
    # An unknown row (its answer was lost) is done unless the activation resends those, when
    # the run plans it again: then it is sent now or deferred like any planned row. Rows held
    # in flight by another run are in no count.
    from cdp_activation.activation.run import _preview_counts

    attributes = copy.deepcopy(winback_attributes())
    attributes.setdefault("delivery", {})["resend_unknown"] = resend_unknown
    spec = ActivationSpec.model_validate(attributes)
    now = datetime.now(UTC)
    later = now + timedelta(hours=5)
    keys = ["k-new", "k-planned", "k-unknown", "k-unknown-later", "k-sent", "k-in-flight"]
    chosen = pl.DataFrame(
        {"not_before": [None, None, None, later, None, None]},
        schema={"not_before": pl.Datetime("us", "UTC")},
    )
    an_hour_ago = now - timedelta(hours=1)
    held = held_rows(
        *(
            (k, state, "meta_whatsapp", None, an_hour_ago, False)
            for k, state in [
                ("k-planned", "planned"),
                ("k-unknown", "unknown"),
                ("k-unknown-later", "unknown"),
                ("k-sent", "sent"),
                ("k-in-flight", "in_flight"),
            ]
        )
    )
    summary = DeliverySummary(activation="winback_whatsapp", partition="p", dry_run=True)
    _preview_counts(summary, chosen, keys, held, now, spec, [])
    counts = (summary.to_send, summary.deferred, summary.already_sent)
    if resend_unknown:
        assert counts == (3, 1, 1) and summary.already_done_other == 0
    else:
        assert counts == (2, 0, 1) and summary.already_done_other == 2


def test_the_preview_counts_what_the_run_mends_before_it_plans() -> None:
    # A killed run's rows in flight come back planned through a provider that de-duplicates
    # on our key, else unknown; a dead letter an earlier version gave up on within the
    # deadline comes back planned, one of the deadline itself does not: counted as the run
    # sends them.
    from cdp_activation.activation.run import _preview_counts

    spec = ActivationSpec.model_validate(winback_attributes())
    now = datetime.now(UTC)
    hour, days = now - timedelta(hours=1), now - timedelta(days=3)
    held = held_rows(
        ("k-orphan-webhook", "in_flight", "webhook", None, hour, True),
        ("k-orphan-meta", "in_flight", "meta_whatsapp", None, hour, True),
        ("k-alive", "in_flight", "webhook", None, hour, False),
        ("k-given-up", "dead_letter", "meta_whatsapp", "http_503", hour, False),
        ("k-expired", "dead_letter", "meta_whatsapp", "send_deadline_passed", hour, False),
        ("k-old-given-up", "dead_letter", "meta_whatsapp", "http_503", days, False),
    )
    keys = held["idempotency_key"].to_list()
    chosen = pl.DataFrame(
        {"not_before": [None] * 6}, schema={"not_before": pl.Datetime("us", "UTC")}
    )
    summary = DeliverySummary(activation="winback_whatsapp", partition="p", dry_run=True)
    _preview_counts(summary, chosen, keys, held, now, spec, ["webhook"])
    # Sent: the orphan through the webhook, the dead letter given up on an hour ago. Done:
    # the orphan through Meta (unknown), the deadline's dead letter, the three-day-old one.
    assert (summary.to_send, summary.deferred, summary.already_done_other) == (2, 0, 3)


def test_threshold_parameter_is_bound_from_run_config(env: SimpleNamespace) -> None:
    default = run_activation("winback_whatsapp", TODAY.isoformat(), dry_run=True)
    strict = run_activation(
        "winback_whatsapp", TODAY.isoformat(), dry_run=True, parameters={"lapse_threshold": 0.95}
    )
    assert 0 < strict.audience < default.audience


def test_a_partition_reads_the_warehouse_as_of_that_day(warehouse: Path) -> None:
    spec = ActivationSpec.model_validate(winback_attributes())
    activation = Activation.from_spec("winback_whatsapp", spec)
    earlier = (TODAY - timedelta(days=20)).isoformat()
    params = {"lapse_threshold": 0.7}
    past = compute_audience(activation, Warehouse(f"duckdb:///{warehouse}"), earlier, params)
    now = compute_audience(
        activation, Warehouse(f"duckdb:///{warehouse}"), TODAY.isoformat(), params
    )
    both = past.join(now, on="customer_id", suffix="_now")
    assert both.height > 0
    # Same customers seen 20 days earlier: their last order was 20 days fresher then (today's
    # as_of is "now", a past partition's is the end of its day, hence 19 or 20 whole days).
    shift = both["days_since_last_order_now"] - both["days_since_last_order"]
    assert set(shift.unique().to_list()) <= {19, 20}


def test_an_unapproved_template_fails_the_blocking_check_and_sends_nothing(
    env: SimpleNamespace,
) -> None:
    attributes = copy.deepcopy(winback_attributes())
    attributes["channel_plan"]["steps"][0]["template"]["name"] = "spring_sale"  # PENDING
    definitions = custom_definitions(env.tmp, "pending_promo", attributes)
    summary = run_activation("pending_promo", TODAY.isoformat(), definitions=definitions)
    assert not summary.success
    assert "template_approved" in summary.failed_checks
    assert "PENDING" in summary.failed_checks["template_approved"]
    assert_nothing_sent(env, summary, "pending_promo")


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("winbak_offer", "template 'winbak_offer' (en) is not in the provider's catalog"),
        ("spring_sale", "template 'spring_sale' (en) is PENDING, not APPROVED"),
        ("order_update", "template 'order_update' is category UTILITY in the catalog"),
    ],
    ids=["typo", "pending", "utility-for-marketing"],
)
def test_a_run_template_that_template_approved_would_refuse_fails_and_sends_nothing(
    env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, template: str, problem: str
) -> None:
    # `--template` / the Launchpad's `template` pass the same rules as defs.yaml's template.
    # Before, the policy excluded everyone from WhatsApp (template_not_approved) and the run
    # quietly sent them SMS instead. A real send, no preview needed: only the check stops it.
    monkeypatch.setenv("CDP_CONFIRM_ABOVE", "1000000")
    summary = run_activation(
        "winback_whatsapp", TODAY.isoformat(), dry_run=False, template=template
    )
    assert not summary.success
    error = summary.error or ""
    assert error.startswith("winback_whatsapp__decisions: ")
    assert "\n" not in error  # one line
    assert f"Not sent: run template {template!r} refused: {problem}" in error
    # What to do: the usable templates, or defs.yaml's.
    assert "Choose an APPROVED marketing template of meta_whatsapp in en taking 3" in error
    assert "(winback_offer)" in error and "unset to send 'winback_offer' from defs.yaml" in error
    assert summary.eligible == {}  # nothing was even decided
    assert_nothing_sent(env, summary, "winback_whatsapp")


def test_an_approved_run_template_is_what_template_approved_checks_and_it_sends(
    env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    # defs.yaml names a PENDING template; the run chooses an APPROVED one: the blocking check
    # evaluates the run's template, so the run goes ahead and sends that one.
    monkeypatch.setenv("CDP_CONFIRM_ABOVE", "1000000")
    attributes = copy.deepcopy(winback_attributes())
    attributes["channel_plan"]["steps"][0]["template"]["name"] = "spring_sale"  # PENDING
    definitions = custom_definitions(env.tmp, "spring_promo", attributes)
    summary = run_activation(
        "spring_promo",
        TODAY.isoformat(),
        dry_run=False,
        template="winback_offer",
        definitions=definitions,
    )
    assert summary.success, (summary.error, summary.failed_checks)
    assert summary.failed_checks == {}
    assert summary.eligible["whatsapp"] > 0 and summary.sent > 0
    whatsapp = {m.template_name for m in env.sandbox.messages() if m.channel == "whatsapp"}
    assert whatsapp == {"winback_offer"}


def test_a_fifth_of_bad_numbers_warns_from_the_decisions_counts(env: SimpleNamespace) -> None:
    """`invalid_phone_share` warns past 10% of the audience with a missing or invalid number
    (counted from what the decisions step recorded, not by loading its output again), and a
    warning does not stop the run."""
    normal = run_activation("winback_whatsapp", TODAY.isoformat(), dry_run=True)
    assert normal.success and "invalid_phone_share" not in normal.failed_checks
    sql = (ROOT / "sql/audiences/winback_whatsapp.sql").read_text()
    broken = "    CASE WHEN c.customer_id % 4 = 0 THEN 'call me' ELSE c.phone END AS phone,\n"
    assert "    c.phone,\n" in sql
    sql = sql.replace("    c.phone,\n", broken)
    definitions = custom_definitions(env.tmp, "bad_numbers", winback_attributes(), sql)
    summary = run_activation(
        "bad_numbers", TODAY.isoformat(), dry_run=True, definitions=definitions
    )
    assert summary.success, summary.error  # a warning, not a stop
    invalid = summary.excluded.get("invalid_phone", 0) + summary.excluded.get("missing_phone", 0)
    expected = invalid / summary.audience
    assert 0.2 < expected < 0.4
    assert summary.failed_checks["invalid_phone_share"] == (
        f"{expected:.1%} of the audience has a missing or invalid number"
    )


def test_a_run_in_the_cli_keeps_no_step_output_in_memory_once_it_is_over(
    env: SimpleNamespace,
) -> None:
    """The audience and the decisions are stored by the IO manager between steps; once the
    run is over nothing in this process still holds them (Dagster's `execute_in_process`
    kept every output to the end, and the first `TableSchema` kept the audience): at 10M
    customers that was 10.7 GB instead of 6.3 (bench/results_e2e.md)."""
    import gc

    summary = run_activation("winback_whatsapp", TODAY.isoformat(), dry_run=True)
    assert summary.success and summary.audience > 100
    gc.collect()
    alive = [
        o for o in gc.get_objects() if isinstance(o, pl.DataFrame) and o.height == summary.audience
    ]
    assert alive == []


def test_a_query_the_warehouse_refuses_is_a_clear_error_and_sends_nothing(
    env: SimpleNamespace,
) -> None:
    sql = (ROOT / "sql/audiences/winback_whatsapp.sql").read_text()
    sql = sql.replace("s.lapse_risk,", "s.lapse_risk_score,")
    definitions = custom_definitions(env.tmp, "typo_audience", winback_attributes(), sql)
    summary = run_activation("typo_audience", TODAY.isoformat(), definitions=definitions)
    assert not summary.success
    assert "typo_audience.sql" in summary.error
    assert "lapse_risk_score" in summary.error
    assert_nothing_sent(env, summary, "typo_audience")


def test_decisions_that_break_consent_or_suppression_are_caught_and_nothing_is_sent(
    env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """consented_recipients_only re-checks the policy engine's output on its own: a policy bug
    that chose customers without consent, on the suppression list, or with an exclusion
    reason fails the blocking check, and nothing is planned or sent."""
    from cdp_activation.activation import run as activation_run
    from cdp_activation.policy.engine import Decisions

    honest = activation_run.compute_decisions

    def broken(*args: Any, **kwargs: Any) -> Decisions:
        result = honest(*args, **kwargs)
        frame = result.frame
        reason = pl.col("reason").cast(pl.String)
        no_consent = reason == "whatsapp_no_consent+sms_no_consent"
        suppressed = reason == "suppressed"
        chosen = no_consent | suppressed
        frame = frame.with_columns(
            decision=pl.when(chosen | (reason == "invalid_phone"))
            .then(pl.lit("send"))
            .otherwise(pl.col("decision"))
            .cast(frame.schema["decision"]),
            channel=pl.when(chosen)
            .then(pl.lit("whatsapp"))
            .otherwise(pl.col("channel"))
            .cast(frame.schema["channel"]),
            reason=pl.when(chosen).then(None).otherwise(pl.col("reason")),
        )
        return Decisions(frame=frame, template_problems=result.template_problems)

    monkeypatch.setattr(activation_run, "compute_decisions", broken)
    summary = run_activation("winback_whatsapp", TODAY.isoformat())
    assert not summary.success
    problem = summary.failed_checks["consented_recipients_only"]
    assert "chosen without consent for the channel" in problem
    assert "chosen while on the suppression list" in problem
    assert "chosen with an exclusion reason" in problem
    assert_nothing_sent(env, summary, "winback_whatsapp")


def test_an_audience_missing_a_contract_column_sends_nothing(env: SimpleNamespace) -> None:
    sql = (ROOT / "sql/audiences/winback_whatsapp.sql").read_text()
    sql = sql.replace("    co.sms_marketing_consent,\n", "")
    definitions = custom_definitions(env.tmp, "no_sms_consent", winback_attributes(), sql)
    summary = run_activation("no_sms_consent", TODAY.isoformat(), definitions=definitions)
    assert not summary.success
    problem = summary.failed_checks["audience_contract"]
    assert "lacks column(s) sms_marketing_consent" in problem
    assert summary.eligible == {}  # decisions never ran
    assert_nothing_sent(env, summary, "no_sms_consent")


@pytest.mark.parametrize(
    ("replace", "by", "expected"),
    [
        (
            "    co.whatsapp_marketing_consent,",
            "    CASE WHEN co.whatsapp_marketing_consent THEN 'Y' ELSE 'N' END"
            " AS whatsapp_marketing_consent,",
            "column whatsapp_marketing_consent must be boolean",
        ),
        (
            "FROM customers AS c",
            "FROM (SELECT * FROM customers UNION ALL SELECT * FROM customers WHERE "
            "customer_id < 40) AS c",
            "customer_id must be unique",
        ),
        (
            "    c.customer_id,",
            "    CASE WHEN c.customer_id % 2 = 0 THEN c.customer_id END AS customer_id,",
            "have a null customer_id",
        ),
    ],
)
def test_a_mistyped_or_duplicated_audience_fails_the_contract_and_sends_nothing(
    env: SimpleNamespace, replace: str, by: str, expected: str
) -> None:
    sql = (ROOT / "sql/audiences/winback_whatsapp.sql").read_text()
    assert replace in sql
    definitions = custom_definitions(
        env.tmp, "broken_contract", winback_attributes(), sql.replace(replace, by, 1)
    )
    summary = run_activation("broken_contract", TODAY.isoformat(), definitions=definitions)
    assert not summary.success
    assert expected in summary.failed_checks["audience_contract"]
    assert_nothing_sent(env, summary, "broken_contract")


def test_sql_that_is_not_one_select_is_refused_before_anything_runs(
    env: SimpleNamespace,
) -> None:
    with pytest.raises(AudienceSQLError, match=r"bad_sql\.sql:3:\d+: SQL does not parse"):
        custom_definitions(
            env.tmp, "bad_sql", winback_attributes(), "-- broken\n\nSELECT FROM WHERE"
        )
    with pytest.raises(AudienceSQLError, match="DELETE statement is not allowed"):
        custom_definitions(env.tmp, "dml", winback_attributes(), "DELETE FROM customers")
    with pytest.raises(AudienceSQLError, match="2 statements"):
        custom_definitions(env.tmp, "two", winback_attributes(), "SELECT 1; SELECT 2")
    assert env.sandbox.messages() == []


def test_a_mistyped_parameter_is_refused_before_anything_runs(env: SimpleNamespace) -> None:
    with pytest.raises(dg.DagsterInvalidConfigError, match="lapse_threshold"):
        run_activation(
            "winback_whatsapp", TODAY.isoformat(), parameters={"lapse_threshold": "high"}
        )
    assert env.sandbox.messages() == []


def test_unknown_partition_and_activation_are_clear_errors(env: SimpleNamespace) -> None:
    from cdp_activation.cli.runner import ActivationNotFound

    with pytest.raises(ActivationNotFound, match="winback_whatsapp"):
        run_activation("winback_whatsap", TODAY.isoformat())
    with pytest.raises(dg.DagsterUnknownPartitionError):
        run_activation("winback_whatsapp", (date(2020, 1, 1)).isoformat())


def test_a_second_activation_with_another_plan_runs_side_by_side(env: SimpleNamespace) -> None:
    winback = run_activation("winback_whatsapp", TODAY.isoformat())
    shipped = run_activation("order_shipped_update", TODAY.isoformat())
    assert winback.success and shipped.success, (winback.error, shipped.error)
    assert shipped.sent > 0
    received = env.sandbox.messages()
    templates = {m.template_name for m in received if m.channel == "whatsapp"}
    assert templates == {"winback_offer", "order_update"}
    # Each activation has its own keys: a customer in both audiences gets both messages.
    rows = pl.concat(
        [ledger_rows(env, "winback_whatsapp"), ledger_rows(env, "order_shipped_update")]
    )
    assert rows["idempotency_key"].n_unique() == rows.height
    assert len(received) == winback.sent + shipped.sent


def test_a_sudden_change_in_audience_size_blocks_the_send(env: SimpleNamespace) -> None:
    baseline = run_activation("winback_whatsapp", TODAY.isoformat(), dry_run=True)
    assert baseline.success and baseline.audience > 500
    tiny = run_activation(
        "winback_whatsapp", TODAY.isoformat(), parameters={"lapse_threshold": 0.995}
    )
    assert not tiny.success
    assert "last successful run" in tiny.failed_checks["audience_size_stable"]
    assert env.sandbox.messages() == []
    allowed = run_activation(
        "winback_whatsapp",
        TODAY.isoformat(),
        dry_run=True,
        parameters={"lapse_threshold": 0.995},
        tags={"cdp/allow_audience_change": "true"},
    )
    assert allowed.success, allowed.failed_checks


def test_quiet_hours_defer_and_a_later_run_sends_once_due(env: SimpleNamespace) -> None:
    attributes = copy.deepcopy(winback_attributes())
    # Quiet all day long everywhere: everyone routed is deferred, nobody is dropped.
    attributes["policy"] = {"quiet_hours": {"start": "00:00", "end": "23:59"}}
    night = custom_definitions(env.tmp, "night_owls", attributes)
    first = run_activation("night_owls", TODAY.isoformat(), definitions=night)
    assert first.success, first.error
    assert first.sent == 0 and env.sandbox.messages() == []
    assert first.deferred == sum(first.eligible.values()) > 0
    ledger = Ledger(env.ledger_url)
    assert ledger.counts("night_owls", TODAY.isoformat()) == {"planned": first.deferred}
    assert ledger.due_partitions("night_owls") == {}

    # The sensor asks for the partition once its deferred sends are due.

    sensor = night.resolve_sensor_def("night_owls_deferred_sends")
    with dg.build_sensor_context(
        instance=dg.DagsterInstance.get(), resources={"ledger": night.resources["ledger"]}
    ) as context:
        assert isinstance(sensor(context), dg.SkipReason)
    rows = ledger.rows("night_owls")
    with ledger.engine.begin() as con:  # time passes: make every deferral due now
        from cdp_activation.ledger import sends

        con.execute(sends.update().values(not_before=datetime.now(UTC) - timedelta(minutes=1)))
    with dg.build_sensor_context(
        instance=dg.DagsterInstance.get(), resources={"ledger": night.resources["ledger"]}
    ) as context:
        requests = sensor(context)
    assert [r.partition_key for r in requests] == [TODAY.isoformat()]

    # The run it launches re-applies the policy (now outside quiet hours) and sends them.
    attributes["policy"] = {"quiet_hours": {"enabled": False}}
    day = custom_definitions(env.tmp, "night_owls", attributes)
    second = run_activation("night_owls", TODAY.isoformat(), definitions=day)
    assert second.success, second.error
    assert second.sent + second.failed == rows.height
    assert len(env.sandbox.messages()) == second.sent
    third = run_activation("night_owls", TODAY.isoformat(), definitions=day)
    assert third.sent == 0 and third.already_sent == second.sent
    ledger.dispose()


def test_a_run_s_send_window_holds_for_its_fallback_too(env: SimpleNamespace) -> None:
    """`--send-window` (the Launchpad's send window) holds for the fallback as for the first
    send: with quiet hours all day, a first send given the whole day has its SMS fallback (due
    after a WhatsApp message that did not land) go now too, as the fallback sensor would launch
    it, with no window of its own, even after a preview with another window; a fallback given
    defs.yaml's window waits for the morning."""
    from cdp_activation.cli.runner import run_fallback

    attributes = copy.deepcopy(winback_attributes())
    attributes["policy"] = {"quiet_hours": {"start": "00:00", "end": "23:59"}}
    night = custom_definitions(env.tmp, "night_fallback", attributes)
    partition = TODAY.isoformat()
    first = run_activation(
        "night_fallback", partition, definitions=night, send_window=("00:00", "23:59")
    )
    assert first.success, first.error
    assert first.sent > 0 and first.deferred == 0
    # No delivery report comes back here: with a window of 0 minutes every first message
    # is due its fallback now.
    asleep = run_fallback(
        "night_fallback",
        partition,
        dry_run=True,
        not_delivered_within_minutes=0,
        send_window=("23:59", "00:00"),  # defs.yaml's: the complement of its quiet hours
        definitions=night,
    )
    assert asleep.success, asleep.error
    assert asleep.eligible > 0 and asleep.deferred == asleep.eligible
    # A preview since, with defs.yaml's window, sends nothing and does not change it.
    preview = run_activation("night_fallback", partition, definitions=night, dry_run=True)
    assert preview.success and preview.sent == 0
    texts = sum(m.provider == "twilio" for m in env.sandbox.messages())
    awake = run_fallback(
        "night_fallback", partition, not_delivered_within_minutes=0, definitions=night
    )
    assert awake.success, awake.error
    assert awake.deferred == 0 and awake.sent + awake.failed == asleep.eligible
    assert sum(m.provider == "twilio" for m in env.sandbox.messages()) == texts + awake.sent


def test_a_fallback_keeps_the_quiet_hours_of_a_first_send_given_no_window(
    env: SimpleNamespace,
) -> None:
    """Without a window of its own or of its first send, a fallback keeps defs.yaml's quiet
    hours: nothing sent in the night."""
    from cdp_activation.cli.runner import run_fallback

    attributes = copy.deepcopy(winback_attributes())
    attributes["policy"] = {"quiet_hours": {"start": "00:00", "end": "23:59"}}
    night = custom_definitions(env.tmp, "night_default", attributes)
    partition = TODAY.isoformat()
    first = run_activation("night_default", partition, definitions=night)
    assert first.success, first.error
    assert first.sent == 0 and first.deferred > 0
    # Their first messages go out, as the deferred-sends sensor's run in the morning would
    # send them, with defs.yaml's window recorded again.
    whole_day = ("00:00", "23:59")
    morning = run_activation("night_default", partition, definitions=night, send_window=whole_day)
    assert morning.sent > 0
    again = run_activation("night_default", partition, definitions=night)
    assert again.success and again.sent == 0
    held = run_fallback(
        "night_default", partition, not_delivered_within_minutes=0, definitions=night
    )
    assert held.success, held.error
    assert held.eligible > 0 and held.deferred == held.eligible and held.sent == 0


def _first_run_without_quiet_hours(
    env: SimpleNamespace, name: str
) -> tuple[Any, str, Ledger, pl.DataFrame]:
    """The winback activation as `name`, quiet hours off, run once for today: its definitions,
    partition, ledger and the WhatsApp first messages it sent."""
    attributes = copy.deepcopy(winback_attributes())
    attributes["policy"] = {"quiet_hours": {"enabled": False}}
    definitions = custom_definitions(env.tmp, name, attributes)
    partition = TODAY.isoformat()
    first = run_activation(name, partition, definitions=definitions)
    assert first.success and first.sent > 2, first.error
    ledger = Ledger(env.ledger_url)
    whatsapp = ledger.rows(name, partition).filter(
        (pl.col("channel") == "whatsapp") & (pl.col("state") == "sent")
    )
    return definitions, partition, ledger, whatsapp


def test_a_report_left_unapplied_by_a_run_that_never_finished_is_applied_before_the_fallback(
    env: SimpleNamespace,
) -> None:
    """A `delivered` report came before its send's answer was recorded, and the run that
    would have applied it never finished (its claim step was killed): the fallback applies
    it before deciding, so that customer gets no SMS."""
    from cdp_activation.cli.runner import run_fallback
    from cdp_activation.ledger.schema import status_events

    definitions, partition, ledger, whatsapp = _first_run_without_quiet_hours(env, "early_report")
    landed = whatsapp.row(0, named=True)
    now = datetime.now(UTC)
    with ledger.engine.begin() as con:
        con.execute(
            sa.insert(status_events).values(
                event_key="early|delivered",
                provider="meta",
                provider_message_id=landed["provider_message_id"],
                status="delivered",
                occurred_at=now,
                received_at=now,
                applied=False,
            )
        )
    fallback = run_fallback(
        "early_report", partition, not_delivered_within_minutes=0, definitions=definitions
    )
    assert fallback.success, fallback.error
    rows = ledger.rows("early_report", partition)
    fallbacks = rows.filter(pl.col("step") == "fallback")
    assert fallbacks.height > 0  # the others were due one
    assert landed["id"] not in set(fallbacks["fallback_of"].to_list())
    first_row = rows.filter(pl.col("id") == landed["id"]).row(0, named=True)
    assert first_row["delivery_status"] == "delivered"
    ledger.dispose()


def test_a_customer_whose_whatsapp_window_closed_before_the_send_gets_the_sms_fallback_now(
    env: SimpleNamespace,
) -> None:
    """A free-form WhatsApp message its customer's 24-hour window outran is cancelled at its
    claim (`whatsapp_outside_window`) and never sent: the fallback run sends that customer the
    plan's SMS at once, long before the not-delivered window would make anyone else due."""
    from cdp_activation.cli.runner import run_fallback

    definitions, partition, ledger, whatsapp = _first_run_without_quiet_hours(
        env, "window_fallback"
    )
    outran = whatsapp.head(2)["id"].to_list()
    with ledger.engine.begin() as con:  # as the claim leaves a message its window outran
        con.execute(
            sends.update()
            .where(sends.c.id.in_(outran))
            .values(state="cancelled", error_code="whatsapp_outside_window", sent_at=None)
        )
    texts = sum(m.provider == "twilio" for m in env.sandbox.messages())
    fallback = run_fallback(
        "window_fallback", partition, not_delivered_within_minutes=600, definitions=definitions
    )
    assert fallback.success, fallback.error
    # (Customers the sandbox says are not on WhatsApp are due too: `primary_unreachable`.)
    assert fallback.due["primary_window_closed"] == 2
    rows = ledger.rows("window_fallback", partition).filter(
        pl.col("fallback_reason") == "primary_window_closed"
    )
    assert sorted(rows["fallback_of"].to_list()) == sorted(outran)
    assert set(rows["channel"]) == {"sms"} and set(rows["state"]) <= {"sent", "excluded"}
    texted = set(rows.filter(pl.col("state") == "sent")["recipient"].to_list())
    assert texted  # the demo's customers mostly accept SMS
    new_texts = [m.to for m in env.sandbox.messages() if m.provider == "twilio"][texts:]
    assert texted <= set(new_texts)
    assert fallback.sent == len(new_texts)
    ledger.dispose()


def test_unknown_sends_go_again_only_for_an_activation_that_opts_in(
    env: SimpleNamespace,
) -> None:
    attributes = copy.deepcopy(winback_attributes())
    attributes["policy"] = {"quiet_hours": {"start": "00:00", "end": "23:59"}}
    night = custom_definitions(env.tmp, "lost_answers", attributes)
    first = run_activation("lost_answers", TODAY.isoformat(), definitions=night)
    assert first.success and first.deferred > 0
    # A run was killed with every row in flight: the provider may have them all.
    ledger = Ledger(env.ledger_url)
    pending = ledger.pending("lost_answers", TODAY.isoformat(), datetime.max.replace(tzinfo=UTC))
    ledger.mark_in_flight([r.id for r in pending])
    ledger.recover_interrupted("lost_answers", TODAY.isoformat())
    assert ledger.counts("lost_answers", TODAY.isoformat()) == {"unknown": first.deferred}

    attributes["policy"] = {"quiet_hours": {"enabled": False}}
    by_default = custom_definitions(env.tmp, "lost_answers", attributes)
    again = run_activation("lost_answers", TODAY.isoformat(), definitions=by_default)
    assert again.success and again.sent == 0 and again.resent_unknown == 0
    assert env.sandbox.messages() == []

    attributes["delivery"] = {"resend_unknown": True}
    opted_in = custom_definitions(env.tmp, "lost_answers", attributes)
    resent = run_activation("lost_answers", TODAY.isoformat(), definitions=opted_in)
    assert resent.success, resent.error
    assert resent.resent_unknown == first.deferred
    assert (
        resent.sent + resent.failed == first.deferred == len(env.sandbox.messages()) + resent.failed
    )
    ledger.dispose()


def test_a_holdout_is_recorded_in_the_ledger_and_never_messaged(env: SimpleNamespace) -> None:
    attributes = copy.deepcopy(winback_attributes())
    attributes["policy"] = {"quiet_hours": {"enabled": False}, "holdout": {"share": 0.25}}
    definitions = custom_definitions(env.tmp, "with_holdout", attributes)
    summary = run_activation("with_holdout", TODAY.isoformat(), definitions=definitions)
    assert summary.success, summary.error
    rows = ledger_rows(env, "with_holdout")
    held = rows.filter(pl.col("state") == "holdout")
    assert held.height == summary.holdout > 0
    received = {m.to for m in env.sandbox.messages()}
    assert not received & set(held["recipient"].to_list())


@pytest.mark.parametrize(
    ("connector", "winback_row"),
    [
        ("meta_whatsapp", "| `winback_offer` | en | MARKETING | APPROVED | 3 |"),
        (
            "twilio",
            f"| `{twilio_content_sid('winback_offer', 'en')}` (winback_offer) | en | MARKETING "
            "| APPROVED | 3 |",
        ),
    ],
)
def test_the_template_catalog_asset_syncs_from_the_provider(
    env: SimpleNamespace, connector: str, winback_row: str
) -> None:
    from cdp_activation.defs.templates import catalog_asset

    asset = catalog_asset(connector)
    result = dg.materialize(
        [asset],
        resources={
            connector: resources().resources[connector],
            "ledger": resources().resources["ledger"],
        },
        instance=dg.DagsterInstance.get(),
    )
    assert result.success
    (event,) = [
        e.event_specific_data.materialization
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(["templates", connector])
    ]
    metadata = {k: v.value for k, v in event.metadata.items()}
    assert metadata["templates_approved"] >= 5
    assert metadata["templates_pending"] == 1
    assert winback_row in metadata["catalog"]


def test_an_audience_can_leave_out_recently_messaged_customers_in_the_warehouse(
    env: SimpleNamespace,
) -> None:
    first = run_activation("winback_whatsapp", TODAY.isoformat())
    assert first.success and first.sent > 0
    sql = (ROOT / "sql/audiences/winback_whatsapp.sql").read_text()
    sql = sql.replace(
        "WHERE s.lapse_risk > :lapse_threshold",
        "LEFT JOIN (SELECT customer_id, sum(sends_7d) AS sends_7d FROM ledger_recent_sends "
        "WHERE purpose = 'marketing' GROUP BY customer_id) AS r\n"
        "    ON r.customer_id = CAST(c.customer_id AS VARCHAR)\n"
        "WHERE coalesce(r.sends_7d, 0) = 0 AND s.lapse_risk > :lapse_threshold",
    )
    definitions = custom_definitions(env.tmp, "fresh_faces", winback_attributes(), sql)
    fresh = run_activation("fresh_faces", TODAY.isoformat(), definitions=definitions, dry_run=True)
    assert fresh.success, fresh.error
    # Everyone winback_whatsapp just messaged is gone from the audience, in the warehouse.
    assert fresh.audience == first.audience - first.sent
    # The caps leave out only the customers winback_whatsapp has on their way (deferred by
    # quiet hours): the audience SQL left out those it messaged.
    assert fresh.excluded.get("frequency_capped", 0) == first.deferred


def test_whatsapp_that_does_not_land_falls_back_to_sms_once_and_a_late_delivery_sends_nothing(
    env: SimpleNamespace, time_machine: TimeMachineFixture
) -> None:
    """The sandbox delivers 70% of WhatsApp messages, fails 10% with 131026 and leaves 20%
    undelivered, reporting back through signed webhooks (some twice, some out of order).
    After the plan's 30 minutes exactly the undelivered 30% are due; those with SMS consent
    get one SMS, linked to their WhatsApp message; a `delivered` that arrives after the
    fallback is recorded and sends nothing."""
    from cdp_activation.cli.runner import run_fallback
    from cdp_activation.feedback.receiver import WebhookServer
    from cdp_activation.sandbox.status_webhooks import outcome
    from conftest import settings_for_sandbox
    from test_webhooks import meta_status, post, signed

    partition = TODAY.isoformat()
    sandbox = env.sandbox
    secrets = settings_for_sandbox(sandbox).webhook_secrets()
    ledger = Ledger(env.ledger_url)
    with WebhookServer(Ledger(env.ledger_url), secrets) as receiver:
        sandbox.configure(
            status_webhooks_url=receiver.url,
            status_delivered_rate=0.7,
            status_failed_rate=0.1,
            status_read_rate=0.5,
            status_delay_ms=2,
            status_duplicate_rate=0.1,
            status_reorder_rate=0.1,
        )
        first = run_activation("winback_whatsapp", partition)
        assert first.success, first.error
        whatsapp = {
            m.provider_message_id: m for m in sandbox.messages() if m.provider == "meta_whatsapp"
        }
        last = {pid: outcome(sandbox.config, m)[-1] for pid, m in whatsapp.items()}
        deadline = datetime.now(UTC) + timedelta(seconds=30)
        while datetime.now(UTC) < deadline:  # the reports arrive
            ledger.apply_pending_statuses()
            rows = ledger.rows("winback_whatsapp", partition)
            got = dict(zip(rows["provider_message_id"], rows["delivery_status"], strict=True))
            if all(got.get(pid) == status for pid, status in last.items()):
                break
        rows = ledger.rows("winback_whatsapp", partition)
        initial = rows.filter((pl.col("step") == "initial") & (pl.col("channel") == "whatsapp"))
        accepted_or_refused = initial.filter(pl.col("state").is_in(["sent", "failed"]))
        landed = accepted_or_refused.filter(pl.col("delivery_status").is_in(["delivered", "read"]))
        expected_due = set(accepted_or_refused["id"]) - set(landed["id"])
        share = len(expected_due) / accepted_or_refused.height
        assert 0.22 < share < 0.38, share  # 20% undelivered + 10% failed (+ refused at send)

        too_early = run_fallback("winback_whatsapp", partition)
        assert too_early.success, too_early.error
        # Within the window only the unreachable (131026) fall back.
        assert set(too_early.due) == {"primary_unreachable"}
        assert too_early.due_codes == {"131026": too_early.due["primary_unreachable"]}

        time_machine.move_to(RUN_AT + timedelta(minutes=31), tick=True)
        # The sensor asks for the partition's fallback once the window has passed.
        assert [r.partition_key for r in fallback_sensor_requests(env)] == [partition]
        texts_before = sum(m.provider == "twilio" for m in sandbox.messages())
        decided = ledger.rows("winback_whatsapp", partition).filter(
            (pl.col("step") == "fallback") & (pl.col("state") != "planned")
        )
        assert decided.height == too_early.sent + too_early.failed + sum(
            too_early.excluded.values()
        )
        preview = run_fallback("winback_whatsapp", partition, dry_run=True)
        assert preview.success and preview.sent == 0 and preview.eligible > 0
        assert sum(preview.due.values()) == len(expected_due) - decided.height
        assert sum(m.provider == "twilio" for m in sandbox.messages()) == texts_before
        after_preview = ledger.rows("winback_whatsapp", partition)
        assert after_preview.filter(pl.col("step") == "fallback").height == (
            too_early.sent
            + too_early.failed
            + sum(too_early.excluded.values())
            + too_early.deferred
        )
        result = run_fallback("winback_whatsapp", partition)
        assert result.success, result.error
        assert result.due.get("primary_not_delivered", 0) > 0
        first_messages = result.first_messages
        assert first_messages.get("delivered", 0) + first_messages.get("read", 0) == landed.height

        rows = ledger.rows("winback_whatsapp", partition)
        fallbacks = rows.filter(pl.col("step") == "fallback")
        assert set(fallbacks["fallback_of"]) == expected_due  # exactly the undelivered
        assert fallbacks["customer_id"].is_unique().all()
        # Subject to SMS consent, re-checked against the audience as it is now.
        activation = Activation.from_spec(
            "winback_whatsapp", ActivationSpec.model_validate(winback_attributes())
        )
        audience = compute_audience(
            activation,
            Warehouse(os.environ["CDP_WAREHOUSE_URL"]),
            partition,
            {"lapse_threshold": 0.7},
        ).select(pl.col("customer_id").cast(pl.String), "sms_marketing_consent")
        checked = fallbacks.join(audience, on="customer_id", how="left")
        chosen = checked.filter(pl.col("state").is_in(["sent", "failed", "planned"]))
        refused = checked.filter(pl.col("state") == "excluded")
        assert chosen.height > 0 and refused.height > 0
        assert chosen["sms_marketing_consent"].all()
        assert set(refused["error_code"]) <= {"sms_no_consent", "sms_suppressed", "sms_not_mobile"}
        no_consent = refused.filter(pl.col("error_code") == "sms_no_consent")
        assert not no_consent["sms_marketing_consent"].fill_null(False).any()
        texts = [m for m in sandbox.messages() if m.provider == "twilio"]
        assert len(texts) - texts_before == result.sent
        assert fallbacks.filter(pl.col("state") == "sent").height == too_early.sent + result.sent
        sent_to = {m.to for m in texts}
        for row in fallbacks.filter(pl.col("state") == "sent").iter_rows(named=True):
            assert row["recipient"] in sent_to

        # A late `delivered` for a WhatsApp message that fell back: recorded, nothing sent.
        silent = rows.filter(
            (pl.col("state") == "sent") & (pl.col("delivery_status").fill_null("sent") == "sent")
        )["id"]
        fell_back = fallbacks.filter(
            (pl.col("state") == "sent") & pl.col("fallback_of").is_in(silent.implode())
        )["fallback_of"][0]
        pid = rows.filter(pl.col("id") == fell_back)["provider_message_id"][0]
        body = meta_status(pid, "delivered", int(datetime.now(UTC).timestamp()))
        assert (
            post(f"{receiver.url}/webhooks/meta", signed("meta", secrets, body)).status_code == 200
        )
        again = run_fallback("winback_whatsapp", partition)
        assert again.success and again.due == {} and again.sent == 0
        after = ledger.rows("winback_whatsapp", partition)
        assert after.filter(pl.col("id") == fell_back)["delivery_status"][0] == "delivered"
        assert after.filter(pl.col("step") == "fallback").sort("id")["state"].to_list() == (
            fallbacks.sort("id")["state"].to_list()
        )
        assert sum(m.provider == "twilio" for m in sandbox.messages()) == len(texts)
        assert isinstance(fallback_sensor_requests(env), dg.SkipReason)

        # A fallback run killed while its requests were in the air leaves rows in flight:
        # the next run makes them `unknown` (Twilio has no idempotency key) and resends none.
        from cdp_activation.ledger import sends

        in_air = fallbacks.filter(pl.col("state") == "sent")["id"].head(5).to_list()
        with ledger.engine.begin() as con:
            con.execute(sends.update().where(sends.c.id.in_(in_air)).values(state="in_flight"))
        recovered = run_fallback("winback_whatsapp", partition)
        assert recovered.success and recovered.sent == 0
        states = ledger.rows("winback_whatsapp", partition).filter(pl.col("id").is_in(in_air))
        assert set(states["state"]) == {"unknown"}
        assert sum(m.provider == "twilio" for m in sandbox.messages()) == len(texts)
    ledger.dispose()


def fallback_sensor_requests(env: SimpleNamespace) -> Any:
    from cdp_activation.cli.runner import load_definitions
    from cdp_activation.components.resources import LedgerResource

    sensor = load_definitions().resolve_sensor_def("winback_whatsapp_fallback")
    with dg.build_sensor_context(
        instance=dg.DagsterInstance.get(), resources={"ledger": LedgerResource(url=env.ledger_url)}
    ) as context:
        return sensor(context)


def test_a_large_send_needs_a_recent_matching_preview_plan_then_apply(
    env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    partition = TODAY.isoformat()
    monkeypatch.setenv("CDP_CONFIRM_ABOVE", "100")
    blind = run_activation("winback_whatsapp", partition)
    assert not blind.success
    assert "Not sent: this send would message" in (blind.error or "")
    assert "has no preview of" in (blind.error or "")
    assert_nothing_sent(env, blind, "winback_whatsapp")

    preview = run_activation("winback_whatsapp", partition, dry_run=True)
    assert preview.success and sum(preview.eligible.values()) > 100
    # The audience moved a lot since the preview (a stricter threshold): previewed again first.
    moved = run_activation("winback_whatsapp", partition, parameters={"lapse_threshold": 0.9})
    assert not moved.success and "more than 10%" in (moved.error or "")
    assert_nothing_sent(env, moved, "winback_whatsapp")

    monkeypatch.setenv("CDP_PREVIEW_VALID_HOURS", "0.0001")  # the preview is now too old
    stale = run_activation("winback_whatsapp", partition)
    assert not stale.success and "older than" in (stale.error or "")
    monkeypatch.delenv("CDP_PREVIEW_VALID_HOURS")

    sent = run_activation("winback_whatsapp", partition)
    assert sent.success, sent.error
    assert sent.sent > 100 and len(env.sandbox.messages()) == sent.sent


def test_scheduled_runs_send_without_a_preview_and_the_launchpad_default_is_a_dry_run(
    env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cdp_activation.cli.runner import load_definitions

    partition = TODAY.isoformat()
    monkeypatch.setenv("CDP_CONFIRM_ABOVE", "100")
    definitions = load_definitions()
    # The Launchpad with nothing changed: every default, dry_run included.
    launchpad = definitions.resolve_job_def("winback_whatsapp_job").execute_in_process(
        instance=dg.DagsterInstance.get(), partition_key=partition
    )
    assert launchpad.success
    assert env.sandbox.messages() == [] and ledger_rows(env).is_empty()
    # What the schedule asks for: a real send, not asked for a preview.
    schedule = definitions.resolve_schedule_def("winback_whatsapp_schedule")
    request = schedule.evaluate_tick(
        dg.build_schedule_context(
            instance=dg.DagsterInstance.get(),
            scheduled_execution_time=RUN_AT,
            repository_def=definitions.get_repository_def(),
        )
    ).run_requests[0]
    assert request.run_config == {
        "ops": {"winback_whatsapp__deliveries": {"config": {"dry_run": False}}}
    }
    scheduled = run_activation(
        "winback_whatsapp", partition, tags={"dagster/schedule_name": schedule.name}
    )
    assert scheduled.success, scheduled.error
    assert scheduled.sent > 100


def test_the_preview_prices_every_message_and_the_marketer_s_choices_apply(
    env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    prices = env.tmp / "prices.yaml"
    prices.write_text(
        "currency: EUR\nchannels: {whatsapp: {marketing: 2.0, transactional: 9.0}, sms: 1.0}\n"
        "countries: {GB: {sms: 10.0}}\n"
    )
    monkeypatch.setenv("CDP_PRICES_FILE", str(prices))
    partition = TODAY.isoformat()
    preview = run_activation("winback_whatsapp", partition, dry_run=True)
    assert preview.success, preview.error
    assert ledger_rows(env).is_empty()  # a preview writes nothing
    # Every WhatsApp message at 2.0, every SMS at 1.0, except British SMS at 10.0.
    assert preview.currency == "EUR"
    flat = 2.0 * preview.eligible["whatsapp"] + 1.0 * preview.eligible["sms"]
    assert preview.estimated_cost is not None
    british_sms = (preview.estimated_cost - flat) / 9.0
    assert british_sms > 0 and british_sms.is_integer()
    assert "+44" not in preview.sample_messages.replace("+44*", "")  # numbers masked

    # Another template, not approved: the run fails, rather than moving everyone to SMS.
    pending = run_activation("winback_whatsapp", partition, dry_run=True, template="spring_sale")
    assert not pending.success
    assert "'spring_sale' (en) is PENDING, not APPROVED" in (pending.error or "")
    assert pending.eligible == {}
    # A send window of the whole day: nobody is deferred at 14:00 UTC.
    all_day = run_activation(
        "winback_whatsapp", partition, dry_run=True, send_window=("00:00", "23:59")
    )
    assert all_day.success and all_day.deferred == 0 and preview.deferred > 0
    bad = run_activation("winback_whatsapp", partition, dry_run=True, send_window=("9am", "5pm"))
    assert not bad.success and "send window 9am-5pm" in (bad.error or "")


def test_null_customer_ids_are_reported_as_null_not_as_a_duplicated_none() -> None:
    import polars as pl
    import yaml

    from cdp_activation.activation.run import Activation, audience_problems
    from cdp_activation.spec import ActivationSpec

    defs_yaml = ROOT / "src/cdp_activation/defs/activations/winback_whatsapp/defs.yaml"
    attributes = yaml.safe_load(defs_yaml.read_text())["attributes"]
    activation = Activation.from_spec("winback_whatsapp", ActivationSpec.model_validate(attributes))
    frame = pl.DataFrame({"customer_id": [1, None, 2, None, 2]}, schema={"customer_id": pl.Int64})
    problems = "\n".join(audience_problems(activation, frame))
    assert "2 row(s) have a null customer_id" in problems
    assert "1 id(s) appear more than once, e.g. 2" in problems
    assert "None" not in problems


def test_customers_who_tap_stop_are_not_messaged_there_again(env: SimpleNamespace) -> None:
    """The sandbox's customers answer: some write back, some tap "Stop promotions" (WhatsApp)
    or text STOP (SMS). The receiver keeps each message once; a new run the same day keeps
    the ones who stopped off that channel (`whatsapp_opted_out`) although the warehouse still
    says they opted in."""
    from cdp_activation.feedback.receiver import WebhookServer
    from cdp_activation.sandbox.draws import draw
    from cdp_activation.sandbox.status_webhooks import outcome
    from conftest import settings_for_sandbox

    partition = TODAY.isoformat()
    sandbox = env.sandbox
    secrets = settings_for_sandbox(sandbox).webhook_secrets()
    ledger = Ledger(env.ledger_url)
    with WebhookServer(Ledger(env.ledger_url), secrets) as receiver:
        sandbox.configure(
            status_webhooks_url=receiver.url, status_delay_ms=2, reply_rate=0.5, reply_stop_rate=0.5
        )
        first = run_activation("winback_whatsapp", partition)
        assert first.success, first.error
        config = sandbox.config
        replied = {
            (m.channel, m.to): draw(config.seed, "stop", m.provider, m.to) < config.reply_stop_rate
            for m in sandbox.messages()
            if "delivered" in outcome(config, m)
            and draw(config.seed, "reply", m.provider, m.to) < config.reply_rate
        }
        deadline = datetime.now(UTC) + timedelta(seconds=30)
        while datetime.now(UTC) < deadline:  # the replies arrive
            with ledger.engine.connect() as con:
                kept = con.execute(sa.text("SELECT count(*) FROM inbound_events")).scalar_one()
            if kept >= len(replied):
                break
        assert kept == len(replied) > 20
        rows = ledger.rows("winback_whatsapp", partition)
        addresses = zip(rows["channel"], rows["recipient"], strict=True)
        customer = dict(zip(addresses, rows["customer_id"], strict=True))
        expected = {(customer[key], key[0]) for key, stop in replied.items() if stop}
        stopped = ledger.opt_outs()
        assert set(zip(stopped["customer_id"], stopped["channel"], strict=True)) == expected
        whatsapp_stopped = {c for c, channel in expected if channel == "whatsapp"}
        assert whatsapp_stopped and set(
            stopped.filter(pl.col("channel") == "whatsapp")["purpose"]
        ) == {"marketing"}  # the button stops marketing only

        again = run_activation("winback_whatsapp", partition)
        assert again.success, again.error
    assert again.sent == 0  # nothing twice, and nobody who stopped
    assert again.eligible["whatsapp"] == first.eligible["whatsapp"] - len(whatsapp_stopped)
    assert any("whatsapp_opted_out" in reason for reason in again.excluded)
    # The run's figures count the partition's customers who wrote back, and who stopped.
    assert (again.replied, again.opted_out) == (len(replied), len(expected))
    ledger.dispose()
