"""What the metrics and the JSON batch lines cost the delivery engine, per answered request.

`python -m bench observability [--requests N]` from the repository root. For each mode, in a
fresh subprocess (its own prometheus-client storage): the instrumentation the engine adds to
one answered request (`_Delivery._observe`: the messages counter by outcome and the batch log
line; the provider-latency and rate-limiter histograms; the ledger claim and record
histograms), at batch 1 and batch 200, against the same loop without it (the baseline,
same run). Modes: metrics in the process's own registry (no CDP_METRICS_DIR); every process
into CDP_METRICS_DIR (prometheus-client's multiprocess files, what production runs use); and
that with CDP_LOG_FORMAT=json (one JSON line per request, written to /dev/null).

CPU time is the child's own (`resource.getrusage`). Figures go to
bench/results_observability.md; compare them with the engine's whole CPU per recipient in
bench/results_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from bench.delivery import ROOT, _cpu_model
from bench.index import publish

RESULTS = ROOT / "bench" / "results_observability.md"
MODES = {
    "in-process registry": {},
    "CDP_METRICS_DIR (multiprocess)": {"CDP_METRICS_DIR": "<tmp>"},
    "CDP_METRICS_DIR + CDP_LOG_FORMAT=json": {"CDP_METRICS_DIR": "<tmp>", "CDP_LOG_FORMAT": "json"},
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(requests: int, batch: int) -> dict[str, float]:
    """In this process: µs of CPU per request with and without the instrumentation."""
    import logging

    from cdp_activation import logs, metrics
    from cdp_activation.delivery.engine import DeliveryOptions, DeliveryScope, _Delivery

    sink = open(os.devnull, "w")  # noqa: SIM115  # the JSON lines' stream, for the process's life
    if logs.configure():
        for handler in logging.getLogger().handlers:
            handler.setStream(sink)  # type: ignore[attr-defined]
    run = _Delivery(DeliveryOptions(), DeliveryScope("bench", "2026-12-06", run_id="r1"))
    limiter_wait = metrics.child(metrics.LIMITER_WAIT, "meta_whatsapp")
    request_seconds = metrics.child(metrics.PROVIDER_LATENCY, "meta_whatsapp")

    def loop(instrumented: bool) -> float:
        began = _cpu()
        for i in range(requests):
            before = run._counts()
            run.report.sent += batch - 1
            run.report.failed += 1
            if not instrumented:
                continue
            # As the engine does per request (engine.py: send_from, claim, record).
            queued = time.perf_counter()
            limiter_wait.observe(time.perf_counter() - queued)
            with metrics.timed(metrics.LEDGER_LATENCY, "claim"):
                pass
            request_seconds.observe(0.1 + (i % 7) / 100)
            run._observe("meta_whatsapp", before, batch, None)
            with metrics.timed(metrics.LEDGER_LATENCY, "record"):
                pass
        return (_cpu() - began) / requests * 1e6

    loop(True)  # warm: label children created, files mapped
    baseline = loop(False)
    instrumented = loop(True)
    return {"baseline_us": baseline, "instrumented_us": instrumented}


def main(argv: list[str]) -> int:
    if argv[:1] == ["_child"]:
        print(json.dumps(child(int(argv[1]), int(argv[2]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench observability")
    parser.add_argument("--requests", type=int, default=100_000)
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for mode, extra in MODES.items():
        for batch in (1, 200):
            with tempfile.TemporaryDirectory() as tmp:
                env = {
                    k: v
                    for k, v in os.environ.items()
                    if k not in ("CDP_METRICS_DIR", "CDP_LOG_FORMAT", "PROMETHEUS_MULTIPROC_DIR")
                }
                env.update({k: v.replace("<tmp>", tmp) for k, v in extra.items()})
                done = subprocess.run(
                    [
                        *(sys.executable, "-m", "bench", "observability", "_child"),
                        str(args.requests),
                        str(batch),
                    ],
                    env=env,
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=True,
                )
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            cost = figures["instrumented_us"] - figures["baseline_us"]
            rows.append({"mode": mode, "batch": batch, **figures, "cost_us": cost})
            print(f"{mode}, batch {batch}: {cost:.1f} µs a request", file=sys.stderr)
    publish(RESULTS, report(rows, args))
    return 0


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Observability: the metrics' and JSON logs' cost per answered request",
        "",
        f"Measured {now} with `python -m bench observability --requests {args.requests}` on "
        f"{_cpu_model()} ({os.cpu_count()} cores).",
        "",
        "CPU µs per request of the delivery engine's instrumentation (messages counter and "
        "batch log line, provider and limiter histograms, ledger claim and record histograms) "
        "against the same loop without it, in the same process. Per recipient: divide by the "
        "batch size.",
        "",
        "| mode | batch | baseline µs/request | instrumented µs/request | cost µs/request "
        "| cost µs/recipient |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['baseline_us']:.2f} | "
            f"{r['instrumented_us']:.2f} | {r['cost_us']:.1f} | {r['cost_us'] / r['batch']:.2f} |"
        )
    lines += [
        "",
        "Compare the cost per recipient with the engine's whole CPU per recipient in "
        "bench/results_throughput.md (`python -m bench throughput`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
