"""Log lines an operator can ship as they are: `CDP_LOG_FORMAT=json` (docs/operations.md).

With it, every log line of the project's processes (the CLI, the status receiver, Dagster's
step processes, its daemon) is one JSON object on stderr: `time`, `level`, `logger`,
`message`, and the line's own fields. Two kinds carry the figures a log pipeline counts on:

- `event: "batch"`, one per answered request of a delivery (logger `cdp_activation.batches`):
  activation, partition, step, run_id, connector, messages, and how many were sent, failed,
  unknown, retry, retry_later or refused, with the last error when something went wrong;
- `event: "run_summary"`, one per delivery step (logger `cdp_activation.runs`): the step's
  `DeliverySummary`, the figures its Dagster metadata shows.

Phone numbers are masked in every line (`masking.mask_phones_in`), in the message and in its
fields; no line carries a customer's number, name or a credential. Without the variable, text
lines as before, and no batch lines (one per request would drown a terminal).
"""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import Any

from cdp_activation.errors import SettingsError
from cdp_activation.masking import mask_phones_in

BATCHES = logging.getLogger("cdp_activation.batches")
RUNS = logging.getLogger("cdp_activation.runs")
BATCHES.setLevel(logging.WARNING)  # on with CDP_LOG_FORMAT=json (configure)

_HANDLER_NAME = "cdp-json"
_IDENTIFIERS = frozenset({"run_id", "partition", "activation", "step", "connector", "worker"})
_NOISY = ("httpx", "httpcore", "alembic", "urllib3", "slack_sdk", "aiosmtpd")
# LogRecord's own attributes: the rest of a record's __dict__ are a line's fields.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def log_format() -> str:
    value = os.environ.get("CDP_LOG_FORMAT", "").strip().lower() or "text"
    if value not in ("text", "json"):
        raise SettingsError(f"CDP_LOG_FORMAT must be text or json, got {value!r}")
    return value


class MaskPhones(logging.Filter):
    """Masks phone numbers in a record's message, its fields (nested ones too) and its
    traceback, before any handler writes it. Identifiers (a run's id, a partition) are left
    as they are: a UUID can hold eight digits in a row."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        masked = mask_phones_in(text)
        if masked != text or record.args:
            record.msg, record.args = masked, None
        if record.exc_info:  # rendered here, masked, so no formatter renders it unmasked
            rendered = logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
            record.exception = mask_phones_in(rendered)
        for key, value in list(vars(record).items()):
            if key not in _RESERVED and key not in _IDENTIFIERS:
                setattr(record, key, _masked(value))
        return True


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_phones_in(value)
    if isinstance(value, dict):
        return {k: v if k in _IDENTIFIERS else _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


def configure(level: int = logging.INFO) -> bool:
    """JSON lines on stderr for the whole process when CDP_LOG_FORMAT=json; True if so. Safe
    to call more than once (one handler)."""
    if log_format() != "json":
        return False
    root = logging.getLogger()
    if any(h.get_name() == _HANDLER_NAME for h in root.handlers):
        return True
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(json_formatter())
    handler.addFilter(MaskPhones())
    # Text handlers someone else installed (Dagster's, uvicorn's) keep theirs; the root
    # speaks JSON.
    root.handlers = [h for h in root.handlers if not isinstance(h, logging.StreamHandler)]
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > level:
        root.setLevel(level)
    BATCHES.setLevel(logging.INFO)
    # Libraries that say a line per request or migration step at INFO keep to warnings: the
    # batch lines already count every request.
    for noisy in _NOISY:
        if logging.getLogger(noisy).level == logging.NOTSET:
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return True


class LinesToLog(io.TextIOBase):
    """A text stream whose every line becomes a log record (`event: "console"`): the CLI's
    words for people (tables, warnings, a `validate` report) as JSON lines too."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self._logger = logger
        self._partial = ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self._logger.info(line.rstrip(), extra={"event": "console"})
        return len(text)

    def flush(self) -> None:
        if self._partial.strip():
            self._logger.info(self._partial.rstrip(), extra={"event": "console"})
        self._partial = ""


def run_summary(summary: dict[str, Any]) -> None:
    """The `run_summary` line of a delivery step (figures only: see `DeliverySummary`)."""
    RUNS.info(
        "%s %s (%s): sent %s, failed %s, unknown %s, dead letter %s",
        summary.get("activation"),
        summary.get("partition"),
        summary.get("step", "initial"),
        summary.get("sent", 0),
        summary.get("failed", 0),
        summary.get("unknown", 0),
        summary.get("dead_letter", 0),
        extra={"event": "run_summary", **{k: v for k, v in summary.items() if k not in _RESERVED}},
    )
