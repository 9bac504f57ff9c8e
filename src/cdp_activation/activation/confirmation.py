"""Confirm before send: plan, then apply.

A real send of more than `confirm_above` recipients needs a preview (a dry run) of the same
activation and partition within the last `valid_hours`, and the number of recipients may not
have moved by more than `max_change` (a share) since that preview: what the marketer saw is
what goes out. Runs launched by a schedule or a sensor are the data engineers' automation and
are not asked (their guardrails are the blocking checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cdp_activation.settings import get_settings


@dataclass(frozen=True)
class Preview:
    """The latest dry run of an activation's partition: how many it would have messaged."""

    eligible: int
    at: datetime
    run_id: str


@dataclass(frozen=True)
class ConfirmPolicy:
    confirm_above: int = 1000  # recipients; a send this size or smaller needs no preview
    valid_hours: float = 24.0
    max_change: float = 0.10  # share of the preview's count


def confirmation_problem(
    activation: str,
    partition: str,
    eligible: int,
    preview: Preview | None,
    now: datetime,
    policy: ConfirmPolicy,
) -> str | None:
    """Why this real send of `eligible` recipients may not go ahead, or None."""
    if eligible <= policy.confirm_above:
        return None
    how = (
        f"Preview it first: launch {activation} for {partition} with dry_run: true (the "
        f"Launchpad's default, or `cdp-activation preview {activation} --partition "
        f"{partition}`), check the preview's metadata, then send."
    )
    if preview is None:
        return (
            f"this send would message {eligible:,} customers (now, or once their quiet hours "
            f"end), more than {policy.confirm_above:,} (CDP_CONFIRM_ABOVE), and {activation} "
            f"has no preview of {partition}. {how}"
        )
    age = now - preview.at
    if age > timedelta(hours=policy.valid_hours):
        return (
            f"the last preview of {activation} for {partition} is {_hours(age)} old, older than "
            f"{policy.valid_hours:g} h (CDP_PREVIEW_VALID_HOURS), and this send would message "
            f"{eligible:,} customers (now, or once their quiet hours end). {how}"
        )
    change = (eligible - preview.eligible) / max(preview.eligible, 1)
    if abs(change) > policy.max_change:
        return (
            f"{eligible:,} customers would be messaged (now, or once their quiet hours end), "
            f"but the preview of {preview.at:%Y-%m-%d %H:%M} UTC showed {preview.eligible:,} "
            f"({change:+.0%}, more "
            f"than {policy.max_change:.0%}, CDP_PREVIEW_MAX_CHANGE): the audience or its "
            f"consent changed since. {how}"
        )
    return None


def _hours(age: timedelta) -> str:
    return f"{age.total_seconds() / 3600:.1f} h"


def confirm_policy() -> ConfirmPolicy:
    """The confirm-before-send thresholds of the current environment."""
    settings = get_settings()
    return ConfirmPolicy(
        confirm_above=settings.confirm_above,
        valid_hours=settings.preview_valid_hours,
        max_change=settings.preview_max_change,
    )
