"""Group commit: many coroutines' writes in one database transaction, each waiting for its own.

Callers `await submit(items)` and return only once their items are durably written; a write that
returns a list (one result per item, as a claim does: the rows handed to each request) gives
each caller the results of its own items. While a
write is under way (in a worker thread, so the event loop goes on sending and receiving; SQLite
and psycopg release the GIL while they work), everything submitted meanwhile is queued and
written together by the next transaction. So a burst of callers costs a few transactions, and
no caller is told "written" before it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """`write(items)` for everything submitted since the last write, one write at a time."""

    def __init__(
        self,
        write: Callable[[list[T]], Any],
        name: str = "write",
        isolate: Callable[[Exception], bool] | None = None,
    ) -> None:
        """`isolate(error)`: whether a write of several callers that failed with `error`
        is made again one caller at a time, so that items the database refuses (a value
        too long, say) fail only the caller that brought them. Without it, or for errors it
        declines (the database itself unavailable: one more try each would only wait again),
        every caller of the write hears of the failure."""
        self._write = write
        self._name = name
        self._isolate = isolate
        self._queued: list[tuple[Sequence[T], asyncio.Future[list[Any] | None]]] = []
        self._draining: asyncio.Task[None] | None = None
        self.transactions = 0  # writes made (benchmarks, tests)

    async def submit(self, items: Sequence[T]) -> list[Any] | None:
        """Queue `items` and wait until they are written; a failed write raises here. Returns
        this caller's share of the write's results, when the write returns any."""
        if not items:
            return []
        future: asyncio.Future[list[Any] | None] = asyncio.get_running_loop().create_future()
        self._queued.append((items, future))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queued:
            queued, self._queued = self._queued, []
            try:
                results = await asyncio.to_thread(
                    self._write, [i for items, _ in queued for i in items]
                )
                self.transactions += 1
            except Exception as err:  # each caller decides; a failed write is never silent
                if len(queued) > 1 and self._isolate is not None and self._isolate(err):
                    await self._each_alone(queued)
                    continue
                log.warning("%s failed for %d caller(s): %s", self._name, len(queued), err)
                for _, future in queued:
                    if not future.done():
                        future.set_exception(err)
                continue
            offset = 0
            for items, future in queued:
                share = None
                if isinstance(results, list):
                    share = results[offset : offset + len(items)]
                    offset += len(items)
                if not future.done():
                    future.set_result(share)

    async def _each_alone(
        self, queued: list[tuple[Sequence[T], asyncio.Future[list[Any] | None]]]
    ) -> None:
        """Write each caller's items in a transaction of their own: the failure of one
        reaches only its caller."""
        for items, future in queued:
            try:
                results = await asyncio.to_thread(self._write, list(items))
                self.transactions += 1
            except Exception as err:
                log.warning("%s failed for a caller written alone: %s", self._name, err)
                if not future.done():
                    future.set_exception(err)
                continue
            if not future.done():
                future.set_result(results if isinstance(results, list) else None)
