"""Confirm before send: which real sends need a (recent, still accurate) preview."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from cdp_activation.activation.confirmation import ConfirmPolicy, Preview, confirmation_problem

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
POLICY = ConfirmPolicy(confirm_above=1000, valid_hours=24, max_change=0.10)


def problem(eligible: int, preview: Preview | None) -> str | None:
    return confirmation_problem("winback", "2026-12-02", eligible, preview, NOW, POLICY)


def test_a_small_send_needs_no_preview() -> None:
    assert problem(1000, None) is None


def test_a_large_send_without_a_preview_is_refused_with_what_to_do() -> None:
    message = problem(1001, None)
    assert message is not None
    # The same count the preview shows: now, or once their quiet hours end.
    assert "1,001 customers (now, or once their quiet hours end), more than 1,000" in message
    assert "has no preview of 2026-12-02" in message
    assert "dry_run: true" in message and "cdp-activation preview winback" in message


@pytest.mark.parametrize(
    ("eligible", "previewed", "hours_ago", "refused_because"),
    [
        (5000, 5000, 1, None),
        (5400, 5000, 1, None),  # +8%: within 10%
        (4600, 5000, 23.9, None),
        (5600, 5000, 1, "(+12%, more than 10%"),
        (4000, 5000, 1, "(-20%, more than 10%"),
        (5000, 5000, 25, "is 25.0 h old, older than 24 h"),
    ],
)
def test_the_preview_must_be_recent_and_still_accurate(
    eligible: int, previewed: int, hours_ago: float, refused_because: str | None
) -> None:
    preview = Preview(eligible=previewed, at=NOW - timedelta(hours=hours_ago), run_id="r")
    message = problem(eligible, preview)
    if refused_because is None:
        assert message is None
    else:
        assert message is not None and refused_because in message
