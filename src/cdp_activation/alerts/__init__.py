"""Alerts: what went wrong with a send, told to Slack, e-mail or a JSON webhook.

Dagster's own sensors decide when (`components/alerting.py`, `defs/alerts.py`); this package
is the plain Python they call: `model` (an alert and its text), `conditions` (when a run that
succeeded is degraded, when a backlog grows) and `destinations` (delivering an alert without
ever failing or slowing anything else). Where alerts go is the deployment's (CDP_ALERT_*);
the thresholds are each activation's (`alerts:` in defs.yaml). docs/operations.md says what
each alert means and what to do.
"""
