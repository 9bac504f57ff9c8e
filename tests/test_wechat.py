"""WeChat Official Account template messages: followers addressed by openid, the account's
templates as the catalog, an unfollow (43004) an opt-out the next run honours, through the whole
run against the sandbox."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from cdp_activation.cli.runner import run_activation
from cdp_activation.connectors import connector_from_settings, samples
from cdp_activation.connectors.base import OutboundMessage, Outcome, TemplateError, TemplateRef
from cdp_activation.settings import Settings
from test_activation_e2e import (  # env and warehouse: fixtures this module uses
    TODAY,
    custom_definitions,
    env,  # noqa: F401
    ledger_rows,
    warehouse,  # noqa: F401
)
from test_connector_contract import send

pytestmark = pytest.mark.e2e

# Followers of the account: an openid per customer (28 characters; those ending in 13 have
# unfollowed it, the sandbox's rule), who accept transactional WeChat messages.
FOLLOWERS = """
SELECT
    customer_id,
    phone,
    country,
    timezone,
    'o' || lpad(CAST(customer_id AS VARCHAR), 27, '0') AS wechat_openid,
    TRUE AS wechat_transactional_consent,
    'rain jacket' AS item_name,
    'A' || CAST(customer_id AS VARCHAR) AS order_ref
FROM customers
WHERE phone LIKE '+%'
ORDER BY customer_id
LIMIT 150
"""


def wechat_attributes(template: str = "order_shipped_tmpl_001") -> dict[str, Any]:
    return {
        "description": "Order shipped notices to the Official Account's followers.",
        "audience": {"sql": "sql/audiences/wechat_shipped.sql"},
        "channel_plan": {
            "purpose": "transactional",
            "steps": [
                {
                    "channel": "wechat",
                    "connector": "wechat",
                    "template": {
                        "name": template,
                        "language": "zh_CN",
                        "category": "utility",
                        "variables": ["item_name", "order_ref"],
                    },
                }
            ],
        },
        "partitions_start_date": "2026-11-01",
        "policy": {"quiet_hours": {"enabled": False}},
    }


@pytest.fixture
def wechat_env(env: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:  # noqa: F811
    monkeypatch.setenv("CDP_WECHAT_BASE_URL", f"{env.sandbox.url}/wechat")
    monkeypatch.delenv("CDP_WECHAT_APP_SECRET", raising=False)
    return env


def test_followers_get_the_template_and_an_unfollow_is_an_opt_out_the_next_run_keeps(
    wechat_env: SimpleNamespace,
) -> None:
    definitions = custom_definitions(
        wechat_env.tmp, "wechat_shipped", wechat_attributes(), FOLLOWERS
    )
    first = run_activation("wechat_shipped", TODAY.isoformat(), definitions=definitions)
    assert first.success, first.error
    messages = wechat_env.sandbox.messages()
    assert messages and {(m.provider, m.channel) for m in messages} == {("wechat", "wechat")}
    assert all(len(m.to) == 28 and m.to.startswith("o") for m in messages)
    assert {m.template_name for m in messages} == {"order_shipped_tmpl_001"}
    sample = messages[0]
    assert sample.parameters == ("rain jacket", "A" + sample.to.lstrip("o0"))
    rows = ledger_rows(wechat_env, "wechat_shipped")
    unfollowed = rows.filter(rows["error_code"] == "43004")
    assert unfollowed.height > 0 and first.failed == unfollowed.height
    assert first.sent == len(messages)

    # The next run leaves out who unfollowed: the refusal became an opt-out.
    second = run_activation("wechat_shipped", TODAY.isoformat(), definitions=definitions)
    assert second.success and second.sent == 0
    assert second.excluded.get("wechat_opted_out", 0) == unfollowed.height


def test_a_template_the_account_does_not_have_fails_the_check_and_sends_nothing(
    wechat_env: SimpleNamespace,
) -> None:
    definitions = custom_definitions(
        wechat_env.tmp, "wechat_typo", wechat_attributes("no_such_tmpl"), FOLLOWERS
    )
    summary = run_activation("wechat_typo", TODAY.isoformat(), definitions=definitions)
    assert not summary.success
    assert "template_approved" in str(summary.failed_checks) or "not in" in str(summary.error)
    assert wechat_env.sandbox.messages() == []


def test_data_that_does_not_fill_the_template_stops_the_send(sandbox_settings: Settings) -> None:
    connector = connector_from_settings("wechat", sandbox_settings)
    short = OutboundMessage(
        "k1",
        "o" + "1" * 27,
        "wechat",
        template=TemplateRef("order_shipped_tmpl_001", "zh_CN", ("only one",)),
    )
    with pytest.raises(TemplateError, match="takes 2 keyword"):
        send(connector, [short])


def test_concurrent_sends_share_one_token_and_renew_it_once_when_wechat_drops_it(
    sandbox: Any,
) -> None:
    """A worker starts many requests at once: they ask WeChat for one token, not one each;
    when WeChat stops honouring it (40001), one renewal serves every request after."""
    import asyncio

    import httpx

    from conftest import settings_for_sandbox

    connector = connector_from_settings("wechat", settings_for_sandbox(sandbox))
    state = sandbox.app.state
    state.wechat_tokens = {}

    async def burst(start: int) -> list[Any]:
        async with httpx.AsyncClient(timeout=5) as client:
            batches = [connector.send_batch(client, [samples.wechat(start + i)]) for i in range(24)]
            results = [r for batch in await asyncio.gather(*batches) for r in batch]
        # Followers whose openid ends in 13 have unfollowed (the sandbox's rule): not a token issue.
        return [r for r in results if r.error_code != "43004"]

    first = asyncio.run(burst(0))
    assert {r.outcome for r in first} == {Outcome.SENT}
    assert len(state.wechat_tokens) == 1
    state.wechat_tokens.clear()  # WeChat no longer knows the token: every request gets 40001
    second = asyncio.run(burst(100))
    assert {r.outcome for r in second} == {Outcome.SENT}
    assert len(state.wechat_tokens) == 1  # renewed once, not 24 times
