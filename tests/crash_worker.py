"""A delivery run in its own process, for the crash test (tests/test_crash.py) to SIGKILL.

    python tests/crash_worker.py LEDGER_FILE SANDBOX_URL N [CHUNK_SIZE]

It does what a real run does on start, with the real `Ledger`, `deliver` and connectors: plan
the N rows (a no-op for keys already planned, so a restart never plans twice), turn rows a
killed predecessor left in flight into `unknown`, then deliver whatever is still `planned` to
the sandbox at SANDBOX_URL. It prints `delivering <rows>` once it starts sending, so the test
can time its kill from there, and a JSON summary when it finishes.

`audience` is also used by tests/test_faults.py to build the same kind of rows.
"""

from __future__ import annotations

import json
import sys

import polars as pl

from cdp_activation.connectors import connector_from_settings
from cdp_activation.connectors.base import Connector
from cdp_activation.delivery import DeliveryOptions, deliver
from cdp_activation.ledger import Ledger
from cdp_activation.settings import Settings

ACTIVATION = "crash_test"
PARTITION = "2025-01-01"
CONNECTORS = ("meta_whatsapp", "twilio")


def audience(n: int) -> pl.DataFrame:
    """N distinct recipients, half WhatsApp template messages (Meta), half SMS (Twilio).

    Numbers are distinct, so a recipient identifies a row both in the ledger and in the
    sandbox. WhatsApp numbers whose digits end in 13 fail (the sandbox's "not on WhatsApp").
    """
    half = n // 2
    channels = ["whatsapp"] * half + ["sms"] * (n - half)
    return pl.DataFrame(
        {
            "customer_id": list(range(1, n + 1)),
            "phone_e164": [f"+4479{i:08d}" for i in range(1, n + 1)],
            "channel": channels,
            "connector": ["meta_whatsapp" if c == "whatsapp" else "twilio" for c in channels],
            "step": ["initial"] * n,
            "template_name": ["winback_offer" if c == "whatsapp" else None for c in channels],
            "template_language": ["en" if c == "whatsapp" else None for c in channels],
            "variables": [
                ["Ann", "90", f"C{i}"] if c == "whatsapp" else None for i, c in enumerate(channels)
            ],
            "body": [None if c == "whatsapp" else f"Hi {i}" for i, c in enumerate(channels)],
        },
        schema_overrides={"variables": pl.List(pl.String)},
    )


def sandbox_connectors(url: str) -> dict[str, Connector]:
    """Both connectors, built from settings pointing at the sandbox (as tests/conftest.py does:
    no `.env`, no tokens, so the sandbox's published credentials are used)."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]  # pydantic-settings init-only option
        meta_base_url=f"{url}/meta",
        twilio_base_url=f"{url}/twilio",
        meta_access_token=None,
        twilio_auth_token=None,
    )
    return {name: connector_from_settings(name, settings) for name in CONNECTORS}


def main(argv: list[str]) -> int:
    ledger_file, url, n = argv[1], argv[2], int(argv[3])
    concurrency = int(argv[4]) if len(argv) > 4 else DeliveryOptions.concurrency
    ledger = Ledger(f"sqlite:///{ledger_file}")
    ledger.plan(ACTIVATION, PARTITION, audience(n))
    recovered = ledger.recover_interrupted(ACTIVATION, PARTITION)
    rows = ledger.pending(ACTIVATION, PARTITION)
    print(f"delivering {len(rows)} (recovered {recovered} as unknown)", flush=True)
    options = DeliveryOptions(
        concurrency=concurrency,
        rate_per_second=2000,
        backoff_initial=0.02,
        backoff_max=0.2,
        timeout_seconds=5,
    )
    report = deliver(ledger, rows, sandbox_connectors(url), options)
    summary = {
        "sent": report.sent,
        "failed": report.failed,
        "unknown": report.unknown,
        "dead_letter": report.dead_letter,
        "recovered": recovered,
    }
    print(json.dumps(summary), flush=True)
    ledger.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
