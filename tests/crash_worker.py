"""A delivery run in its own process, for the crash test (tests/test_crash.py) to SIGKILL.

    python tests/crash_worker.py LEDGER SANDBOX_URL N [CONCURRENCY [line DEFERRED_UNTIL]]

LEDGER is a SQLite file or a database URL. Environment: CRASH_WORKER_LEASE (seconds, default
30), CRASH_WORKER_MAX_ATTEMPTS (default 4), CRASH_WORKER_RATE (messages/s, default 2000) and
CRASH_WORKER_TIMEOUT (the client's timeout, default 5 s), CRASH_WORKER_RATE_LIMIT_URL (a
Redis URL: the rate shared with every worker using it) and CRASH_WORKER_LINE_TEXTS (the LINE
rows' different texts, default 1: a batch is one multicast per text).

It does what a real run does on start, with the real `Ledger`, `deliver` and connectors: plan
the N rows (a no-op for keys already planned, so a restart never plans twice), turn rows that
gone workers left in flight into `unknown`, then claim and deliver whatever is due to the
sandbox at SANDBOX_URL. It prints `delivering <rows>` once it starts sending, so the test can
time its kill from there, and a JSON summary when it finishes (with `error` and exit status 3
when the delivery stopped early: provider down, interrupted).

`audience` is also used by tests/test_faults.py to build the same kind of rows.

With `line DEFERRED_UNTIL` (a Unix time) the rows go to LINE instead, all with one text (so in
multicasts of 500), and every fifth row is deferred until DEFERRED_UNTIL: a run after that time
finds them due among the others, so batches made afresh would not be the batches a killed run
had in the air. LINE de-duplicates on the retry key of a whole request, so rows a crash left in
flight are sent again (not given up as unknown), and must go out in the same request as before.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from cdp_activation.connectors import connector_from_settings
from cdp_activation.connectors.base import Connector, ConnectorError
from cdp_activation.delivery.engine import DeliveryOptions, DeliveryReport, DeliveryScope, deliver
from cdp_activation.ledger import LeaseLost, Ledger
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


def line_audience(n: int, deferred_until: datetime | None = None, texts: int = 1) -> pl.DataFrame:
    """N LINE users sharing `texts` different texts (one multicast per text and batch); every
    fifth deferred until `deferred_until` when given."""
    return pl.DataFrame(
        {
            "customer_id": list(range(1, n + 1)),
            "phone_e164": [f"+8190{i:08d}" for i in range(1, n + 1)],
            "recipient": [f"U{i:032x}" for i in range(1, n + 1)],
            "channel": ["line"] * n,
            "connector": ["line"] * n,
            "step": ["initial"] * n,
            "template_name": [None] * n,
            "template_language": [None] * n,
            "variables": [None] * n,
            "body": [f"Spring sale: 20% off everything this week ({i % texts})" for i in range(n)],
            "not_before": [
                deferred_until if deferred_until and i % 5 == 0 else None for i in range(1, n + 1)
            ],
        },
        schema_overrides={
            "variables": pl.List(pl.String),
            "template_name": pl.String,
            "template_language": pl.String,
            "not_before": pl.Datetime("us", "UTC"),
        },
    )


HANDOFF_AT = "2026-12-05T10:00:00Z"  # the attribute's value every profile must end with


def handoff_audience(n: int) -> pl.DataFrame:
    """N customers handed to a Braze Canvas (`braze_audience`), a third through SMS's group."""
    channels = ["sms" if i % 3 == 0 else "whatsapp" for i in range(1, n + 1)]
    return pl.DataFrame(
        {
            "customer_id": list(range(1, n + 1)),
            "phone_e164": [f"+4479{i:08d}" for i in range(1, n + 1)],
            "channel": channels,
            "connector": ["braze_audience"] * n,
            "step": ["initial"] * n,
            "template_name": [f"audience:cdp_winback_at:winback_{c}_group" for c in channels],
            "template_language": [HANDOFF_AT] * n,
            "variables": [[f"Name{i}", f"CODE{i}"] for i in range(1, n + 1)],
            "variable_names": [["first_name", "offer_code"]] * n,
            "body": [None] * n,
        },
        schema_overrides={"variables": pl.List(pl.String), "body": pl.String},
    )


