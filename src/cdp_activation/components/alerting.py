"""The alert sensors: Dagster's run-failure and run-status sensors, and two that look at the
ledger, telling the CDP_ALERT_* destinations (alerts/; docs/operations.md).

- `alert_on_run_failure`: any run of the code location that failed, or was blocked by a
  blocking asset check (which check, on which asset, and why);
- `<activation>_degraded_run_alert`: a run of the activation that succeeded but crossed its
  `alerts:` thresholds (failed, unknown or dead-letter share; audience size off its usual
  range; send rate far below the limits; a paused template);
- `<activation>_fallback_backlog_alert`: first messages due a fallback piling up, check
  after check;
- `alert_on_signature_refusals`: the receivers refusing many webhooks' signatures (a wrong
  secret, or forged reports).

None is defined until a destination is set (alerts are off by default). Each alert names the
activation, partition and figures and links to the run; none carries a phone number or a
secret. Run-status sensors see each run once (Dagster's cursor); the ledger sensors keep in
their cursor what they already told.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
from pydantic import SecretStr

from cdp_activation.activation import run as activation_run
from cdp_activation.alerts import model
from cdp_activation.alerts.conditions import backlog_growing, degraded_findings
from cdp_activation.alerts.destinations import Destinations, Dispatcher
from cdp_activation.components.resources import LedgerResource
from cdp_activation.components.run_events import run_failure_message, step_failure_message
from cdp_activation.feedback import fallback
from cdp_activation.masking import masked, redact_secrets
from cdp_activation.settings import get_settings


def _dispatcher(context: Any) -> Dispatcher:
    return Dispatcher(Destinations.from_settings(get_settings()), context.log)


def _tell(context: Any, alerts: list[model.Alert]) -> bool:
    """Send `alerts` to every destination and say so in the sensor's log; True when at least
    one destination took each of them (a missed alert is then not marked as told)."""
    dispatcher = _dispatcher(context)
    took = all([bool(dispatcher.send(_without_secrets(alert))) for alert in alerts])
    for name, kind in dispatcher.delivered:
        context.log.info(f"told {name}: {kind}")
    return took


def _without_secrets(alert: model.Alert) -> model.Alert:
    """Findings come from error messages: any configured secret, or a URL's password, that
    one echoed is replaced (phone numbers are masked by the alert itself)."""
    settings = get_settings()
    secrets = [
        value.get_secret_value()
        for value in vars(settings).values()
        if isinstance(value, SecretStr) and value.get_secret_value()
    ]
    return dataclasses.replace(
        alert,
        findings=[
            redact_secrets(_URL.sub(lambda m: masked(m.group()), f), secrets)
            for f in alert.findings
        ],
    )


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]+")


def _checks_failed(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """The blocking checks of the run that did not pass: 'check on asset: why'."""
    failed = []
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation: Any = entry.dagster_event.event_specific_data if entry.dagster_event else None
        if evaluation is None or evaluation.passed or not getattr(evaluation, "blocking", True):
            continue
        failed.append(
            f"check {evaluation.check_name} on {evaluation.asset_key.to_user_string()} "
            f"failed: {evaluation.description or 'no description'}"
        )
    return failed


def failure_alert(
    instance: dg.DagsterInstance, run: dg.DagsterRun, step_failures: Sequence[Any], event: Any
) -> model.Alert:
    """The alert of a failed run: blocked by a check, or failed with its step's reason."""
    tags = run.tags
    activation = tags.get("activation")
    blocked = _checks_failed(instance, run.run_id)
    reasons = blocked or [step_failure_message(e) for e in step_failures]
    if not reasons and event is not None:
        reasons = [run_failure_message(event)]
    what = activation or run.job_name
    return model.Alert(
        kind=model.RUN_BLOCKED if blocked else model.RUN_FAILED,
        title=f"{what}: run {'blocked by a check' if blocked else 'failed'}, nothing more sent",
        activation=activation,
        partition=tags.get("dagster/partition"),
        findings=[r.splitlines()[0][:500] for r in reasons] or ["the run failed"],
        figures={"job": run.job_name},
        run_id=run.run_id,
        link=model.run_link(get_settings().dagster_ui_url, run.run_id),
    )


def _materializations(instance: dg.DagsterInstance, run_id: str) -> dict[str, dict[str, Any]]:
    """The run's materialisations: the asset's last key part -> its metadata's values."""
    found: dict[str, dict[str, Any]] = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = entry.asset_materialization
        if materialization is not None:
            found[materialization.asset_key.path[-1]] = {
                k: v.value for k, v in materialization.metadata.items()
            }
    return found


