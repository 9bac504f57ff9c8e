"""The CEP handoff: an activation whose steps hand customers to a Braze Canvas
(`braze_audience`, `/users/track`) instead of messaging them, through the whole Dagster run
against the sandbox, with the ledger's guarantees and the policy's exclusions."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import duckdb
import pytest
import yaml
from pydantic import ValidationError

from cdp_activation.activation.run import Activation
from cdp_activation.cli.runner import run_activation
from cdp_activation.settings import project_root
from cdp_activation.spec import ActivationSpec, ChannelPlanSpec
from test_activation_e2e import (  # env and warehouse: fixtures this module uses
    TODAY,
    env,  # noqa: F401
    ledger_rows,
    warehouse,  # noqa: F401
)

pytestmark = pytest.mark.e2e

ROOT = project_root()
CANVAS_YAML = ROOT / "src/cdp_activation/defs/activations/winback_braze_canvas/defs.yaml"
HANDOFF = {"attribute": "cdp_winback_at", "properties": ["first_name"]}


def canvas_attributes() -> dict[str, Any]:
    return yaml.safe_load(CANVAS_YAML.read_text())["attributes"]


@pytest.fixture
def handoff_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    base: SimpleNamespace = request.getfixturevalue("env")
    monkeypatch.setenv("CDP_BRAZE_AUDIENCE_BASE_URL", f"{base.sandbox.url}/braze")
    monkeypatch.delenv("CDP_BRAZE_AUDIENCE_API_KEY", raising=False)
    monkeypatch.setenv("CDP_CONFIRM_ABOVE", "1000000")
    return base


def latest_marketing_consent(path: str, channel: str) -> dict[str, bool]:
    """Each customer's latest marketing consent on `channel` (an opt-out wins a tie)."""
    sql = """
        WITH latest AS (
            SELECT customer_id, max(recorded_at) AS at FROM channel_consents
            WHERE channel = $channel AND purpose = 'marketing' GROUP BY customer_id
        )
        SELECT c.customer_id::VARCHAR, bool_and(c.opted_in) FROM channel_consents c
        JOIN latest l ON c.customer_id = l.customer_id AND c.recorded_at = l.at
        WHERE c.channel = $channel AND c.purpose = 'marketing' GROUP BY c.customer_id
    """
    with duckdb.connect(path, read_only=True) as db:
        return dict(db.execute(sql, {"channel": channel}).fetchall())


def test_a_handoff_writes_each_cleared_customer_once_and_a_rerun_writes_nothing(
    handoff_env: SimpleNamespace,
    warehouse: Any,  # noqa: F811
) -> None:
    sandbox = handoff_env.sandbox
    first = run_activation("winback_braze_canvas", TODAY.isoformat())
    assert first.success, first.error
    assert first.sent > 100

    rows = ledger_rows(handoff_env, "winback_braze_canvas")
    sent = rows.filter(rows["state"] == "sent")
    profiles = sandbox.profiles()
    # Every customer written is a `sent` row, and every `sent` row was written, once.
    assert set(profiles) == set(sent["customer_id"].to_list())
    assert sent.height == first.sent
    pushes = [m for m in sandbox.messages() if m.provider == "braze_audience"]
    assert len(pushes) == sent.height
    # Written with what the policy checked: the channel's group, the number, the properties.
    consent = {
        channel: latest_marketing_consent(str(warehouse), channel)
        for channel in ("whatsapp", "sms")
    }
    for row in sent.head(200).iter_rows(named=True):
        profile = profiles[row["customer_id"]]
        group = profile["subscription_groups"][0]
        assert group == {
            "subscription_group_id": f"winback_{row['channel']}_group",
            "subscription_state": "subscribed",
        }
        assert profile["phone"] == row["recipient"]
        assert profile["first_name"] and profile["cdp_winback_at"].endswith("Z")
        assert consent[row["channel"]].get(row["customer_id"]) is True
    # Those the policy excluded were handed to nobody.
    excluded = set(rows.filter(rows["state"] == "excluded")["customer_id"].to_list())
    assert not excluded & set(profiles)

    again = run_activation("winback_braze_canvas", TODAY.isoformat())
    assert again.success, again.error
    assert again.sent == 0
    assert len([m for m in sandbox.messages() if m.provider == "braze_audience"]) == len(pushes)


def test_a_handoff_step_needs_an_audience_connector_and_no_fallback() -> None:
    attributes = canvas_attributes()
    meta = {"channel": "whatsapp", "connector": "meta_whatsapp", "handoff": HANDOFF}
    with pytest.raises(ValueError, match="'meta_whatsapp' sends messages and cannot take a"):
        Activation.from_spec(
            "x",
            ActivationSpec.model_validate(
                {**attributes, "channel_plan": {"purpose": "marketing", "steps": [meta]}}
            ),
        )
    template = {
        "channel": "whatsapp",
        "connector": "braze_audience",
        "template": {"name": "winback_offer", "category": "marketing"},
    }
    with pytest.raises(ValueError, match="takes audience handoffs, not messages"):
        Activation.from_spec(
            "x",
            ActivationSpec.model_validate(
                {**attributes, "channel_plan": {"purpose": "marketing", "steps": [template]}}
            ),
        )
    steps = canvas_attributes()["channel_plan"]["steps"]
    with pytest.raises(ValidationError, match="cannot have a `fallback`"):
        ChannelPlanSpec.model_validate({"steps": steps, "fallback": {"channel": "sms"}})
    both = {**steps[0], "template": template["template"]}
    with pytest.raises(ValidationError, match="exactly one of `template`, `body` or `handoff`"):
        ChannelPlanSpec.model_validate({"steps": [both]})
    with pytest.raises(ValidationError, match="not a valid attribute name"):
        ChannelPlanSpec.model_validate(
            {"steps": [{**steps[0], "handoff": {"attribute": "cdp winback"}}]}
        )
    # A property that would address another Braze user (or unset the checked number) is refused.
    for taken in ("external_id", "phone"):
        with pytest.raises(ValidationError, match=f"{taken} is set by the handoff itself"):
            ChannelPlanSpec.model_validate(
                {"steps": [{**steps[0], "handoff": {**HANDOFF, "properties": [taken]}}]}
            )
