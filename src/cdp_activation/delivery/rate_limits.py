"""Rate limits that belong to the sender, shared by every process that sends for it.

A provider's limit (Meta: 80 messages/s for a WhatsApp number by default) holds for the sum of
everything sent through that sender, not per process. With one process the in-process limiter
(aiolimiter) is exact and needs nothing; when several processes send for one sender (overlapping
runs, or several workers), `CDP_RATE_LIMIT_URL=redis://…` makes them share:

- the rate: a moving window of one second in Redis (the `limits` library), so no window of one
  second ever carries more than the configured rate, whichever process sent;
- the pause a 429's Retry-After asks for: a Redis key every process reads before a request.

Redis down means the step stops (the limiter raises before anything is claimed) and rows stay
planned: it never sends unthrottled.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from cdp_activation.connectors.base import ConnectorError
from cdp_activation.masking import masked

KEY_PREFIX = "cdp_activation"


class RateLimitUnavailable(ConnectorError):
    """The shared rate limit's store cannot be reached: nothing may be sent unthrottled."""


class Limiter(Protocol):
    max_rate: float

    async def acquire(self, amount: float = 1) -> None: ...


def sender_key(connector: Any) -> str:
    """Whose limit it is: the connector and the sender it sends as (Meta's phone number id,
    Twilio's account), so two numbers are two limits and two runs of one number one."""
    parts = [connector.name]
    for attribute in ("phone_number_id", "account_sid", "from_number", "base_url"):
        value = getattr(connector, attribute, None)
        if isinstance(value, str) and value:
            parts.append(value)
            break
    return ":".join(parts)


class SharedLimiter:
    """`rate` messages per second for one sender across every process using `url`."""

    def __init__(self, url: str, sender: str, rate: float) -> None:
        # Imported here: redis' asyncio client and `limits` cost ~0.2 s of every run's start-up,
        # and only runs sharing a limit need them.
        import redis.asyncio
        from limits import RateLimitItemPerSecond
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import MovingWindowRateLimiter

        self.url = url
        self.sender = sender
        self.max_rate = float(max(1, int(rate)))  # the window counts whole messages
        self._item = RateLimitItemPerSecond(int(self.max_rate), 1)
        self._storage = RedisStorage(
            _storage_uri(url), implementation="redispy", key_prefix=KEY_PREFIX
        )
        self._window = MovingWindowRateLimiter(self._storage)
        self._redis = redis.asyncio.from_url(url)  # the pause key

    async def acquire(self, amount: float = 1) -> None:
        """Wait until `amount` messages fit in the sender's last second, then take them."""
        cost = max(1, int(amount))
        while True:
            try:
                if await self._window.hit(self._item, self.sender, cost=cost):
                    return
                stats = await self._window.get_window_stats(self._item, self.sender)
            except Exception as err:  # the store's own errors vary by client: all are fatal
                raise RateLimitUnavailable(
                    f"the shared rate limit at {masked(self.url)} cannot be reached "
                    f"({type(err).__name__}): nothing is sent unthrottled; the rows stay planned"
                ) from None
            await asyncio.sleep(min(max(stats.reset_time - time.time(), 0.005), 1.0))

    async def pause_until(self) -> float:
        """The shared Retry-After pause of this sender (a Unix time; 0 when none)."""
        value = await self._call("get", self._pause_key)
        return float(value) if value else 0.0

    async def hold(self, seconds: float) -> None:
        """Pause every process sending for this sender for `seconds` (a 429's Retry-After)."""
        until = time.time() + seconds
        await self._call("set", self._pause_key, f"{until:.3f}", px=max(1, int(seconds * 1000)))

    @property
    def _pause_key(self) -> str:
        return f"{KEY_PREFIX}:pause:{self.sender}"

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self._redis, method)(*args, **kwargs)
        except Exception as err:
            raise RateLimitUnavailable(
                f"the shared rate limit at {masked(self.url)} cannot be reached "
                f"({type(err).__name__}): nothing is sent unthrottled; the rows stay planned"
            ) from None


def _storage_uri(url: str) -> str:
    """`redis://…` as the `limits` library names its asyncio Redis storage."""
    if url.startswith(("redis://", "rediss://")):
        return f"async+{url}"
    raise ValueError(f"CDP_RATE_LIMIT_URL must be a redis:// URL, got {masked(url)!r}")