def _earlier_audiences(
    instance: dg.DagsterInstance, key: dg.AssetKey, run_id: str, n: int
) -> list[int]:
    records = instance.fetch_materializations(key, limit=n + 1, ascending=False).records
    sizes = []
    for record in records:
        materialization = record.asset_materialization
        if record.run_id == run_id or materialization is None:
            continue
        size = materialization.metadata.get("audience_size")
        if size is not None:
            sizes.append(int(size.value))  # type: ignore[arg-type]
    return sizes[:n]


def degraded_alert(
    instance: dg.DagsterInstance, run: dg.DagsterRun, activation: activation_run.Activation
) -> model.Alert | None:
    """The alert of a run of `activation` that succeeded but crossed its thresholds."""
    thresholds = activation.spec.alerts
    done = _materializations(instance, run.run_id)
    # The delivery step's summary: the first message's (deliveries) or the fallback's.
    summary = next(
        (
            done[step]["summary"]
            for step in ("deliveries", "fallback")
            if isinstance(done.get(step, {}).get("summary"), dict)
        ),
        None,
    )
    if summary is None or summary.get("dry_run"):
        return None
    audience = done.get("audience", {}).get("audience_size")
    earlier = (
        _earlier_audiences(
            instance,
            dg.AssetKey([activation.name, "audience"]),
            run.run_id,
            thresholds.history_runs,
        )
        if audience is not None
        else []
    )
    findings = degraded_findings(summary, thresholds, audience, earlier)
    if not findings:
        return None
    figures = {k: summary.get(k) for k in ("sent", "failed", "unknown", "dead_letter")}
    figures["messages_per_second"] = summary.get("throughput_per_second")
    if audience is not None:
        figures["audience"] = audience
    return model.Alert(
        kind=model.DEGRADED,
        title=f"{activation.name}: run succeeded but degraded",
        activation=activation.name,
        partition=run.tags.get("dagster/partition") or summary.get("partition"),
        findings=findings,
        figures=figures,
        run_id=run.run_id,
        link=model.run_link(get_settings().dagster_ui_url, run.run_id),
    )


def activation_alert_sensors(
    activation: activation_run.Activation, jobs: list[Any]
) -> list[dg.SensorDefinition]:
    """The activation's own alert sensors; none while no destination is set."""
    settings = get_settings()
    if not settings.alerts_on():
        return []
    name = activation.name

    job_names = {job.name for job in jobs}

    @dg.run_status_sensor(
        name=f"{name}_degraded_run_alert",
        run_status=dg.DagsterRunStatus.SUCCESS,
        # Every location's runs, filtered by job name here: runs the CLI executes (in its
        # own process, not launched from a code location) carry no origin Dagster could
        # match them on.
        monitor_all_code_locations=True,
        minimum_interval_seconds=settings.alert_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Alerts when a run of {name} succeeded but crossed its `alerts:` "
        "thresholds (failed, unknown or dead-letter share, audience size, send rate, a "
        "paused template).",
    )
    def degraded(context: dg.RunStatusSensorContext) -> None:
        # None, never a SkipReason: a run-status sensor that returns something stops its
        # tick at that run, and this one sees every run of the instance.
        if context.dagster_run.job_name not in job_names:
            return
        alert = degraded_alert(context.instance, context.dagster_run, activation)
        if alert is not None:
            _tell(context, [alert])

    sensors: list[dg.SensorDefinition] = [degraded]
    if activation.spec.channel_plan.fallback is not None:
        sensors.append(_backlog_sensor(activation, settings.alert_interval_seconds))
    return sensors


