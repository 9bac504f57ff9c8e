"""When a run that succeeded is still worth an alert, and when a backlog is growing.

Plain functions of a delivery step's summary (`DeliverySummary.as_json`, as the deliveries
asset records it), the audience sizes and the activation's thresholds (`AlertsSpec`): each
finding is one sentence with its figures and the threshold it crossed.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from cdp_activation.spec import AlertsSpec


def degraded_findings(
    summary: Mapping[str, Any],
    thresholds: AlertsSpec,
    audience_size: int | None = None,
    earlier_audiences: Sequence[int] = (),
) -> list[str]:
    """What was wrong with a run that succeeded; [] when nothing was."""
    found: list[str] = []
    if summary.get("dry_run"):
        return found
    sent, failed, unknown = (int(summary.get(k) or 0) for k in ("sent", "failed", "unknown"))
    answered = sent + failed + unknown
    if answered >= thresholds.share_min_messages:
        codes = _top_codes(summary.get("error_codes") or {})
        if failed / answered > thresholds.max_failed_share:
            found.append(
                f"{failed:,} of {answered:,} answered messages failed "
                f"({failed / answered:.1%}, threshold {thresholds.max_failed_share:.1%})"
                + (f"; most common codes: {codes}" if codes else "")
            )
        if unknown / answered > thresholds.max_unknown_share:
            found.append(
                f"{unknown:,} of {answered:,} answered messages are unknown "
                f"({unknown / answered:.1%}, threshold {thresholds.max_unknown_share:.1%}): "
                "their answer was lost, they may have gone"
            )
    states = summary.get("ledger_states") or {}
    in_partition = sum(int(v) for v in states.values())
    dead = int(summary.get("dead_letter") or 0)
    if (
        in_partition >= thresholds.share_min_messages
        and dead / in_partition > thresholds.max_dead_letter_share
    ):
        found.append(
            f"{dead:,} of the partition's {in_partition:,} messages are dead letters "
            f"({dead / in_partition:.1%}, threshold {thresholds.max_dead_letter_share:.1%})"
        )
    if audience_size is not None and len(earlier_audiences) >= 2:
        usual = statistics.median(earlier_audiences)
        if usual and abs(audience_size - usual) / usual > thresholds.audience_change:
            found.append(
                f"the audience is {audience_size:,} where the last {len(earlier_audiences)} "
                f"runs' median is {usual:,.0f} ({(audience_size - usual) / usual:+.0%}, "
                f"threshold ±{thresholds.audience_change:.0%})"
            )
    configured = float(summary.get("configured_rate_per_second") or 0.0)
    rate = float(summary.get("throughput_per_second") or 0.0)
    if (
        configured
        and sent >= thresholds.rate_min_messages
        and rate < thresholds.min_rate_share * configured
    ):
        found.append(
            f"sent at {rate:,.1f} messages/s where the connectors' limits allow "
            f"{configured:,.1f}/s ({rate / configured:.0%}, threshold "
            f"{thresholds.min_rate_share:.0%}): a provider slowing down or throttling?"
        )
    paused = {k: v for k, v in (summary.get("accepted_as") or {}).items() if "paused" in k}
    if paused:
        found.append(
            f"{sum(paused.values()):,} messages accepted as paused: the provider paused their "
            "template (its quality fell); later runs stop sending it"
        )
    return found


def backlog_growing(history: Sequence[int], thresholds: AlertsSpec) -> bool:
    """True when the last `fallback_backlog_checks` counts of the backlog rose at each check
    and the newest is at least `fallback_backlog_min`."""
    n = thresholds.fallback_backlog_checks
    if len(history) < n:
        return False
    recent = list(history)[-n:]
    rising = all(b > a for a, b in itertools.pairwise(recent))
    return rising and recent[-1] >= thresholds.fallback_backlog_min


def _top_codes(codes: Mapping[str, int], n: int = 3) -> str:
    ranked = sorted(codes.items(), key=lambda kv: (-int(kv[1]), kv[0]))[:n]
    return ", ".join(f"{code} ({count:,})" for code, count in ranked)
