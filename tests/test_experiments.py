"""A/B/n experiments: each customer's variant is stable (re-runs, a growing audience, new
weights once recorded in the ledger), each variant sends its own messages, channel order and
window, the holdout is never messaged, and the rules across the audience still hold."""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cdp_activation.connectors.base import TemplateInfo as Info
from cdp_activation.ledger import Ledger
from cdp_activation.policy.variants import assign, decide_experiment
from cdp_activation.sandbox import SandboxServer
from cdp_activation.spec import ActivationSpec, ExperimentSpec
from conftest import cli_project
from test_never_twice import assert_each_key_once, ledger_rows_of
from test_policy import (
    APPROVED,
    NO_QUIET,
    NO_SUPPRESSIONS,
    NOW,
    TEMPLATE_PLAN,
    WINBACK,
    customer,
    frame_of,
)

SHORT = {
    "name": "winback_short",
    "language": "en",
    "category": "marketing",
    "variables": ["first_name"],
}
CATALOGS = {
    "meta_whatsapp": [
        *APPROVED["meta_whatsapp"],
        Info("winback_short", "en", "MARKETING", "APPROVED", 1),
    ]
}


def experiment(*variants: dict[str, Any], **extra: Any) -> ExperimentSpec:
    return ExperimentSpec.model_validate({"variants": list(variants), **extra})


THREE = experiment(
    {"name": "offer", "weight": 45},
    {"name": "short", "weight": 45, "messages": {"whatsapp": {"template": SHORT}}},
    {"name": "holdout", "weight": 10, "holdout": True},
)


def decided(
    rows: list[dict[str, Any]], spec: ExperimentSpec = THREE, **kwargs: Any
) -> pl.DataFrame:
    kwargs.setdefault("policy", NO_QUIET)
    result = decide_experiment(
        frame_of(rows, **({"timezone": pl.String} if any("timezone" in r for r in rows) else {})),
        TEMPLATE_PLAN,
        spec,
        salt="winback",
        now=NOW,
        suppressions=NO_SUPPRESSIONS,
        catalogs=CATALOGS,
        **kwargs,
    )
    return result.frame


def ids(n: int, start: int = 1) -> pl.Series:
    return pl.Series("customer_id", range(start, start + n), dtype=pl.Int64)


# ---------------------------------------------------------------------------------------------
# Assignment


def test_the_assignment_is_the_documented_hash_split_by_the_weights() -> None:
    """Anyone can recompute it: xxh64("variant:<salt>:<id>") / 2**64 against the cumulative
    weights (hashing.py) — checked here with the xxhash package, not the code under test."""
    variants = assign(ids(5000), THREE, "winback").to_list()
    for customer_id, variant in zip(range(1, 5001), variants, strict=True):
        u = xxhash.xxh64_intdigest(f"variant:winback:{customer_id}".encode()) / 2**64
        expected = "offer" if u < 0.45 else "short" if u < 0.90 else "holdout"
        assert variant == expected, customer_id
    shares = Counter(variants)
    assert abs(shares["holdout"] / 5000 - 0.10) < 0.02, shares
    assert abs(shares["offer"] / 5000 - 0.45) < 0.03, shares


@settings(max_examples=60, deadline=None)
@given(
    customers=st.lists(st.integers(1, 10**9), min_size=1, max_size=300, unique=True),
    grown=st.lists(st.integers(1, 10**9), max_size=300, unique=True),
    weights=st.lists(st.floats(0.01, 100), min_size=3, max_size=3),
    salt=st.text(min_size=1, max_size=12),
)
def test_assignment_is_stable_under_reruns_growth_and_new_weights(
    customers: list[int], grown: list[int], weights: list[float], salt: str
) -> None:
    first = dict(zip(customers, assign(pl.Series(customers), THREE, salt).to_list(), strict=True))
    # A re-run, and the audience grown and reordered: the same customers, the same variants.
    everyone = list(dict.fromkeys([*reversed(grown), *customers]))
    again = dict(zip(everyone, assign(pl.Series(everyone), THREE, salt).to_list(), strict=True))
    assert {c: again[c] for c in customers} == first
    # New weights: the customers the ledger recorded keep their variant; newcomers follow
    # the hash under the new weights.
    reweighted = experiment(
        *(v.model_dump() | {"weight": w} for v, w in zip(THREE.variants, weights, strict=True))
    )
    recorded = pl.DataFrame(
        {"customer_id": [str(c) for c in first], "variant": list(first.values())}
    )
    kept = assign(pl.Series(everyone), reweighted, salt, recorded).to_list()
    fresh = assign(pl.Series(everyone), reweighted, salt).to_list()
    for customer_id, variant, hashed in zip(everyone, kept, fresh, strict=True):
        assert variant == first.get(customer_id, hashed)


