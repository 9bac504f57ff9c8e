"""Signature refusals of the status receiver, counted per route and minute
(`schema.webhook_refusals`): written by every receiver, read by the alert on them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from cdp_activation.ledger.base import LedgerBase, db_time, utc_now


class Refusals(LedgerBase):
    """Count and read the receiver's signature refusals."""

    def record_refusals(self, counts: Mapping[str, int]) -> None:
        """Add `counts` (route -> refusals) to this minute's counts."""
        rows = [(route, n) for route, n in sorted(counts.items()) if n > 0]
        if not rows:
            return
        minute = db_time(utc_now().replace(second=0, microsecond=0), self.dialect)
        mark = self._mark
        with self.engine.begin() as con:
            con.exec_driver_sql(
                f"INSERT INTO webhook_refusals (route, minute, refusals) VALUES ({mark}, "
                f"{mark}, {mark}) ON CONFLICT (route, minute) DO UPDATE SET "
                "refusals = webhook_refusals.refusals + excluded.refusals",
                [(route, minute, n) for route, n in rows],
            )

    def refusals_since(self, since: datetime) -> dict[str, int]:
        """Refusals per route in the minutes from `since`'s (inclusive) to now."""
        mark = self._mark
        start = db_time(since.replace(second=0, microsecond=0), self.dialect)
        with self.engine.connect() as con:
            rows = con.exec_driver_sql(
                "SELECT route, SUM(refusals) FROM webhook_refusals "
                f"WHERE minute >= {mark} GROUP BY route",
                (start,),
            ).fetchall()
        return {route: int(n) for route, n in rows}
