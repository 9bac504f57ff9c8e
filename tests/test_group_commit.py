"""The group commit's failures: a write of several callers that the database refused for one
caller's items is made again caller by caller, so only that caller fails; one that failed
because the database itself is unavailable is not (each caller would only wait again)."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from cdp_activation.feedback.receiver import _not_the_database_itself
from cdp_activation.group_commit import GroupCommit


def run_callers(error: Exception) -> tuple[list[object], list[list[str]]]:
    """Five callers submitting at once to a write that refuses any batch holding "bad" with
    `error`; what each caller got, and the batches the write was asked for."""
    asked: list[list[str]] = []

    def write(items: list[str]) -> list[str]:
        asked.append(items)
        if "bad" in items:
            raise error
        return [f"ok:{i}" for i in items]

    async def main() -> list[object]:
        group = GroupCommit(write, "test", isolate=_not_the_database_itself)
        callers = [["a"], ["b1", "b2"], ["bad"], ["d"], ["e"]]
        # Submitted in one turn of the loop: one write for all five.
        return await asyncio.gather(*(group.submit(c) for c in callers), return_exceptions=True)

    return asyncio.run(main()), asked


def test_a_caller_whose_items_are_refused_fails_alone() -> None:
    refused = sa.exc.DataError("INSERT …", {}, Exception("value too long"))
    results, asked = run_callers(refused)
    assert results[0] == ["ok:a"] and results[1] == ["ok:b1", "ok:b2"]
    assert results[2] is refused
    assert results[3:] == [["ok:d"], ["ok:e"]]
    # Once together (refused), then each caller alone.
    together = ["a", "b1", "b2", "bad", "d", "e"]
    assert asked == [together, ["a"], ["b1", "b2"], ["bad"], ["d"], ["e"]]


def test_a_database_that_is_not_there_fails_every_caller_at_once() -> None:
    down = sa.exc.OperationalError("INSERT …", {}, Exception("database is locked"))
    results, asked = run_callers(down)
    assert all(r is down for r in results)
    assert asked == [["a", "b1", "b2", "bad", "d", "e"]]  # not tried again caller by caller