def test_a_variant_the_experiment_no_longer_has_is_assigned_again_by_the_hash() -> None:
    recorded = pl.DataFrame({"customer_id": ["1", "2"], "variant": ["gone", "short"]})
    got = assign(ids(2), THREE, "s", recorded).to_list()
    assert got[1] == "short"
    assert got[0] == assign(ids(1), THREE, "s").to_list()[0]


# ---------------------------------------------------------------------------------------------
# What each variant sends


def test_each_variant_sends_its_own_template_and_the_holdout_nothing() -> None:
    frame = decided([customer(i) for i in range(1, 61)])
    by_variant = {v: part for (v,), part in frame.group_by(pl.col("variant").cast(pl.String))}
    assert set(by_variant) == {"offer", "short", "holdout"}
    offer, short, holdout = by_variant["offer"], by_variant["short"], by_variant["holdout"]
    assert set(offer["template_name"].cast(pl.String)) == {"winback_offer"}
    assert set(short["template_name"].cast(pl.String)) == {"winback_short"}
    # The short template takes one variable, the plan's two: each row its own variant's.
    assert all(v["2"] is None for v in short["variables"].to_list())
    assert all(v["2"] is not None for v in offer["variables"].to_list())
    assert set(holdout["decision"].cast(pl.String)) == {"holdout"}
    assert set(holdout["reason"].cast(pl.String)) == {"holdout"}


def test_a_held_out_customer_keeps_when_their_message_would_have_gone() -> None:
    """At 12:00 UTC it is 21:00 in Tokyo: quiet hours. The sent arms wait until 09:00 there,
    and so does the holdout's moment: its results count from then, like theirs."""
    rows = [
        customer(i, phone=f"+8190123456{i:02d}", country="JP", timezone="Asia/Tokyo")
        for i in range(1, 41)
    ]
    frame = decided(rows, policy=None)
    morning = datetime(2026, 11, 24, 0, 0, tzinfo=UTC)
    for variant, decision in (("offer", "defer"), ("short", "defer"), ("holdout", "holdout")):
        part = frame.filter(pl.col("variant") == variant)
        assert part.height, variant
        assert set(part["decision"].cast(pl.String)) == {decision}, variant
        assert set(part["not_before"].to_list()) == {morning}, variant


def test_a_variant_with_its_own_channel_order_and_send_window() -> None:
    spec = experiment(
        {"name": "whatsapp_first", "weight": 1},
        {
            "name": "sms_evening",
            "weight": 1,
            "channel_order": ["sms", "whatsapp"],
            "send_window": {"start": "18:00", "end": "20:00"},
        },
    )
    # 12:00 UTC is 12:00 in London: inside the plan's hours, outside the 18-20 window.
    rows = [customer(i, timezone="Europe/London") for i in range(1, 41)]
    frame = decided(rows, spec, policy=None)
    first = frame.filter(pl.col("variant") == "whatsapp_first")
    evening = frame.filter(pl.col("variant") == "sms_evening")
    assert first.height and evening.height
    assert set(first["channel"].cast(pl.String)) == {"whatsapp"}
    assert set(first["decision"].cast(pl.String)) == {"send"}
    assert set(evening["channel"].cast(pl.String)) == {"sms"}
    assert set(evening["decision"].cast(pl.String)) == {"defer"}
    assert set(evening["not_before"].to_list()) == {datetime(2026, 11, 23, 18, 0, tzinfo=UTC)}


