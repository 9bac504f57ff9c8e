"""The sandbox's randomness: each draw fixed by the seed and what it is about, so a run is
reproducible whatever order concurrent requests arrive in (unlike a shared random.Random)."""

from __future__ import annotations

import hashlib


def draw(seed: int, *parts: object) -> float:
    """A uniform number in [0, 1) fixed by `seed` and `parts`."""
    text = "|".join(str(p) for p in (seed, *parts))
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
