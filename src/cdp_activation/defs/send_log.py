"""Shared asset: the send log, the ledger exported to the warehouse for analysts."""

import dagster as dg

from cdp_activation.components.resources import LedgerResource, SendLogResource
from cdp_activation.feedback.send_log import (
    DECISION_COUNTS_TABLE,
    INBOUND_LOG_TABLE,
    OPT_OUTS_TABLE,
    SEND_LOG_TABLE,
)


@dg.asset(
    key="send_log",
    group_name="send_log",
    kinds={"sql"},
    description=f"Every send of every activation, exported from the ledger to the warehouse "
    f"table `{SEND_LOG_TABLE}` (one row per send in its latest state: step, channel, state, "
    "delivery status, fallback link and reason, holdouts), incrementally. For analysts to join "
    "to outcomes; no phone numbers or message texts. The customers' replies and opt-outs go "
    f"to `{INBOUND_LOG_TABLE}` and `{OPT_OUTS_TABLE}` the same way, and each run's decisions "
    f"counted to `{DECISION_COUNTS_TABLE}` (the funnel's first stages).",
)
def send_log(ledger: LedgerResource, send_log: SendLogResource) -> dg.MaterializeResult:
    export = send_log.export(ledger.ledger())
    replies = send_log.export_replies(ledger.ledger())
    counts = send_log.export_decision_counts(ledger.ledger())
    figures = ledger.ledger().replies_by_activation()
    table = ["| activation | customers who wrote back | opted out |", "|---|---:|---:|"]
    table += [
        f"| {name} | {f['replied']:,} | {f['opted_out']:,} |" for name, f in sorted(figures.items())
    ]
    return dg.MaterializeResult(
        metadata={
            "replies_by_activation": dg.MetadataValue.md("\n".join(table)),
            **{f"{table}_exported": done.exported for table, done in replies.items()},
            f"{DECISION_COUNTS_TABLE}_exported": counts.exported,
            "exported_rows": export.exported,
            "dagster/row_count": export.table_rows,
            "table": SEND_LOG_TABLE,
            "changed_since": export.since.isoformat() if export.since else "the beginning",
        }
    )


send_log_job = dg.define_asset_job("export_send_log", selection=dg.AssetSelection.assets(send_log))

send_log_schedule = dg.ScheduleDefinition(
    job=send_log_job,
    cron_schedule="*/15 * * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Export the ledger's new and changed sends every 15 minutes (off until turned on).",
)