def test_one_message_per_number_and_the_cap_hold_across_variants() -> None:
    rows = [customer(i) for i in range(1, 100)]  # +4471234567<i>: valid two-digit numbers
    # Everyone shares their number with a partner 1000 higher, whatever the variants.
    rows += [customer(i + 1000, phone=customer(i)["phone"]) for i in range(1, 100)]
    frame = decided(rows)
    chosen = frame.filter(pl.col("decision").is_in(["send", "defer"]))
    assert chosen["phone_e164"].is_unique().all()
    pairs = frame.filter(pl.col("customer_id") > 1000)
    lost = pairs.filter(pl.col("reason") == "duplicate_phone")
    assert lost.height > 0
    # Pairs split across two sending variants: only the lower id was messaged.
    across = frame.join(
        frame.select((pl.col("customer_id") - 1000).alias("customer_id"), "variant"),
        on="customer_id",
        suffix="_partner",
    ).filter(
        (pl.col("variant") != pl.col("variant_partner"))
        & pl.col("variant").cast(pl.String).is_in(["offer", "short"])
        & pl.col("variant_partner").cast(pl.String).is_in(["offer", "short"])
    )
    assert across.height > 0
    assert set(across["decision"].cast(pl.String)) == {"send"}

    capped = decided(rows, max_recipients=37)
    assert capped.filter(pl.col("decision").is_in(["send", "defer"])).height == 37
    assert capped.filter(pl.col("reason") == "over_recipient_cap").height > 0
    # Held-out customers are not counted against the cap, nor capped.
    assert (
        capped.filter(pl.col("decision") == "holdout").height
        == frame.filter(pl.col("decision") == "holdout").height
    )


# ---------------------------------------------------------------------------------------------
# Configuration


BASE: dict[str, Any] = {
    "audience": {"sql": "sql/audiences/winback_whatsapp.sql"},
    "channel_plan": {
        "purpose": "marketing",
        "steps": [
            {"channel": "whatsapp", "connector": "meta_whatsapp", "template": WINBACK},
            {"channel": "sms", "connector": "twilio", "body": "Hi {first_name}"},
        ],
        "fallback": {"channel": "sms"},
    },
}


