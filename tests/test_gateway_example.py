"""The in-house gateway example (`winback_gateway`): the win-back audience handed, as marketing
SMS, to any endpoint keeping the JSON webhook contract, through the whole Dagster run against
the sandbox's webhook receiver. It is also what `python -m bench peers` runs."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from cdp_activation.cli.runner import run_activation
from test_activation_e2e import (  # env and warehouse: fixtures this module uses
    TODAY,
    env,  # noqa: F401
    ledger_rows,
    warehouse,  # noqa: F401
)
from test_braze_handoff import latest_marketing_consent

pytestmark = pytest.mark.e2e


def test_the_gateway_example_sends_each_sms_opt_in_once_in_batches(
    env: SimpleNamespace,  # noqa: F811
    warehouse: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CDP_CONFIRM_ABOVE", "1000000")
    monkeypatch.setenv("CDP_WEBHOOK_URL", f"{env.sandbox.url}/webhook/messages")
    first = run_activation("winback_gateway", TODAY.isoformat(), send_window=None)
    assert first.success, first.error

    rows = ledger_rows(env, "winback_gateway")
    sent = rows.filter(rows["state"] == "sent")
    assert sent.height == first.sent
    planned = rows.filter(rows["state"] == "planned")  # quiet hours: deferred, not dropped
    assert first.sent + planned.height > 100
    received = [m for m in env.sandbox.messages() if m.provider == "webhook"]
    assert sorted(m.to for m in received) == sorted(sent["recipient"].to_list())
    consent = latest_marketing_consent(str(warehouse), "sms")
    by_phone = dict(zip(sent["recipient"], sent["customer_id"], strict=True))
    for message in received:
        assert message.channel == "sms"
        assert consent.get(by_phone[message.to]) is True
        assert message.body and "COMEBACK-" in message.body and message.body.startswith("Hi ")
    # Batches of up to 200 (each request's Idempotency-Key is the hash of its messages'
    # keys): at most one short request per request in flight, never one a customer.
    requests = Counter(m.idempotency_key for m in received)
    assert None not in requests
    assert len(requests) <= -(-len(received) // 200) + 32 < len(received)
    assert max(requests.values()) <= 200
    excluded = set(rows.filter(rows["state"] == "excluded")["customer_id"].to_list())
    assert not excluded & set(by_phone.values())

    again = run_activation("winback_gateway", TODAY.isoformat())
    assert again.success, again.error
    assert again.sent == 0
    assert len([m for m in env.sandbox.messages() if m.provider == "webhook"]) == len(received)
