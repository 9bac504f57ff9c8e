"""The code location's alert sensors (components/alerting.py): a failed or blocked run of any
job, and the receivers refusing many signatures. Each activation adds its own (a degraded
run, a growing fallback backlog). Off until CDP_ALERT_* name a destination."""

import dagster as dg

from cdp_activation.components.alerting import global_alert_sensors


@dg.definitions
def alerts() -> dg.Definitions:
    return dg.Definitions(sensors=global_alert_sensors())
