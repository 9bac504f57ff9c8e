"""Unit prices per channel and country, and the estimated cost of a run's decisions.

The price list is YAML (`prices.yaml` beside this module, or the file named by
`CDP_PRICES_FILE`); a price is a number, or one per purpose (`marketing`, `transactional`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_PRICES = Path(__file__).with_name("prices.yaml")


class PerPurpose(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    marketing: float = Field(ge=0)
    transactional: float = Field(ge=0)


Price = Annotated[float, Field(ge=0)] | PerPurpose


class PriceList(BaseModel):
    """Unit prices: `channels` for everyone, `countries` overriding them per country."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    currency: str = "USD"
    channels: dict[str, Price] = Field(default_factory=dict)
    countries: dict[str, dict[str, Price]] = Field(default_factory=dict)

    def unit_price(
        self, channel: str, country: str | None, purpose: Literal["marketing", "transactional"]
    ) -> float | None:
        """The price of one message, or None when the list has none for this channel."""
        price = self.countries.get(country or "", {}).get(channel, self.channels.get(channel))
        if price is None:
            return None
        return getattr(price, purpose) if isinstance(price, PerPurpose) else float(price)


def load_prices(path: Path | None = None) -> PriceList:
    path = path or DEFAULT_PRICES
    try:
        return PriceList.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except FileNotFoundError:
        raise ValueError(f"price list {path} not found (CDP_PRICES_FILE)") from None
    except (yaml.YAMLError, ValidationError) as err:
        raise ValueError(f"price list {path} is not valid: {err}") from None


def estimate_cost(
    chosen: pl.DataFrame, prices: PriceList, purpose: Literal["marketing", "transactional"]
) -> tuple[float, dict[str, float], int]:
    """(total, by channel, messages without a price) for `chosen` rows with `channel` and
    `country`; each distinct (channel, country) is priced once."""
    if chosen.is_empty():
        return 0.0, {}, 0
    pairs = (  # by their codes on the streaming engine, named after: no text column per row
        chosen.lazy()
        .group_by("channel", "country")
        .len()
        .with_columns(pl.col("channel", "country").cast(pl.String))
        .collect(engine="streaming")
    )
    by_channel: dict[str, float] = {}
    unpriced = 0
    for channel, country, count in pairs.iter_rows():
        price = prices.unit_price(channel, country, purpose)
        if price is None:
            unpriced += count
            continue
        by_channel[channel] = by_channel.get(channel, 0.0) + price * count
    rounded = {c: round(v, 2) for c, v in sorted(by_channel.items())}
    return round(sum(by_channel.values()), 2), rounded, unpriced
