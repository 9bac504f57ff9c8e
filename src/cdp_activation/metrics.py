"""Prometheus metrics of the sending processes and the status receiver (docs/operations.md).

The figures a dashboard needs to see a send go wrong before a marketer does: messages by
activation, connector and outcome; provider latency; 429s and the Retry-After pauses they
caused; time waited on the rate limiter; the ledger's claim and record latency; status
webhooks by provider and status; signature refusals. No label ever holds a phone number, a
customer or a secret: only activation, connector, provider and outcome names.

A send runs in many processes (each Dagster step is one, and Celery or Kubernetes workers on
other machines), none of them living long enough to be scraped. So with `CDP_METRICS_DIR` set,
every process writes its figures into that directory (prometheus-client's multiprocess mode:
one memory-mapped file per process) and `/metrics` of the status receiver (`cdp-activation
webhooks serve`, running for as long as the deployment does) adds them all up. Unset, each
process keeps its own figures, and the receiver's `/metrics` shows the receiver's.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

# prometheus-client picks its storage when it is first imported: the directory must be
# known by then (this module is the project's only importer).
if _dir := os.environ.get("CDP_METRICS_DIR", "").strip():
    Path(_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", _dir)

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)

# Provider answers take from a few ms (a sandbox) to tens of seconds (a provider in trouble).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)

MESSAGES = Counter(
    "cdp_messages",
    "Messages answered by a provider, by outcome: sent, failed, unknown (the answer was lost), "
    "retry (a retryable answer: tried again later) or retry_later (its tries used up in this "
    "run: waits for a later one).",
    ["activation", "connector", "outcome"],
)
PROVIDER_LATENCY = Histogram(
    "cdp_provider_request_seconds",
    "Seconds a provider took to answer one request (a batch of messages, or one).",
    ["connector"],
    buckets=_LATENCY_BUCKETS,
)
THROTTLED = Counter(
    "cdp_provider_throttled",
    "Provider answers that carried a Retry-After (429 and some 503s); each pauses every "
    "request to that connector.",
    ["connector"],
)
RETRY_AFTER_SECONDS = Counter(
    "cdp_retry_after_wait_seconds",
    "Seconds of pause that providers' Retry-After answers imposed on a connector.",
    ["connector"],
)
LIMITER_WAIT = Histogram(
    "cdp_rate_limiter_wait_seconds",
    "Seconds a request waited for the connector's rate limit before it was claimed.",
    ["connector"],
    buckets=_WAIT_BUCKETS,
)
LEDGER_LATENCY = Histogram(
    "cdp_ledger_seconds",
    "Seconds a ledger transaction of the delivery took: claim (rows handed to a worker) or "
    "record (answers settled).",
    ["operation"],
    buckets=_WAIT_BUCKETS,
)
WEBHOOK_EVENTS = Counter(
    "cdp_webhook_events",
    "Status events received by the webhook receiver and stored, by provider route and status "
    "(delivered, read, failed, …; reply and template for inbound messages and template news).",
    ["provider", "status"],
)
WEBHOOK_REQUESTS = Counter(
    "cdp_webhook_requests",
    "Requests to the webhook receiver by provider route and HTTP status answered.",
    ["provider", "code"],
)
SIGNATURE_REFUSALS = Counter(
    "cdp_webhook_signature_refusals",
    "Webhooks refused for a missing, wrong or unverifiable signature (a secret that does not "
    "match the provider's, or someone forging reports).",
    ["provider"],
)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


@functools.cache
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: the engine counts every answered request,
    and the lookup (a lock and a dict of label tuples) would cost more than the count."""
    return metric.labels(*labels)


class timed:  # used as a function: `with timed(HISTOGRAM, "label"):`
    """Observe the seconds the block took into `histogram` (with `labels`)."""

    __slots__ = ("_began", "_child")

    def __init__(self, histogram: Histogram, *labels: str) -> None:
        self._child = child(histogram, *labels)
        self._began = 0.0

    def __enter__(self) -> None:
        self._began = time.perf_counter()

    def __exit__(self, *_: object) -> None:
        self._child.observe(time.perf_counter() - self._began)


def registry() -> CollectorRegistry:
    """What a scrape reads: every process's figures with `CDP_METRICS_DIR`, this process's
    own without."""
    if multiprocess_dir():
        collected = CollectorRegistry()
        multiprocess.MultiProcessCollector(collected)
        return collected
    return REGISTRY


def exposition() -> tuple[bytes, str]:
    """The text a scrape of `/metrics` answers, and its content type."""
    return generate_latest(registry()), CONTENT_TYPE_LATEST


def serve(port: int, host: str) -> None:
    """`/metrics` on a port of its own (CDP_METRICS_PORT), in a daemon thread: a network the
    providers' webhooks do not come from."""
    start_http_server(port, addr=host, registry=registry())
