"""Personal data kept as little and as briefly as the work allows.

- **Keyed hashes instead of numbers.** Where a number is only looked up, never sent (the phone
  cache), the key is a keyed digest (HMAC-SHA256 under `CDP_PII_HASH_KEY`): without the key
  a digest cannot be matched against the ~10^10 possible numbers of a country. No key configured
  (outside sandbox mode) means nothing derived from a number is kept at all.
- **Retention** (`retention.py`; `CDP_PII_RETENTION_DAYS`, 90 by default): `purge` takes
  the number, the message text and the provider's error text out of finished sends older
  than that, the raw payloads out of older status reports, and old entries out of the phone
  cache. Counts, states, codes, times and customer ids stay, so reporting and the send log
  keep working.
- **Erasure** (a data subject's request; `retention.py`): `erase` does the same at once for
  given customer ids, whatever their age, replaces their customer id with a pseudonym in the
  ledger and the send log, empties the phone cache (a cache: the next run validates numbers
  again) and deletes Dagster's stored step outputs (`storage.py`: sealed whole audiences).
- **Dagster's stored outputs** are sealed with a key derived from the same CDP_PII_HASH_KEY
  (`storage.py`) and removed by `purge` once past the retention.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cdp_activation.settings import SANDBOX_PII_HASH_KEY, get_settings, sandbox_mode

if TYPE_CHECKING:
    import polars as pl

DIGEST_BYTES = 16  # 128 bits: no collision among any warehouse's numbers


def pii_key() -> bytes | None:
    """The keyed hashes' key: CDP_PII_HASH_KEY, else the sandbox's published one in sandbox
    mode, else None (keep nothing derived from a number)."""
    configured = get_settings().pii_hash_key
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value().encode()
    return SANDBOX_PII_HASH_KEY.encode() if sandbox_mode() else None


def keyed_digest(text: pl.Expr, key: bytes) -> pl.Expr:
    """Per value, its HMAC-SHA256 under `key`, the first `DIGEST_BYTES` of it in hex
    (HMAC-SHA256-128): in polars, on every core (polars-hash), not a Python call per value.

    Anyone holding the key can recompute one: `hmac.new(key, value.encode(), "sha256")
    .hexdigest()[:32]`. The key is text (an environment variable), so it is UTF-8.
    """
    import polars_hash  # noqa: F401  # registers the `chash` expression namespace

    digest = text.chash.hmac_sha256(key=key.decode())  # type: ignore[attr-defined]
    return digest.str.head(2 * DIGEST_BYTES)


SEALED_EXTENSION = ".sealed"  # Dagster's stored step outputs, sealed by storage.py


def stored_outputs(storage_dir: Path) -> list[Path]:
    """The sealed step output files under a Dagster storage directory."""
    return [p for p in storage_dir.rglob(f"*{SEALED_EXTENSION}") if p.is_file()]
