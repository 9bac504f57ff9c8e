"""An experiment's results against an independent computation, on a generated warehouse whose
effect is known: the holdout converts at 5%, `offer` at 15%, `short_offer` at 10%."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa
import yaml
from scipy import stats

from cdp_activation.activation.results import ResultsUnavailable, experiment_results
from cdp_activation.activation.run import Activation
from cdp_activation.audience.warehouse import Warehouse, WarehouseError
from cdp_activation.ledger import Ledger
from cdp_activation.settings import project_root
from cdp_activation.spec import ActivationSpec
from conftest import materialized

ACTIVATION = "winback_experiment"
PARTITION = "2026-11-20"
DECIDED = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
TRUE_RATES = {"offer": 0.15, "short_offer": 0.10, "holdout": 0.05}
ARMS = {"offer": 2400, "short_offer": 2400, "holdout": 1200}


def winback_experiment() -> Activation:
    path = project_root() / "src/cdp_activation/defs/activations" / ACTIVATION / "defs.yaml"
    spec = ActivationSpec.model_validate(yaml.safe_load(path.read_text())["attributes"])
    return Activation.from_spec(ACTIVATION, spec)


def plan_experiment(ledger: Ledger) -> pl.DataFrame:
    """The ledger as after a run: each arm's customers decided at DECIDED, the sending arms'
    messages sent (a few failed: they still count, intention to treat)."""
    rows = []
    customer = 0
    for variant, n in ARMS.items():
        for _ in range(n):
            customer += 1
            rows.append((str(customer), variant))
    frame = pl.DataFrame(rows, schema=["customer_id", "variant"], orient="row").with_columns(
        pl.lit("initial").alias("step"),
        pl.lit("whatsapp").alias("channel"),
        pl.lit("meta_whatsapp").alias("connector"),
        ("+4915100" + pl.col("customer_id").str.zfill(6)).alias("recipient"),
        pl.lit("winback_offer").alias("template_name"),
        pl.lit("en").alias("template_language"),
        pl.lit(None, dtype=pl.List(pl.String)).alias("variables"),
        pl.lit(None, dtype=pl.String).alias("body"),
        pl.when(pl.col("variant") == "holdout")
        .then(pl.lit("holdout"))
        .otherwise(pl.lit("send"))
        .alias("decision"),
    )
    ledger.plan(ACTIVATION, PARTITION, frame)
    decided = DECIDED.strftime("%Y-%m-%d %H:%M:%S.%f") if ledger.dialect == "sqlite" else DECIDED
    with ledger.engine.begin() as con:
        con.execute(sa.text("UPDATE sends SET planned_at = :at"), {"at": decided})
        con.execute(
            sa.text(
                "UPDATE sends SET state = CASE WHEN CAST(customer_id AS INTEGER) % 50 = 0 "
                "THEN 'failed' ELSE 'sent' END, sent_at = planned_at WHERE state = 'planned'"
            )
        )
    return frame.select("customer_id", "variant")


def generate_orders(path: Path, customers: pl.DataFrame, seed: int = 11) -> dict[str, int]:
    """Orders with the known rates inside the week after the decision, and decoys outside it
    (before the decision, after the window) that must not count. Returns conversions per arm
    as generated (the ground truth)."""
    rng = np.random.default_rng(seed)
    truth = {v: 0 for v in ARMS}
    orders = []
    for customer_id, variant in customers.iter_rows():
        if rng.random() < TRUE_RATES[variant]:
            truth[variant] += 1
            at = DECIDED + timedelta(hours=float(rng.uniform(1, 24 * 6.9)))
            orders.append((int(customer_id), at))
        if rng.random() < 0.2:  # an order of the week before: not a conversion
            orders.append((int(customer_id), DECIDED - timedelta(hours=float(rng.uniform(1, 150)))))
        if rng.random() < 0.2:  # after the 7-day window: not a conversion
            orders.append((int(customer_id), DECIDED + timedelta(days=7, minutes=1)))
    with duckdb.connect(str(path)) as con:
        con.execute(
            "CREATE TABLE orders (order_id BIGINT, customer_id BIGINT, ordered_at TIMESTAMPTZ, "
            "amount DECIMAL(10, 2), currency VARCHAR)"
        )
        frame = pl.DataFrame(orders, schema=["customer_id", "ordered_at"], orient="row")
        con.register("generated", frame.to_arrow())
        con.execute(
            "INSERT INTO orders SELECT row_number() OVER (), customer_id, ordered_at, 10, 'EUR' "
            "FROM generated"
        )
    return truth


def test_lift_matches_an_independent_computation_on_a_known_effect(
    ledger: Ledger, tmp_path: Path
) -> None:
    customers = plan_experiment(ledger)
    warehouse = tmp_path / "w.duckdb"
    truth = generate_orders(warehouse, customers)
    found = experiment_results(
        winback_experiment(),
        ledger,
        Warehouse(f"duckdb:///{warehouse}"),
        PARTITION,
        now=DECIDED + timedelta(days=8),
    )
    assert found.baseline == "holdout"
    assert found.open_windows == 0 and found.window_closes_at is None
    by_name = {v.variant: v for v in found.variants}
    assert [v.variant for v in found.variants] == ["offer", "short_offer", "holdout"]
    n0, c0 = ARMS["holdout"], truth["holdout"]
    for name in ARMS:
        result = by_name[name]
        n, c = ARMS[name], truth[name]
        # Everyone counts, the failed sends too; only orders in the window convert.
        assert (result.customers, result.conversions) == (n, c), name
        assert result.rate == pytest.approx(c / n)
        # Wilson's interval, from its formula.
        z = stats.norm.ppf(0.975)
        p = c / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        assert (result.rate_low, result.rate_high) == pytest.approx((centre - half, centre + half))
        # The known rate is inside it.
        assert result.rate_low < TRUE_RATES[name] < result.rate_high, name
        if name == "holdout":
            assert result.lift is None and result.p_value is None
            continue
        # The two-proportion test is a chi-square test on the 2x2 table, uncorrected.
        _, p_value, _, _ = stats.chi2_contingency([[c, n - c], [c0, n0 - c0]], correction=False)
        assert result.p_value == pytest.approx(p_value, rel=1e-6)
        assert result.lift == pytest.approx(c / n - c0 / n0)
        true_lift = TRUE_RATES[name] - TRUE_RATES["holdout"]
        assert result.lift_low is not None and result.lift_high is not None
        assert result.lift_low < true_lift < result.lift_high
        assert result.lift_low > 0 and result.p_value < 1e-6  # a real, detected difference
        assert result.relative_lift == pytest.approx(result.lift / (c0 / n0))


def test_windows_still_open_are_said_and_an_activation_without_experiment_refused(
    ledger: Ledger, tmp_path: Path
) -> None:
    customers = plan_experiment(ledger)
    warehouse = tmp_path / "w.duckdb"
    generate_orders(warehouse, customers)
    found = experiment_results(
        winback_experiment(),
        ledger,
        Warehouse(f"duckdb:///{warehouse}"),
        PARTITION,
        now=DECIDED + timedelta(days=2),
    )
    assert found.open_windows == sum(ARMS.values())
    assert found.window_closes_at == DECIDED + timedelta(days=7)
    # Held-out customers deferred to the morning count from then, as the sent arms would:
    # not yet at 11:00.
    tomorrow = DECIDED + timedelta(days=1)
    at = tomorrow.strftime("%Y-%m-%d %H:%M:%S.%f") if ledger.dialect == "sqlite" else tomorrow
    with ledger.engine.begin() as con:
        con.execute(
            sa.text(
                "UPDATE sends SET not_before = :at WHERE state = 'holdout' "
                "AND CAST(customer_id AS INTEGER) % 2 = 0"
            ),
            {"at": at},
        )
    early = experiment_results(
        winback_experiment(),
        ledger,
        Warehouse(f"duckdb:///{warehouse}"),
        PARTITION,
        now=DECIDED + timedelta(hours=1),
    )
    held = next(v for v in early.variants if v.variant == "holdout")
    assert held.customers == ARMS["holdout"] // 2
    later = experiment_results(
        winback_experiment(),
        ledger,
        Warehouse(f"duckdb:///{warehouse}"),
        PARTITION,
        now=DECIDED + timedelta(days=9),
    )
    assert next(v for v in later.variants if v.variant == "holdout").customers == ARMS["holdout"]
    plain = winback_experiment()
    plain = Activation(
        plain.name,
        plain.spec.model_copy(update={"experiment": None}),
        plain.query,
        plain.suppression_sql,
    )
    with pytest.raises(ResultsUnavailable, match="has no experiment"):
        experiment_results(plain, ledger, Warehouse(f"duckdb:///{warehouse}"), PARTITION)


@pytest.mark.e2e
def test_the_results_command_and_asset_print_the_same_table(tmp_path: Path) -> None:
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    ledger = Ledger(ledger_url)
    try:
        customers = plan_experiment(ledger)
    finally:
        ledger.dispose()
    warehouse = tmp_path / "w.duckdb"
    truth = generate_orders(warehouse, customers)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        "CDP_LEDGER_URL": ledger_url,
        "CDP_WAREHOUSE_URL": f"duckdb:///{warehouse}",
        "CDP_SANDBOX": "1",
        "DAGSTER_HOME": str(home),
        "PATH": str(Path(sys.executable).parent),
        "HOME": str(tmp_path),
    }
    command = str(Path(sys.executable).parent / "cdp-activation")
    out = subprocess.run(
        [command, "results", ACTIVATION, "--partition", PARTITION, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert {v["variant"]: v["conversions"] for v in printed["variants"]} == truth
    table = subprocess.run(
        [command, "results", ACTIVATION, "--partition", PARTITION],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert table.returncode == 0, table.stderr
    shown = table.stdout + table.stderr  # the table is for people: on stderr, as rich prints it
    assert "baseline `holdout`" in shown and "short_offer" in shown
    unknown = subprocess.run(
        [command, "results", "no_such_activation"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert unknown.returncode != 0 and "no activation 'no_such_activation'" in unknown.stderr

    # The asset, materialised through Dagster, records the same figures.
    metadata = materialized(env, home, f"{ACTIVATION}/results", tmp_path, PARTITION)
    assert metadata["customers_offer"].value == ARMS["offer"]
    assert metadata["conversion_rate_holdout"].value == pytest.approx(
        truth["holdout"] / ARMS["holdout"]
    )
    assert metadata["lift_offer"].value == pytest.approx(
        truth["offer"] / ARMS["offer"] - truth["holdout"] / ARMS["holdout"]
    )
    assert "| `short_offer` |" in metadata["results"].value


def test_conversions_that_are_not_timestamps_are_refused_in_one_line(
    ledger: Ledger, tmp_path: Path
) -> None:
    plan_experiment(ledger)
    warehouse = tmp_path / "w.duckdb"
    with duckdb.connect(str(warehouse)) as con:
        con.execute("CREATE TABLE orders AS SELECT 1 AS customer_id, '2026-11-21' AS ordered_at")
    # Text where a time is due: the warehouse refuses the window's comparison, in one line
    # naming the file (a SQL without the window meets the results' own type check).
    with pytest.raises(WarehouseError, match=r"sql/conversions/orders.sql: .*explicit cast"):
        experiment_results(
            winback_experiment(), ledger, Warehouse(f"duckdb:///{warehouse}"), PARTITION
        )
    # A conversion SQL without the window, returning text: the results' own check says so.
    import dataclasses

    from cdp_activation.audience.sql import parse_audience_sql

    text_query = parse_audience_sql(
        "SELECT customer_id, ordered_at AS converted_at FROM orders", Path("text.sql")
    )
    with pytest.raises(ResultsUnavailable, match=r"converted_at is String, not a timestamp"):
        experiment_results(
            dataclasses.replace(winback_experiment(), conversion_query=text_query),
            ledger,
            Warehouse(f"duckdb:///{warehouse}"),
            PARTITION,
        )