def sandbox_connectors(url: str) -> dict[str, Connector]:
    """Both connectors, built from settings pointing at the sandbox (as tests/conftest.py does:
    no `.env`, no tokens, so the sandbox's published credentials are used)."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]  # pydantic-settings init-only option
        sandbox=True,
        meta_base_url=f"{url}/meta",
        twilio_base_url=f"{url}/twilio",
        line_base_url=f"{url}/line",
        braze_audience_base_url=f"{url}/braze",
        braze_audience_api_key=None,
        meta_access_token=None,
        twilio_auth_token=None,
        line_channel_access_token=None,
    )
    names = (*CONNECTORS, "line", "braze_audience")
    return {name: connector_from_settings(name, settings) for name in names}


def main(argv: list[str]) -> int:
    ledger_at, url, n = argv[1], argv[2], int(argv[3])
    concurrency = int(argv[4]) if len(argv) > 4 else DeliveryOptions.concurrency
    line = len(argv) > 5 and argv[5] == "line"
    handoff = len(argv) > 5 and argv[5] == "braze_audience"
    ledger = Ledger(ledger_at if "://" in ledger_at else f"sqlite:///{ledger_at}")
    if handoff:
        ledger.plan(ACTIVATION, PARTITION, handoff_audience(n))
        recovered = ledger.recover_interrupted(ACTIVATION, PARTITION, idempotent=[argv[5]])
    elif line:
        deferred_until = datetime.fromtimestamp(float(argv[6]), UTC)
        texts = int(os.environ.get("CRASH_WORKER_LINE_TEXTS", 1))
        ledger.plan(ACTIVATION, PARTITION, line_audience(n, deferred_until, texts))
        recovered = ledger.recover_interrupted(ACTIVATION, PARTITION, idempotent=["line"])
    else:
        ledger.plan(ACTIVATION, PARTITION, audience(n))
        recovered = ledger.recover_interrupted(ACTIVATION, PARTITION)
    due = ledger.due_counts(ACTIVATION, PARTITION, "initial", datetime.now(UTC))
    print(f"delivering {sum(due.values())} (recovered {recovered})", flush=True)
    options = DeliveryOptions(
        concurrency=concurrency,
        rate_per_second=500 if line else float(os.environ.get("CRASH_WORKER_RATE", 2000)),
        backoff_initial=0.02,
        backoff_max=0.2,
        timeout_seconds=float(os.environ.get("CRASH_WORKER_TIMEOUT", 5)),
        lease_seconds=float(os.environ.get("CRASH_WORKER_LEASE", 30)),
        max_attempts=int(os.environ.get("CRASH_WORKER_MAX_ATTEMPTS", 4)),
        rate_limit_url=os.environ.get("CRASH_WORKER_RATE_LIMIT_URL") or None,
    )
    error = None
    try:
        report = deliver(
            ledger, DeliveryScope(ACTIVATION, PARTITION), sandbox_connectors(url), options
        )
    except (ConnectorError, LeaseLost) as stopped:
        error = f"{type(stopped).__name__}: {stopped}"
        report = getattr(stopped, "report", None) or DeliveryReport()
    summary = {
        "sent": report.sent,
        "failed": report.failed,
        "unknown": report.unknown,
        "retried": report.retried,
        "recovered": recovered,
        "error": error,
    }
    print(json.dumps(summary), flush=True)
    ledger.dispose()
    return 0 if error is None else 3


WORKER = Path(__file__)


class Worker:
    """This script in its own process, its stdout read by a thread so waiting for a line can
    time out. `env` adds CRASH_WORKER_* settings."""

    def __init__(
        self,
        ledger: Path | str,
        url: str,
        concurrency: int,
        *extra: str,
        n: int,
        env: dict[str, str] | None = None,
    ) -> None:
        # Its stderr (the connectors' warnings, or why it died) goes to a file, shown when a
        # line it should print never comes.
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  # lives with the worker
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), str(ledger), url, str(n), str(concurrency), *extra],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.strip())

    def wait_for(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line.startswith(prefix):
                return line
        self.stderr.seek(0)
        said = self.stderr.read()[-3000:]
        raise TimeoutError(
            f"the worker did not print {prefix!r} within {timeout} s (exit status "
            f"{self.process.poll()}); its stderr ends:\n{said}"
        )

    def summary(self, timeout: float) -> dict[str, object]:
        """The JSON summary it prints when its delivery ends."""
        return json.loads(self.wait_for("{", timeout))

    def signal(self, sig: signal.Signals = signal.SIGKILL) -> bool:
        """Send `sig` and wait for the process to end; True if it was still running."""
        running = self.process.poll() is None
        if running:
            self.process.send_signal(sig)
        self.process.wait(60)
        return running

    def kill(self) -> bool:
        return self.signal(signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