@pytest.mark.parametrize(
    ("variants", "extra", "message"),
    [
        ([{"name": "a", "weight": 1}], {}, "at least two variants"),
        ([{"name": "a", "weight": 1}, {"name": "a", "weight": 1}], {}, "names must differ"),
        ([{"name": "a", "weight": 0}, {"name": "b", "weight": 1}], {}, "above 0"),
        ([{"name": "A b", "weight": 1}, {"name": "b", "weight": 1}], {}, "variant name 'A b'"),
        (
            [
                {"name": "a", "weight": 1},
                {"name": "h", "weight": 1, "holdout": True, "channel_order": ["sms", "whatsapp"]},
            ],
            {},
            "is the holdout: it sends nothing",
        ),
        (
            [{"name": "a", "weight": 1}, {"name": "b", "weight": 1, "channel_order": ["sms"]}],
            {},
            "must list the plan's channels",
        ),
        (
            [
                {"name": "a", "weight": 1},
                {"name": "b", "weight": 1, "messages": {"viber": {"body": "x"}}},
            ],
            {},
            "the plan has no viber step",
        ),
        (
            [
                {"name": "a", "weight": 1},
                {"name": "b", "weight": 1, "messages": {"sms": {"body": "x"}}},
            ],
            {},
            "sms is the plan's fallback",
        ),
        (
            [
                {"name": "a", "weight": 1},
                {"name": "b", "weight": 1, "messages": {"whatsapp": {"body": "x"}}},
            ],
            {},
            "the variant must give a template too",
        ),
        (
            [
                {"name": "a", "weight": 1},
                {
                    "name": "b",
                    "weight": 1,
                    "messages": {"whatsapp": {"template": {**WINBACK, "category": "utility"}}},
                },
            ],
            {},
            "category 'utility' is not allowed",
        ),
        (
            [
                {"name": "a", "weight": 1},
                {"name": "b", "weight": 1, "send_window": {"start": "18:00", "end": "18:00"}},
            ],
            {},
            "start and end must differ",
        ),
        (
            [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}],
            {"policy": {"holdout": {"share": 0.1}}},
            "give the holdout as a variant",
        ),
    ],
)
def test_a_bad_experiment_is_refused_naming_what_to_change(
    variants: list[dict[str, Any]], extra: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        ActivationSpec.model_validate({**BASE, **extra, "experiment": {"variants": variants}})
    assert message in str(raised.value), str(raised.value)


# ---------------------------------------------------------------------------------------------
# Through the ledger and the real command


def test_the_ledger_keeps_the_first_assignment(ledger: Ledger) -> None:
    first = pl.DataFrame({"customer_id": ["1", "2", "3"], "variant": ["a", "b", "a"]})
    assert ledger.record_assignments("act", "salt", first) == 3
    later = pl.DataFrame({"customer_id": ["2", "3", "4"], "variant": ["a", "b", "b"]})
    assert ledger.record_assignments("act", "salt", later) == 1
    kept = dict(ledger.variant_assignments("act", "salt").iter_rows())
    assert kept == {"1": "a", "2": "b", "3": "a", "4": "b"}
    assert ledger.variant_assignments("act", "other salt").is_empty()
    assert ledger.variant_assignments("other", "salt").is_empty()


@pytest.mark.integration
@pytest.mark.e2e
def test_winback_experiment_sends_each_arm_its_message_and_records_the_arm(
    tmp_path: Path, sandbox: SandboxServer
) -> None:
    project = cli_project(tmp_path, sandbox, customers=3_000)
    run = project.run("run", "winback_experiment", "--send-window", "00:00-23:59", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["success"], summary
    rows = ledger_rows_of(project.ledger_url, "winback_experiment", summary["partition"])
    assert rows.height > 300
    assert rows["variant"].null_count() == 0
    arms = Counter(rows["variant"].to_list())
    assert set(arms) == {"offer", "short_offer", "holdout"}, arms
    assert abs(arms["holdout"] / rows.height - 0.10) < 0.04, arms
    # The arm recorded for each customer is the one the ledger rows carry.
    ledger = Ledger(project.ledger_url)
    try:
        recorded = dict(
            ledger.variant_assignments("winback_experiment", "winback_experiment").iter_rows()
        )
    finally:
        ledger.dispose()
    assert recorded == dict(zip(rows["customer_id"], rows["variant"], strict=True))
    # Held-out customers were never messaged; each arm got its own WhatsApp template.
    messages = sandbox.messages()
    by_recipient = {r["recipient"]: r for r in rows.iter_rows(named=True)}
    held = {r["recipient"] for r in rows.iter_rows(named=True) if r["state"] == "holdout"}
    assert held and not held & {m.to for m in messages}
    templates = {
        (by_recipient[m.to]["variant"], m.template_name)
        for m in messages
        if m.channel == "whatsapp"
    }
    assert templates == {("offer", "winback_offer"), ("short_offer", "winback_offer_short")}
    assert_each_key_once(messages, rows)
    # The decisions say so in the UI: per variant and decision.
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(project.home))
    event = instance.get_latest_materialization_event(
        dg.AssetKey(["winback_experiment", "decisions"])
    )
    assert event is not None and event.asset_materialization is not None
    table = event.asset_materialization.metadata["variants"].value
    assert "| `holdout` |" in table and "short_offer" in table


def test_conversion_sql_binding_more_than_start_and_end_is_refused(tmp_path: Path) -> None:
    from cdp_activation.activation.run import Activation
    from cdp_activation.settings import project_root

    (tmp_path / "sql/audiences").mkdir(parents=True)
    (tmp_path / "sql/conversions").mkdir(parents=True)
    audience = project_root() / "sql/audiences/winback_whatsapp.sql"
    (tmp_path / "sql/audiences/winback_whatsapp.sql").write_text(audience.read_text())
    (tmp_path / "sql/conversions/bad.sql").write_text(
        "SELECT customer_id, ordered_at AS converted_at FROM orders WHERE amount > :minimum"
    )
    spec = ActivationSpec.model_validate(
        {
            **BASE,
            "audience": {
                "sql": "sql/audiences/winback_whatsapp.sql",
                "parameters": {"lapse_threshold": {"type": "float", "default": 0.7}},
            },
            "experiment": {
                "variants": [
                    {"name": "a", "weight": 1},
                    {"name": "h", "weight": 1, "holdout": True},
                ],
                "conversion_sql": "sql/conversions/bad.sql",
            },
        }
    )
    with pytest.raises(ValueError, match=r"binds only :start and :end .* got :minimum"):
        Activation.from_spec("x", spec, tmp_path)
