"""Event-driven activations (abandoned carts within the hour): window partitions, the events
sensor's cursor, exactly one message per customer and window however often a window runs, and
clear errors for a wrong `events` block or events SQL."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dagster as dg
import duckdb
import pytest
import yaml
from pydantic import ValidationError

from cdp_activation.activation import events
from cdp_activation.activation.run import Activation
from cdp_activation.audience.sql import load_audience_sql
from cdp_activation.audience.warehouse import Warehouse
from cdp_activation.cli.runner import run_activation
from cdp_activation.components.activation import build_activation_defs
from cdp_activation.components.resources import WarehouseResource
from cdp_activation.defs.resources import resources
from cdp_activation.demo.live import append_cart_events
from cdp_activation.partitions import bound_parameters, bounds, window_key, windows_between
from cdp_activation.settings import project_root
from cdp_activation.spec import ActivationSpec, EventsSpec
from test_activation_e2e import (  # env and warehouse: fixtures this module uses
    env,  # noqa: F401
    ledger_rows,
    warehouse,  # noqa: F401
)

ROOT = project_root()
CART_YAML = ROOT / "src/cdp_activation/defs/activations/abandoned_cart/defs.yaml"
EVENTS_SQL = ROOT / "sql/events/cart_events.sql"
SPEC = EventsSpec(sql="sql/events/cart_events.sql")


def cart_attributes() -> dict[str, Any]:
    return yaml.safe_load(CART_YAML.read_text())["attributes"]


# --- what a window partition is ---------------------------------------------------------------


def test_window_keys_bounds_and_the_windows_between_two_times() -> None:
    at = datetime(2026, 12, 5, 10, 29, 59, tzinfo=UTC)
    assert window_key(at, 15) == "2026-12-05T10:15"
    assert bounds("2026-12-05T10:15", 15) == (
        datetime(2026, 12, 5, 10, 15, tzinfo=UTC),
        datetime(2026, 12, 5, 10, 30, tzinfo=UTC),
    )
    assert bounds("2026-12-05") == (
        datetime(2026, 12, 5, tzinfo=UTC),
        datetime(2026, 12, 6, tzinfo=UTC),
    )
    assert windows_between(at - timedelta(minutes=31), at, 15) == [
        "2026-12-05T09:45",
        "2026-12-05T10:00",
        "2026-12-05T10:15",
    ]
    bound = bound_parameters("2026-12-05T10:15", 15, now=at)
    assert bound["as_of"] == at  # the open window: now, not its end
    assert bound["window_end"] == datetime(2026, 12, 5, 10, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="does not start a 15-minute window"):
        bounds("2026-12-05T10:20", 15)
    with pytest.raises(ValueError, match="not a window start"):
        bounds("2026-12-05", 15)


def test_a_wrong_events_block_or_window_parameter_is_refused_in_one_line() -> None:
    with pytest.raises(ValidationError, match="window_minutes must divide 60"):
        EventsSpec(sql="x.sql", window_minutes=7)
    with pytest.raises(ValidationError, match="interval_seconds must be between 30 and 3600"):
        EventsSpec(sql="x.sql", interval_seconds=5)
    with pytest.raises(ValidationError, match="is not a duration"):
        EventsSpec(sql="x.sql", max_event_age="soon")
    daily = {k: v for k, v in cart_attributes().items() if k != "events"}
    with pytest.raises(ValueError, match="only an event-driven activation binds"):
        Activation.from_spec("daily_carts", ActivationSpec.model_validate(daily))
    spec = ActivationSpec.model_validate(cart_attributes())
    assert spec.send_deadline() == timedelta(hours=1)  # an event older than an hour: too late


# --- the sensor's look at the events ------------------------------------------------------------


@pytest.fixture
def event_warehouse(tmp_path: Path) -> Path:
    path = tmp_path / "events.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(
            "CREATE TABLE cart_events (event_id VARCHAR, customer_id BIGINT, cart_id VARCHAR, "
            "event_type VARCHAR, item_name VARCHAR, cart_value DECIMAL(10, 2), "
            "occurred_at TIMESTAMPTZ, loaded_at TIMESTAMPTZ)"
        )
    return path


def add_event(
    path: Path, occurred: datetime, loaded: datetime, kind: str = "cart_abandoned"
) -> None:
    with duckdb.connect(str(path)) as con:
        con.execute(
            "INSERT INTO cart_events VALUES ('e', 1, 'c', ?, 'hat', 10, ?, ?)",
            [kind, occurred, loaded],
        )


def test_the_sensor_runs_the_windows_new_events_fall_in_and_moves_its_cursor(
    event_warehouse: Path,
) -> None:
    query = load_audience_sql(EVENTS_SQL)
    store = Warehouse(f"duckdb:///{event_warehouse}")
    now = datetime(2026, 12, 5, 10, 20, tzinfo=UTC)

    nothing = events.tick(query, store, SPEC, None, now)
    assert nothing.windows == [] and nothing.cursor is None
    assert nothing.skip and nothing.skip.startswith("no event loaded since 2026-12-05T09:20")

    add_event(event_warehouse, now - timedelta(minutes=25), now - timedelta(seconds=30))
    add_event(event_warehouse, now - timedelta(minutes=1), now - timedelta(seconds=10))
    first = events.tick(query, store, SPEC, None, now)
    assert first.windows == ["2026-12-05T09:45", "2026-12-05T10:00", "2026-12-05T10:15"]
    assert first.cursor == (now - timedelta(seconds=10)).isoformat()

    # The same events are not seen twice; a checkout alone calls for no run.
    add_event(event_warehouse, now, now, kind="checkout_completed")
    again = events.tick(query, store, SPEC, first.cursor, now)
    assert again.windows == [] and again.cursor == first.cursor

    # An event loaded late but older than max_event_age: the cursor moves, nothing runs.
    add_event(event_warehouse, now - timedelta(hours=3), now + timedelta(seconds=5))
    late = events.tick(query, store, SPEC, first.cursor, now + timedelta(seconds=6))
    assert late.windows == [] and late.skip == "the new events are older than 1h"
    assert late.cursor == (now + timedelta(seconds=5)).isoformat()


def test_events_sql_that_breaks_its_contract_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE t AS SELECT 1 AS x")
    sql = tmp_path / "bad.sql"
    sql.write_text("SELECT x FROM t WHERE x > 0 OR :since IS NULL")
    with pytest.raises(events.EventsSQLError) as caught:
        events.new_events(load_audience_sql(sql), Warehouse(f"duckdb:///{path}"), datetime.now(UTC))
    (line,) = str(caught.value).splitlines()
    assert "exactly one row with columns first_event_at, last_event_at, loaded_until" in line
    assert "columns x" in line


def test_the_dagster_sensor_requests_one_run_per_window_and_then_skips(
    event_warehouse: Path, tmp_path: Path
) -> None:
    activation = Activation.from_spec(
        "abandoned_cart", ActivationSpec.model_validate(cart_attributes())
    )
    defs = dg.Definitions.merge(build_activation_defs(activation), resources())
    sensor = defs.resolve_sensor_def("abandoned_cart_events")
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED
    assert sensor.minimum_interval_seconds == 60
    now = datetime.now(UTC)
    add_event(event_warehouse, now - timedelta(minutes=20), now - timedelta(seconds=5))
    add_event(event_warehouse, now - timedelta(minutes=1), now - timedelta(seconds=1))
    given = {"warehouse": WarehouseResource(url=f"duckdb:///{event_warehouse}")}
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources=given)
        result = sensor(context)
        requests = list(result) if isinstance(result, list) else [result]
        keys = {r.partition_key for r in requests}
        # Every window from the earliest new event's to the latest's (two or three of them).
        expected = windows_between(now - timedelta(minutes=20), now - timedelta(minutes=1), 15)
        assert keys == set(expected) and len(requests) == len(expected) >= 2
        assert all(r.tags["trigger"] == "events" for r in requests)
        cursor = context.cursor
        assert cursor == (now - timedelta(seconds=1)).isoformat()
        second = sensor(dg.build_sensor_context(instance=instance, resources=given, cursor=cursor))
        assert isinstance(second, dg.SkipReason)


# --- the whole activation, window by window -------------------------------------------------


def consented_customers(path: Path, count: int) -> list[int]:
    """Customers with a valid E.164 phone whose latest marketing WhatsApp consent is yes."""
    sql = """
        WITH latest AS (
            SELECT customer_id, opted_in, row_number() OVER (
                PARTITION BY customer_id ORDER BY recorded_at DESC, opted_in ASC) AS r
            FROM channel_consents WHERE channel = 'whatsapp' AND purpose = 'marketing'
        )
        SELECT c.customer_id FROM customers c JOIN latest l ON l.customer_id = c.customer_id
        WHERE l.r = 1 AND l.opted_in AND c.phone LIKE '+44%' AND c.country = 'GB'
        ORDER BY c.customer_id LIMIT ?
    """
    with duckdb.connect(str(path), read_only=True) as con:
        return [int(r[0]) for r in con.execute(sql, [count]).fetchall()]


def test_each_customer_of_a_window_is_messaged_once_however_often_it_runs(
    env: SimpleNamespace,  # noqa: F811
    warehouse: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CDP_CONFIRM_ABOVE", "1000000")
    rng = random.Random(7)
    customers = consented_customers(warehouse, 40)
    first, later = customers[:20], customers[20:]
    added = append_cart_events(
        warehouse, len(first), rng, checkout_share=0.0, customers=first, loader_delay=0
    )
    window = window_key(added[0].occurred_at, 15)

    one = run_activation("abandoned_cart", window)
    assert one.success, one.error
    assert one.audience == len(first)
    assert one.sent > 0

    # More carts in the same window: the window runs again and messages only the new ones.
    append_cart_events(
        warehouse, len(later), rng, checkout_share=0.0, customers=later, loader_delay=0
    )
    two = run_activation("abandoned_cart", window)
    assert two.success, two.error
    assert two.audience == len(customers)
    three = run_activation("abandoned_cart", window)
    assert three.success and three.sent == 0

    messages = env.sandbox.messages()
    per_phone: dict[str, int] = {}
    for message in messages:
        per_phone[message.to] = per_phone.get(message.to, 0) + 1
    assert max(per_phone.values()) == 1
    rows = ledger_rows(env, "abandoned_cart")
    assert set(rows["partition_key"].to_list()) == {window}
    assert rows.filter(rows["state"] == "sent").height == len(messages) == one.sent + two.sent
    assert {m.template_name for m in messages} <= {"cart_reminder", None}