def _backlog_sensor(activation: activation_run.Activation, interval: int) -> dg.SensorDefinition:
    name = activation.name
    thresholds = activation.spec.alerts

    @dg.sensor(
        name=f"{name}_fallback_backlog_alert",
        minimum_interval_seconds=max(interval, 60),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Alerts when {name}'s first messages due a fallback and not yet decided "
        f"grew at each of the last {thresholds.fallback_backlog_checks} checks to at least "
        f"{thresholds.fallback_backlog_min} (the fallback is not keeping up).",
    )
    def backlog(context: dg.SensorEvaluationContext, ledger: LedgerResource) -> dg.SkipReason:
        state = json.loads(context.cursor or "{}")
        store = ledger.ledger()
        try:
            pending = fallback.backlog(activation, store, datetime.now(UTC))
        finally:
            store.dispose()
        history = [*state.get("history", []), pending][-thresholds.fallback_backlog_checks :]
        growing = backlog_growing(history, thresholds)
        alerts = []
        if growing and not state.get("told"):
            alerts.append(
                model.Alert(
                    kind=model.FALLBACK_BACKLOG,
                    title=f"{name}: fallback backlog growing",
                    activation=name,
                    findings=[
                        "first messages due a fallback and not yet decided, at each of the "
                        f"last checks: {' → '.join(f'{n:,}' for n in history)}; is the "
                        f"{name}_fallback sensor running and are its runs succeeding?"
                    ],
                    figures={"backlog": pending},
                )
            )
        told = _tell(context, alerts) if alerts else bool(state.get("told"))
        # Told once per growth (again only after it stopped growing); not told while no
        # destination took it: the next check tries again.
        context.update_cursor(json.dumps({"history": history, "told": growing and told}))
        return dg.SkipReason(f"backlog {pending:,}" + (": told" if alerts and told else ""))

    return backlog


def global_alert_sensors() -> list[dg.SensorDefinition]:
    """The code location's alert sensors; none while no destination is set."""
    settings = get_settings()
    if not settings.alerts_on():
        return []
    interval = settings.alert_interval_seconds

    @dg.run_failure_sensor(
        name="alert_on_run_failure",
        minimum_interval_seconds=interval,
        monitor_all_code_locations=True,  # the CLI's runs too (see the degraded-run sensor)
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Alerts when any run of this code location fails or is blocked by a check.",
    )
    def alert_on_run_failure(context: dg.RunFailureSensorContext) -> None:
        # None, never a SkipReason: see the degraded-run sensor.
        job = context.dagster_run.job_name
        if not context.repository_def or not context.repository_def.has_job(job):
            return
        alert = failure_alert(
            context.instance,
            context.dagster_run,
            context.get_step_failure_events(),
            context.failure_event,
        )
        _tell(context, [alert])

    @dg.sensor(
        name="alert_on_signature_refusals",
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Alerts when the status receivers refused many webhooks' signatures "
        "(CDP_ALERT_SIGNATURE_REFUSALS in CDP_ALERT_REFUSAL_MINUTES): a wrong signing secret, "
        "or someone forging delivery reports.",
    )
    def alert_on_signature_refusals(
        context: dg.SensorEvaluationContext, ledger: LedgerResource
    ) -> dg.SkipReason:
        store = ledger.ledger()
        try:
            alert, cursor = refusals_alert(store, context.cursor, datetime.now(UTC))
        finally:
            store.dispose()
        if alert is None:
            return dg.SkipReason("refusals below the threshold")
        if _tell(context, [alert]) and cursor is not None:
            context.update_cursor(cursor)  # quiet for a window, once told
            return dg.SkipReason("told")
        return dg.SkipReason("no destination took the alert: trying again at the next check")

    return [alert_on_run_failure, alert_on_signature_refusals]


def refusals_alert(
    store: Any, cursor: str | None, now: datetime
) -> tuple[model.Alert | None, str | None]:
    """The signature-refusals alert when the receivers refused at least
    CDP_ALERT_SIGNATURE_REFUSALS in the last CDP_ALERT_REFUSAL_MINUTES, and the new cursor:
    one alert per window while it lasts."""
    settings = get_settings()
    window = timedelta(minutes=settings.alert_refusal_minutes)
    state = json.loads(cursor or "{}")
    refused = store.refusals_since(now - window)
    total = sum(refused.values())
    quiet_until = state.get("quiet_until")
    if total < settings.alert_signature_refusals or (
        quiet_until is not None and now < datetime.fromisoformat(quiet_until)
    ):
        return None, None
    alert = model.Alert(
        kind=model.SIGNATURE_REFUSALS,
        title="status receiver refusing webhook signatures",
        findings=[
            f"{total:,} webhooks refused for their signature in the last "
            f"{settings.alert_refusal_minutes} min (threshold "
            f"{settings.alert_signature_refusals:,}): "
            + ", ".join(f"{route} {n:,}" for route, n in sorted(refused.items()))
            + ". A signing secret that does not match the provider's (delivery reports are "
            "being lost), or someone forging reports."
        ],
        figures={"refused": total, **{f"refused_{r}": n for r, n in sorted(refused.items())}},
    )
    return alert, json.dumps({"quiet_until": (now + window).isoformat()})
