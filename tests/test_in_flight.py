"""Requests in the air are a run's choice: defs.yaml's `delivery.in_flight`, the Launchpad's
`in_flight`, `cdp-activation run --in-flight`; measured at the provider (the sandbox's own
record of when each request arrived and was answered)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from cdp_activation.cli.runner import run_activation
from cdp_activation.errors import SettingsError
from cdp_activation.spec import DeliverySpec
from test_activation_e2e import (  # env and warehouse: fixtures this module uses
    TODAY,
    env,  # noqa: F401
    warehouse,  # noqa: F401
)

pytestmark = pytest.mark.e2e


def peak_in_the_air(attempts: list, provider: str) -> int:
    """Most requests to `provider` the sandbox held at one instant."""
    edges = sorted(
        [(a.arrived, 1) for a in attempts if a.provider == provider]
        + [(a.answered, -1) for a in attempts if a.provider == provider],
        key=lambda edge: (edge[0], edge[1]),
    )
    peak = now = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_a_runs_in_flight_bounds_the_requests_in_the_air(
    env: SimpleNamespace,  # noqa: F811
) -> None:
    env.sandbox.configure(latency_ms=80)  # one request takes 80 ms: many would overlap
    summary = run_activation("winback_whatsapp", TODAY.isoformat(), max_recipients=80, in_flight=3)
    assert summary.success, summary.error
    assert summary.sent >= 40
    meta = peak_in_the_air(env.sandbox.attempts(), "meta_whatsapp")
    assert meta == 3  # reached, never passed (the default, 32, would pass it)


def test_an_in_flight_out_of_range_is_refused_in_one_line(env: SimpleNamespace) -> None:  # noqa: F811
    with pytest.raises(SettingsError, match="in_flight must be between 1 and 1024"):
        run_activation("winback_whatsapp", TODAY.isoformat(), in_flight=0)
    with pytest.raises(ValidationError, match="in_flight must be between 1 and 1024"):
        DeliverySpec(in_flight=5000)
    assert env.sandbox.messages() == []


def test_defs_yaml_sets_the_default_a_run_may_override(env: SimpleNamespace) -> None:  # noqa: F811
    from test_activation_e2e import custom_definitions, winback_attributes

    attributes = {**winback_attributes(), "delivery": {"in_flight": 2}}
    definitions = custom_definitions(env.tmp, "winback_two", attributes)
    env.sandbox.configure(latency_ms=80)
    summary = run_activation(
        "winback_two", TODAY.isoformat(), max_recipients=60, definitions=definitions
    )
    assert summary.success, summary.error
    assert peak_in_the_air(env.sandbox.attempts(), "meta_whatsapp") == 2
