"""The price list behind the preview's cost estimate."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import yaml

from cdp_activation.activation.pricing import PriceList, estimate_cost, load_prices

PRICES = PriceList.model_validate(
    {
        "currency": "EUR",
        "channels": {"whatsapp": {"marketing": 0.05, "transactional": 0.01}, "sms": 0.02},
        "countries": {"GB": {"sms": 0.04}},
    }
)


def test_a_country_overrides_the_channel_price_and_purpose_picks_the_rate() -> None:
    assert PRICES.unit_price("sms", "GB", "marketing") == 0.04
    assert PRICES.unit_price("sms", "FR", "marketing") == 0.02
    assert PRICES.unit_price("whatsapp", "GB", "transactional") == 0.01
    assert PRICES.unit_price("viber", "GB", "marketing") is None


def test_the_estimate_prices_each_message_and_counts_those_without_a_price() -> None:
    chosen = pl.DataFrame(
        {
            "channel": ["sms", "sms", "sms", "whatsapp", "viber"],
            "country": ["GB", "GB", "FR", None, "FR"],
        }
    )
    total, by_channel, unpriced = estimate_cost(chosen, PRICES, "marketing")
    assert by_channel == {"sms": 0.1, "whatsapp": 0.05}
    assert total == 0.15 and unpriced == 1


@pytest.mark.parametrize(
    "document",
    [{"channels": {"sms": -0.01}}, {"countries": {"GB": {"sms": -0.01}}}, {"channelz": {}}],
)
def test_a_bad_price_list_is_refused_with_its_path(tmp_path: Path, document: dict) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ValueError, match=f"price list {path} is not valid"):
        load_prices(path)


def test_the_packaged_list_loads() -> None:
    assert load_prices().unit_price("whatsapp", "DE", "marketing") == 0.1365


def test_the_preview_prices_each_chosen_message_by_the_country_the_ledger_keeps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's decisions carry each customer's country as the ledger keeps it (upper
    case, `with_country`): the preview prices by it, as the ledger does, a lowercase `gb`
    in the warehouse included; only the chosen (send, defer) are priced."""
    from cdp_activation.activation.run import with_country
    from cdp_activation.components.metadata import cost_metadata
    from cdp_activation.policy import Decisions
    from cdp_activation.spec import ChannelPlanSpec

    path = tmp_path / "prices.yaml"
    path.write_text(yaml.safe_dump(PRICES.model_dump()))
    monkeypatch.setenv("CDP_PRICES_FILE", str(path))
    audience = pl.DataFrame({"customer_id": [1, 2, 3, 4], "country": ["gb", "GB", "FR", "GB"]})
    frame = pl.DataFrame(
        {
            "customer_id": [1, 2, 3, 4],
            "decision": ["send", "defer", "send", "exclude"],
            "channel": ["sms", "sms", "sms", None],
        }
    )
    plan = ChannelPlanSpec.model_validate(
        {"steps": [{"channel": "sms", "connector": "webhook", "body": "Hi"}]}
    )
    decided = with_country(Decisions(frame=frame, template_problems={}), audience)
    assert cost_metadata(decided, plan)["estimated_cost"].value == 0.1  # 0.04 * 2 + 0.02
