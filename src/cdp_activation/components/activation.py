"""ActivationComponent: one `defs.yaml` -> the assets, checks, job and schedule of an activation.

The component only wires Dagster to the plain modules (`activation_run` does the work), so
everything here is naming, configuration and metadata.
"""

import os
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import dagster as dg
import polars as pl
from pydantic import Field, create_model

from cdp_activation.activation import events
from cdp_activation.activation import run as run
from cdp_activation.activation.confirmation import Preview, confirm_policy, confirmation_problem
from cdp_activation.audience.sql import sql_dialect
from cdp_activation.components import fan_out
from cdp_activation.components import metadata as asset_meta
from cdp_activation.components.alerting import activation_alert_sensors
from cdp_activation.components.resources import LedgerResource, WarehouseResource
from cdp_activation.components.results import results_defs
from cdp_activation.delivery.engine import DeliveryReport
from cdp_activation.feedback import fallback as fb
from cdp_activation.feedback.template_catalog import catalog_connectors
from cdp_activation.ledger import FALLBACK_STEP, INITIAL_STEP
from cdp_activation.partitions import WINDOW_FORMAT, window_cron
from cdp_activation.settings import get_settings
from cdp_activation.spec import (
    ActivationSpec,
    QuietHoursSpec,
    check_workers,
    coerce_parameter,
)

_PY_TYPES: dict[str, type] = {"float": float, "int": int, "str": str, "bool": bool, "date": str}


# CDP_TOLERATE_BROKEN_ACTIVATIONS=1 (the CLI sets it): an activation that cannot be loaded
# is left out, its reason kept here, so the others still run; `dagster dev` and
# `dagster definitions validate` keep refusing the whole code location instead.
BROKEN: dict[str, str] = {}


def _tolerating() -> bool:
    return os.environ.get("CDP_TOLERATE_BROKEN_ACTIVATIONS") == "1"


class ActivationComponent(dg.Component, dg.Resolvable, ActivationSpec):
    """An audience SQL + a channel plan + connectors + a schedule: one thing a marketer runs."""

    @classmethod
    def load(cls, attributes: Any, context: dg.ComponentLoadContext) -> Any:
        try:
            return super().load(attributes, context)
        except Exception as err:
            if not _tolerating():
                raise
            BROKEN[context.path.name] = _first_line(err)
            return _LeftOut()

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        name = context.path.name
        try:
            spec = ActivationSpec.model_validate(
                self.model_dump(include=set(ActivationSpec.model_fields))
            )
            # The audience SQL is checked in the dialect of the warehouse it will run on.
            dialect = sql_dialect(get_settings().warehouse_url)
            activation = run.Activation.from_spec(name, spec, dialect=dialect)
        except Exception as err:
            if not _tolerating():
                raise
            BROKEN[name] = _first_line(err)
            return dg.Definitions()
        return build_activation_defs(activation)


class _LeftOut(dg.Component):
    """A broken activation left out of a tolerant load (see BROKEN)."""

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return dg.Definitions()


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines[:3])[:400] if lines else type(err).__name__


def partitions_of(spec: ActivationSpec) -> dg.PartitionsDefinition:
    """Daily partitions, or an event-driven activation's windows (`2026-12-05T10:15`, UTC).
    end_offset=1: today (the open window) is a partition too, so it can run now."""
    if spec.events is None:
        return dg.DailyPartitionsDefinition(start_date=spec.partitions_start_date, end_offset=1)
    return dg.TimeWindowPartitionsDefinition(
        cron_schedule=window_cron(spec.events.window_minutes),
        start=datetime.fromisoformat(spec.partitions_start_date).replace(tzinfo=UTC),
        fmt=WINDOW_FORMAT,
        end_offset=1,
    )


def build_activation_defs(activation: run.Activation) -> dg.Definitions:
    """Assets `<name>/audience -> decisions -> deliveries`, their checks, a job and a schedule."""
    name = activation.name
    spec = activation.spec
    partitions = partitions_of(spec)
    audience_key = dg.AssetKey([name, "audience"])
    decisions_key = dg.AssetKey([name, "decisions"])
    deliveries_key = dg.AssetKey([name, "deliveries"])
    connector_keys = set(spec.connectors())
    # Lineage to the shared catalog assets (defs/templates.py); decisions still read it live.
    template_connectors = sorted(
        {s.connector for s in spec.channel_plan.steps if s.template} & catalog_connectors()
    )
    plan_text = " → ".join(
        f"{s.channel} ({s.template.name if s.template else 'text'} via {s.connector})"
        for s in spec.channel_plan.steps
    )
    fallback_text = (
        f"; fallback to {spec.channel_plan.fallback.channel} when not delivered within "
        f"{spec.channel_plan.fallback.not_delivered_within_minutes:g} min"
        if spec.channel_plan.fallback
        else ""
    )
    common: dict[str, Any] = {
        "group_name": name,
        "partitions_def": partitions,
        "owners": [spec.owner] if spec.owner else None,
        "tags": {"activation": name},
        # One run of the activation at a time from the asset graph too (dagster.yaml: pools).
        "pool": f"activation-{name}",
        "kinds": {"polars"},
        # What a marketer reads on each asset of the campaign map (the Definition tab).
        "metadata": {
            "channel_plan": f"{spec.channel_plan.purpose}: {plan_text}{fallback_text}",
            "audience_sql": dg.MetadataValue.path(spec.audience.sql),
            "activation_yaml": dg.MetadataValue.path(
                f"src/cdp_activation/defs/activations/{name}/defs.yaml"
            ),
        },
    }

    audience_config = _audience_config_class(activation)

    # The checks run inside the steps that produce their inputs (check_specs): as separate
    # steps each would load the audience and the decisions again from the sealed outputs
    # (31 s and 6.3 GB at 10,000,000 customers). A failed blocking check still fails the
    # step after its output is stored, so nothing downstream runs.
    contract_spec = dg.AssetCheckSpec(
        "audience_contract",
        asset=audience_key,
        blocking=True,
        description="The audience returns the contract's columns with the right types, a "
        "unique non-null customer_id, and every column the templates and bodies use "
        "(docs/audiences.md).",
    )
    size_spec = dg.AssetCheckSpec(
        "audience_size_stable",
        asset=audience_key,
        blocking=True,
        description="The audience is within limits.max_audience_change times the last "
        "successful run's: a sudden 10x is a bug, not a campaign.",
    )

    @dg.asset(
        key=audience_key,
        description=f"{spec.description}\n\nAudience SQL: `{spec.audience.sql}`".strip(),
        required_resource_keys={"warehouse", "ledger"},
        check_specs=[contract_spec, size_spec],
        code_version="1",
        **common,
    )
    def audience(context: dg.AssetExecutionContext, config: audience_config) -> Iterator[Any]:  # type: ignore[valid-type]
        params = {k: getattr(config, k) for k in spec.audience.parameters}
        frame = run.compute_audience(
            activation,
            context.resources.warehouse.warehouse(),
            partition_key=context.partition_key,
            parameters=params,
            ledger=context.resources.ledger.ledger(),
        )
        checks = [
            _contract_result(activation, frame),
            _size_result(context, activation, audience_key, frame.height),
        ]
        yield dg.Output(
            frame, metadata=asset_meta.audience_metadata(frame, params, context.partition_key)
        )
        yield from checks

    quiet = spec.policy.quiet_hours
    first_template = next((s.template for s in spec.channel_plan.steps if s.template), None)
    decisions_config = create_model(
        f"{_class_name(name)}DecisionsConfig",
        __base__=dg.Config,
        max_recipients=(
            int | None,
            Field(
                default=spec.limits.max_recipients,
                description="Most customers this run may message; beyond it they are excluded "
                "(over_recipient_cap), chosen by a stable hash. Empty: no cap.",
            ),
        ),
        template=(
            str | None,
            Field(
                default=first_template.name if first_template else None,
                description="The template of the plan's first template step (e.g. another "
                "approved WhatsApp template with the same variables). It must pass the "
                "template_approved check (in the provider's catalog, APPROVED, of a category "
                "the purpose allows, with the plan's variables), or the run fails before "
                "anything is decided or sent.",
            ),
        ),
        **_send_window_fields(quiet),
    )

    consented_spec = dg.AssetCheckSpec(
        "consented_recipients_only",
        asset=decisions_key,
        blocking=True,
        description="Re-checks the decisions independently: no chosen recipient without an "
        "opt-in for the chosen channel (from the audience), none on a freshly read suppression "
        "list, none chosen while excluded.",
    )
    phone_share_spec = dg.AssetCheckSpec(
        "invalid_phone_share",
        asset=decisions_key,
        description="Warns when more than 10% of the audience has a missing or invalid number.",
    )

    @dg.asset(
        key=decisions_key,
        description=f"Policy decisions: per customer, the channel of the plan ({plan_text}) or "
        "the reason code why not.",
        ins={"audience": dg.AssetIn(audience_key)},
        deps=[dg.AssetKey(["templates", c]) for c in template_connectors],
        required_resource_keys={"warehouse", "ledger", *connector_keys},
        check_specs=[consented_spec, phone_share_spec],
        code_version="1",
        **common,
    )
    def decisions(
        context: dg.AssetExecutionContext,
        config: decisions_config,  # type: ignore[valid-type]
        audience: pl.DataFrame,
    ) -> Iterator[Any]:
        connectors = fan_out.connectors_of(context, connector_keys)
        chosen_activation = run.with_run_choices(
            activation,
            template=config.template,
            send_window=(config.send_window_start, config.send_window_end),
        )
        # Another template than defs.yaml's passes template_approved's rules before anything
        # is decided: otherwise the policy would quietly move everyone to the next channel.
        if problem := run.template_override_problem(activation, config.template, connectors):
            raise dg.Failure(description=f"Not sent: {problem}")
        result = run.compute_decisions(
            chosen_activation,
            audience,
            context.resources.warehouse.warehouse(),
            connectors,
            now=datetime.now(UTC),
            max_recipients=config.max_recipients,
            ledger=context.resources.ledger.ledger(),
            partition_key=context.partition_key,
        )
        plan = chosen_activation.spec.channel_plan
        experiment = chosen_activation.spec.experiment
        quiet = chosen_activation.spec.policy.quiet_hours
        metadata = asset_meta.decisions_metadata(result, plan, experiment, quiet)
        checks = [
            _consent_result(activation, context, result.frame, audience),
            _phone_share_result(result.excluded_by_reason(), audience.height),
        ]
        yield dg.Output(result.frame, metadata=metadata)
        yield from checks

    pool = f"activation-{name}"
    deliveries_config = create_model(
        f"{_class_name(name)}DeliveriesConfig",
        __base__=DeliveriesConfig,
        workers=fan_out.workers_config(spec.delivery.workers),
        in_flight=fan_out.in_flight_config(spec.delivery.in_flight),
    )
    prepare_name = f"{name}__deliveries_prepare"

    @dg.op(
        name=prepare_name,
        description="Checks the send was previewed when it must be, plans the decided rows "
        "in the ledger (never twice per partition), mends what gone workers left in flight and "
        "checks the connectors answer; then hands out the claim workers.",
        ins={"decisions": dg.In()},
        out={"prepared": dg.Out(), "tickets": dg.DynamicOut(fan_out.Ticket)},
        required_resource_keys={"ledger", *connector_keys},
        pool=pool,
    )
    def prepare_sends(
        context: dg.OpExecutionContext,
        config: deliveries_config,  # type: ignore[valid-type]
        decisions: pl.DataFrame,
    ) -> Any:
        connectors = fan_out.connectors_of(context, connector_keys)
        workers = _checked_workers(config.workers)
        if not config.dry_run and not _automated(context):
            eligible = run.eligible_count(decisions)
            problem = confirmation_problem(
                name,
                context.partition_key,
                eligible,
                _latest_preview(context, deliveries_key),
                datetime.now(UTC),
                confirm_policy(),
            )
            if problem:
                raise dg.Failure(
                    description=f"Not sent: {problem}", metadata={"eligible": eligible}
                )
        store = context.resources.ledger.ledger()
        summary = run.prepare_delivery(
            activation,
            decisions,
            store,
            connectors,
            partition_key=context.partition_key,
            dry_run=config.dry_run,
            run_id=context.run.run_id,
        )
        yield dg.Output(fan_out.Prepared(summary), "prepared")
        yield from fan_out.tickets(summary, workers, config.in_flight)

    claim_sends = fan_out.claim_op(
        f"{name}__deliveries_claim",
        activation=name,
        step=INITIAL_STEP,
        connector_keys=connector_keys,
        pool=pool,
        caps=run.caps_at_claim(activation),
    )

    @dg.op(
        name=f"{name}__deliveries_finish",
        description="Sums the claim workers' reports and records where the partition stands.",
        out=dg.Out(dg.Nothing),
        required_resource_keys={"ledger"},
        pool=pool,
    )
    def finish_sends(
        context: dg.OpExecutionContext, prepared: fan_out.Prepared, reports: list
    ) -> dg.Output:
        summary = _finished(context, prepared.summary, reports, INITIAL_STEP)
        return dg.Output(None, metadata=asset_meta.delivery_metadata(summary))

    @dg.graph_asset(
        key=deliveries_key,
        description="Sends the decided messages through the connectors in batches, recording "
        "every send in the ledger (planned before any request; never twice per partition), "
        "from `workers` claim workers at once (delivery.workers; docs/scaling.md).",
        ins={"decisions": dg.AssetIn(decisions_key)},
        config=fan_out.mapped_to(prepare_name, deliveries_config),
        **_graph_common(common),
    )
    def deliveries(decisions: pl.DataFrame) -> Any:
        prepared, claims = prepare_sends(decisions)
        return finish_sends(prepared, claims.map(claim_sends).collect())

    @dg.asset_check(
        asset=decisions_key,
        name="template_approved",
        blocking=True,
        partitions_def=partitions,
        description="Every template the run sends (the plan's, or the run's `template` "
        "choice) is in the provider's catalog, APPROVED, of a category the purpose allows, "
        "with the parameters the plan maps.",
        required_resource_keys=connector_keys,
    )
    def template_approved(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        connectors = fan_out.connectors_of(context, connector_keys)
        default = first_template.name if first_template else None
        template = _run_choice(context, decisions_key, "template", default)
        problems = run.template_problems(activation, connectors, template=template)
        return dg.AssetCheckResult(
            passed=not problems,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(problems) if problems else "all templates approved",
            metadata={"problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems))}
            if problems
            else {},
        )

    job = dg.define_asset_job(
        name=f"{name}_job",
        selection=dg.AssetSelection.assets(audience_key, decisions_key, deliveries_key),
        tags={"activation": name},
        description=f"Run the {name} activation for one day's partition.",
    )
    fallback = (
        _fallback_defs(
            activation, partitions, common, (audience_key, decisions_key, deliveries_key), job.name
        )
        if spec.channel_plan.fallback is not None
        else None
    )
    # One run of an activation at a time, whichever job: two would race over the ledger rows.
    jobs_of_activation = [job.name] + ([fallback.job.name] if fallback else [])

    @dg.schedule(
        name=f"{name}_schedule",
        job=job,
        cron_schedule=spec.schedule.cron,
        execution_timezone=spec.schedule.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING
        if spec.schedule.enabled
        else dg.DefaultScheduleStatus.STOPPED,
    )
    def schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        # Skip, don't stack: a second run of the same activation would race the first.
        if active := _active_run(context.instance, jobs_of_activation):
            return dg.SkipReason(f"{active} is already queued or running")
        partition_key = context.scheduled_execution_time.date().isoformat()
        return dg.RunRequest(
            run_key=partition_key,
            partition_key=partition_key,
            tags={"activation": name},
            run_config=_send_for_real(f"{name}__deliveries"),
        )

    @dg.sensor(
        name=f"{name}_deferred_sends",
        job=job,
        minimum_interval_seconds=300,
        default_status=dg.DefaultSensorStatus.RUNNING
        if spec.schedule.enabled
        else dg.DefaultSensorStatus.STOPPED,
        description="Re-runs a partition when recipients deferred by quiet hours become due, "
        "when a stopped run (provider down, interrupted) left recipients waiting, or when a "
        "killed run left sends in flight to recover; the run applies the policy again before "
        "anything is sent.",
    )
    def deferred_sends(context: dg.SensorEvaluationContext, ledger: LedgerResource) -> Any:
        if active := _active_run(context.instance, jobs_of_activation):
            return dg.SkipReason(f"{active} is already queued or running")
        store = ledger.ledger()
        try:
            due = set(store.due_partitions(name, step=INITIAL_STEP))
            due |= store.partitions_to_recover(name)
        finally:
            store.dispose()  # the sensor runs every few minutes in a long-lived daemon
        if not due:
            return dg.SkipReason("no deferred or waiting recipient is due")
        # One run per partition per tick while something stays due: a run that could not
        # send (provider still down) leaves the rows as they were, and is tried again at the
        # next tick rather than never (a key made of the rows alone would not change).
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M")
        return [
            dg.RunRequest(
                run_key=f"{partition}:due:{stamp}",
                partition_key=partition,
                tags={"activation": name, "trigger": "deferred_sends"},
                run_config=_send_for_real(f"{name}__deliveries"),
            )
            for partition in sorted(due)
        ]

    defs = dg.Definitions(
        assets=[audience, decisions, deliveries],
        asset_checks=[template_approved],
        jobs=[job],
        # An event-driven activation runs on its events, not on a clock.
        schedules=[schedule] if spec.events is None else [],
        sensors=[deferred_sends]
        + ([] if spec.events is None else [_events_sensor(activation, job, jobs_of_activation)])
        + activation_alert_sensors(activation, [job] + ([fallback.job] if fallback else [])),
    )
    if spec.experiment is not None and spec.experiment.conversion_sql is not None:
        defs = dg.Definitions.merge(defs, results_defs(activation, common, deliveries_key))
    if fallback is None:
        return defs
    return dg.Definitions.merge(
        defs,
        dg.Definitions(
            assets=[fallback.asset],
            jobs=[fallback.job],
            sensors=[_fallback_sensor(activation, fallback.job, jobs_of_activation)],
        ),
    )


def _events_sensor(activation: run.Activation, job: Any, jobs: list[str]) -> dg.SensorDefinition:
    """`<name>_events`: every `events.interval_seconds`, ask the warehouse what was loaded
    since the cursor (the latest load time seen) and run the windows it falls in."""
    name = activation.name
    spec = activation.spec.events
    query = activation.events_query
    assert spec is not None and query is not None

    @dg.sensor(
        name=f"{name}_events",
        job=job,
        minimum_interval_seconds=spec.interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING
        if spec.enabled
        else dg.DefaultSensorStatus.STOPPED,
        description=f"Runs the {spec.window_minutes}-minute windows that new events (`"
        f"{spec.sql}`) fall in, every {spec.interval_seconds} s; events older than "
        f"{spec.max_event_age} are left alone. Each customer of a window is messaged once.",
    )
    def events_sensor(context: dg.SensorEvaluationContext, warehouse: WarehouseResource) -> Any:
        if active := _active_run(context.instance, jobs):
            return dg.SkipReason(f"{active} is already queued or running")
        looked = events.tick(query, warehouse.warehouse(), spec, context.cursor)
        if looked.cursor is not None:
            context.update_cursor(looked.cursor)
        if looked.skip is not None:
            return dg.SkipReason(looked.skip)
        return [
            dg.RunRequest(
                run_key=f"{window}:{looked.cursor}",
                partition_key=window,
                tags={"activation": name, "trigger": "events"},
                run_config=_send_for_real(f"{name}__deliveries"),
            )
            for window in looked.windows
        ]

    return events_sensor


class _Fallback(NamedTuple):
    asset: dg.AssetsDefinition
    job: Any  # what define_asset_job returns (an unresolved asset job)


def _fallback_defs(
    activation: run.Activation,
    partitions: dg.PartitionsDefinition,
    common: dict[str, Any],
    first_send: tuple[dg.AssetKey, dg.AssetKey, dg.AssetKey],
    main_job: str,
) -> _Fallback:
    """The `<name>/fallback` asset and the job that materialises it alone, after the first
    send's assets (`first_send`: audience, decisions, deliveries)."""
    name = activation.name
    audience_key, decisions_key, deliveries_key = first_send
    plan = activation.spec.channel_plan
    spec = fb.fallback_spec(activation)
    step = plan.step_for(spec.channel)
    key = dg.AssetKey([name, "fallback"])
    connector_keys = set(activation.spec.connectors())
    config_class = create_model(
        f"{_class_name(name)}FallbackConfig",
        __base__=dg.Config,
        dry_run=(
            bool,
            Field(
                default=True,
                description="Preview only (the default when launched by hand): decide who is "
                "due a fallback and what the policy says, write nothing and send nothing. Set "
                "false to send; the fallback sensor sends for real.",
            ),
        ),
        not_delivered_within_minutes=(
            float,
            Field(
                default=spec.not_delivered_within_minutes,
                description="Fall back when the first message is not delivered this many "
                "minutes after it was sent (from the activation's channel_plan.fallback).",
            ),
        ),
        **_send_window_fields(activation.spec.policy.quiet_hours, fallback=True),
    )
    read_rule = (
        f", or not read within {spec.not_read_within_hours:g} h"
        if spec.not_read_within_hours is not None
        else ""
    )

    config_class = create_model(
        f"{_class_name(name)}FallbackWorkersConfig",
        __base__=config_class,
        workers=fan_out.workers_config(activation.spec.delivery.workers),
        in_flight=fan_out.in_flight_config(activation.spec.delivery.in_flight),
    )
    pool = common["pool"]
    prepare_name = f"{name}__fallback_prepare"

    @dg.op(
        name=prepare_name,
        description="Finds the customers due a fallback, applies the policy for the fallback "
        "channel, plans the rows in the ledger; then hands out the claim workers.",
        ins={"after": dg.In(dg.Nothing)},
        out={"prepared": dg.Out(), "tickets": dg.DynamicOut(fan_out.Ticket)},
        required_resource_keys={"warehouse", "ledger", *connector_keys},
        pool=pool,
    )
    def prepare_fallback(context: dg.OpExecutionContext, config: config_class) -> Any:  # type: ignore[valid-type]
        connectors = fan_out.connectors_of(context, connector_keys)
        workers = _checked_workers(config.workers)
        store = context.resources.ledger.ledger()
        # The run's send window (Launchpad, `--send-window`), else the first send's.
        first = _first_send_window(
            context, (decisions_key, deliveries_key), activation.spec.policy.quiet_hours
        )
        window = (config.send_window_start or first[0], config.send_window_end or first[1])
        chosen = run.with_run_choices(activation, send_window=window)
        decisions = fb.compute_fallback_decisions(
            chosen,
            context.resources.warehouse.warehouse(),
            store,
            connectors,
            partition_key=context.partition_key,
            now=datetime.now(UTC),
            parameters=_partition_parameters(context, audience_key),
            not_delivered_within_minutes=config.not_delivered_within_minutes,
            dry_run=config.dry_run,
        )
        summary = fb.prepare_fallback(
            chosen,
            decisions,
            store,
            connectors,
            partition_key=context.partition_key,
            dry_run=config.dry_run,
            run_id=context.run.run_id,
        )
        yield dg.Output(fan_out.Prepared(summary, decisions), "prepared")
        yield from fan_out.tickets(summary, workers, config.in_flight)

    claim_fallbacks = fan_out.claim_op(
        f"{name}__fallback_claim",
        activation=name,
        step=FALLBACK_STEP,
        connector_keys=connector_keys,
        pool=pool,
        caps=run.caps_at_claim(activation),
    )

    @dg.op(
        name=f"{name}__fallback_finish",
        description="Sums the claim workers' reports and records what became of the first "
        "messages and the fallbacks.",
        out=dg.Out(dg.Nothing),
        required_resource_keys={"ledger"},
        pool=pool,
    )
    def finish_fallback(
        context: dg.OpExecutionContext, prepared: fan_out.Prepared, reports: list
    ) -> dg.Output:
        summary = _finished(context, prepared.summary, reports, FALLBACK_STEP)
        outcomes = context.resources.ledger.ledger().first_message_outcomes(
            name, context.partition_key, spec.channel
        )
        return dg.Output(
            None, metadata=asset_meta.fallback_metadata(prepared.extra, summary, outcomes)
        )

    @dg.graph_asset(
        key=key,
        description=f"Fallback to {spec.channel} (via {step.connector}) for customers whose "
        f"first message did not land: failed with a code meaning they cannot receive it there, "
        f"or not delivered within {spec.not_delivered_within_minutes:g} minutes{read_rule}. "
        "The policy is applied again for the fallback channel; ledger rows link to the first "
        "message. Launched by the fallback sensor.",
        ins={"after": dg.AssetIn(deliveries_key, dagster_type=dg.Nothing)},
        config=fan_out.mapped_to(prepare_name, config_class),
        **_graph_common(common),
    )
    def fallback(after: Any) -> Any:
        prepared, claims = prepare_fallback(after)
        return finish_fallback(prepared, claims.map(claim_fallbacks).collect())

    job = dg.define_asset_job(
        name=f"{name}_fallback_job",
        selection=dg.AssetSelection.assets(key),
        tags={"activation": name, "step": FALLBACK_STEP},
        description=f"Send the {name} fallback ({spec.channel}) to customers of one partition "
        f"whose first message did not land (see {main_job}).",
    )
    return _Fallback(fallback, job)


def _fallback_sensor(activation: run.Activation, job: Any, jobs: list[str]) -> dg.SensorDefinition:
    name = activation.name

    @dg.sensor(
        name=f"{name}_fallback",
        job=job,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING
        if activation.spec.schedule.enabled
        else dg.DefaultSensorStatus.STOPPED,
        description="Launches the fallback of a partition when first messages are due one "
        "(failed as unreachable, or not delivered in the plan's window), and when fallbacks "
        "deferred by quiet hours become due.",
    )
    def fallback_sensor(context: dg.SensorEvaluationContext, ledger: LedgerResource) -> Any:
        if active := _active_run(context.instance, jobs):
            return dg.SkipReason(f"{active} is already queued or running")
        store = ledger.ledger()
        now = datetime.now(UTC)
        try:
            partitions = fb.partitions_due(activation, store, now)
        finally:
            store.dispose()  # the sensor runs every minute in a long-lived daemon
        if not partitions:
            return dg.SkipReason("no first message is due a fallback")
        # One run per partition and minute at most: a run that finds nothing new sends nothing.
        minute = now.strftime("%Y-%m-%dT%H:%M")
        return [
            dg.RunRequest(
                run_key=f"{partition}:fallback:{minute}",
                partition_key=partition,
                tags={"activation": name, "trigger": "fallback"},
                run_config=_send_for_real(f"{name}__fallback"),
            )
            for partition in sorted(partitions)
        ]

    return fallback_sensor


def _materializations(
    context: dg.AssetExecutionContext | dg.OpExecutionContext, key: dg.AssetKey, limit: int
) -> Sequence[dg.EventLogRecord]:
    """The asset's latest materialization records for the run's partition, newest first."""
    return context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[context.partition_key]),
        limit=limit,
    ).records


def _entry(record: dg.EventLogRecord, entry: str) -> Any:
    """One metadata entry's value of a materialization record; None when absent."""
    materialization = record.asset_materialization
    value = materialization.metadata.get(entry) if materialization else None
    return value.value if value is not None else None


def _latest_metadata(
    context: dg.AssetExecutionContext | dg.OpExecutionContext, key: dg.AssetKey, entry: str
) -> Any:
    """One metadata entry's value of the asset's latest materialization for the run's
    partition; None when there is none."""
    records = _materializations(context, key, limit=1)
    return _entry(records[0], entry) if records else None


def _partition_parameters(
    context: dg.AssetExecutionContext | dg.OpExecutionContext, audience_key: dg.AssetKey
) -> dict[str, Any]:
    """The audience parameters the partition's latest run used (its audience metadata), so
    the fallback sees the audience the first messages went to; empty: the defaults."""
    return dict(_latest_metadata(context, audience_key, "parameters") or {})


def _first_send_window(
    context: dg.OpExecutionContext,
    keys: tuple[dg.AssetKey, dg.AssetKey],
    quiet: QuietHoursSpec,
) -> tuple[str, str]:
    """The send window the partition's latest real send was decided with (the `send_window`
    of the decisions of the newest run whose deliveries were not a dry run), so a fallback
    keeps a run's chosen window (`--send-window`, the Launchpad) as the first message did; a
    preview's window is not taken. defs.yaml's when none was recorded."""
    decisions_key, deliveries_key = keys
    sent = _materializations(context, deliveries_key, limit=50)
    real = next((r.run_id for r in sent if _entry(r, "dry_run") is False), None)
    decided = _materializations(context, decisions_key, limit=50) if real else []
    window = next(
        (asset_meta.send_window_of(_entry(r, "send_window")) for r in decided if r.run_id == real),
        None,
    )
    return window or (quiet.end, quiet.start)


def _graph_common(common: dict[str, Any]) -> dict[str, Any]:
    """The asset arguments a graph-backed asset takes (its ops carry the pool)."""
    return {k: v for k, v in common.items() if k != "pool"} | {"code_version": "1"}


def _checked_workers(workers: int) -> int:
    """The run's `workers` within CDP_DELIVERY_MAX_WORKERS, or a one-line failure."""
    try:
        return check_workers(workers)
    except ValueError as err:
        raise dg.Failure(description=f"Not sent: workers {err}") from None


def _finished(
    context: dg.OpExecutionContext,
    summary: run.DeliverySummary,
    reports: list[DeliveryReport],
    step: str,
) -> run.DeliverySummary:
    """The finish op of a delivery step: a dry run's preview as it is; otherwise the workers'
    reports summed into where the partition stands (a failure when one stopped early)."""
    if summary.dry_run:
        return summary
    store = context.resources.ledger.ledger()
    try:
        return run.finish_delivery(summary, reports, store, step)
    except run.DeliveryFailed as failed:
        # The run fails, saying why and where the partition stands; nothing is lost.
        raise dg.Failure(
            description=f"Not everything was sent: {failed}",
            metadata=asset_meta.delivery_metadata(failed.summary),
        ) from None


class DeliveriesConfig(dg.Config):
    dry_run: bool = Field(
        default=True,
        description="Preview only (the default): compute who would be messaged, what it would "
        "cost and how long it would take; write nothing to the ledger and send nothing. Set "
        "false to send. A send of more than CDP_CONFIRM_ABOVE recipients needs a preview of "
        "the same partition first (plan, then apply); schedules and sensors send for real.",
    )


def _run_choice(context: Any, key: dg.AssetKey, field: str, default: Any) -> Any:
    """A field of an asset's config as the run sets it (the Launchpad, `--template`, a run
    request), else the default: what a check evaluates is what the run uses."""
    ops = (context.run.run_config or {}).get("ops") or {}
    config = (ops.get("__".join(key.path)) or {}).get("config") or {}
    value = config.get(field)
    return default if value is None else value


def _send_for_real(op: str) -> dict[str, Any]:
    """Run config of an automated run: the Launchpad's default is a dry run, not theirs."""
    return {"ops": {op: {"config": {"dry_run": False}}}}


def _automated(context: dg.AssetExecutionContext | dg.OpExecutionContext) -> bool:
    """Launched by a schedule or a sensor (the data engineers' automation), not by hand."""
    tags = context.run.tags
    return "dagster/schedule_name" in tags or "dagster/sensor_name" in tags


def _contract_result(activation: run.Activation, audience: pl.DataFrame) -> dg.AssetCheckResult:
    problems = run.audience_problems(activation, audience)
    return dg.AssetCheckResult(
        check_name="audience_contract",
        passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description="\n".join(problems) if problems else "the audience meets the contract",
        metadata={"problems": len(problems)},
    )


def _size_result(
    context: dg.AssetExecutionContext, activation: run.Activation, key: dg.AssetKey, size: int
) -> dg.AssetCheckResult:
    previous = asset_meta.previous_audience_size(context.instance, key, context.run.run_id)
    spec = activation.spec
    # An event-driven activation's windows vary by nature (a quiet quarter hour is empty):
    # there is no usual size to compare with.
    problem = (
        None
        if spec.events is not None
        else run.audience_size_problem(size, previous, spec.limits.max_audience_change)
    )
    allowed = context.run.tags.get("cdp/allow_audience_change") == "true"
    return dg.AssetCheckResult(
        check_name="audience_size_stable",
        passed=problem is None or allowed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=problem or "within bounds of the last successful run",
        metadata={"audience_size": size, "previous_size": previous or 0},
    )


_BREACHES = {
    "without_consent": "chosen without consent for the channel",
    "suppressed": "chosen while on the suppression list",
    "chosen_with_a_reason": "chosen with an exclusion reason",
}


def _consent_result(
    activation: run.Activation,
    context: dg.AssetExecutionContext,
    decisions: pl.DataFrame,
    audience: pl.DataFrame,
) -> dg.AssetCheckResult:
    """consented_recipients_only: the chosen rows against the audience's own consent columns
    and a suppression list read again from the warehouse, not the policy engine's copy. Its
    numbers are read through the phone cache the policy's were (phonenumbers' answers, kept
    by number): the 10,000,000-customer demo's 105,609 entries took 8.6 s without it, 1.4 s."""
    regions = sorted(audience["country"].drop_nulls().unique().to_list())
    suppressions = run.load_suppressions(
        activation,
        context.resources.warehouse.warehouse(),
        regions,
        run.phone_cache(context.resources.ledger.ledger()),
    )
    breaches = run.policy_breaches(activation, decisions, audience, suppressions)
    found = [f"{n:,} {_BREACHES[what]}" for what, n in breaches.items() if n]
    return dg.AssetCheckResult(
        check_name="consented_recipients_only",
        passed=not found,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(found) or "every chosen recipient has consent and is not suppressed",
        metadata=breaches,
    )


def _phone_share_result(excluded: Mapping[str, int], audience_size: int) -> dg.AssetCheckResult:
    share = run.invalid_phone_share(excluded, audience_size)
    return dg.AssetCheckResult(
        check_name="invalid_phone_share",
        passed=share <= 0.10,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{share:.1%} of the audience has a missing or invalid number",
        metadata={"invalid_phone_share": dg.MetadataValue.float(round(share, 4))},
    )


def _latest_preview(
    context: dg.AssetExecutionContext | dg.OpExecutionContext, key: dg.AssetKey
) -> Preview | None:
    """The newest dry run of this asset's partition, from the instance's materialisations."""
    for record in _materializations(context, key, limit=50):  # newest first
        if record.asset_materialization is None:
            continue
        meta = record.asset_materialization.metadata
        if _entry(record, "dry_run") is True and "eligible" in meta:
            at = datetime.fromtimestamp(record.timestamp, UTC)
            eligible = int(meta["eligible"].value)  # type: ignore[arg-type]  # an int we wrote
            return Preview(eligible=eligible, at=at, run_id=record.run_id)
    return None


def _active_run(instance: dg.DagsterInstance, job_names: list[str]) -> str | None:
    """The first of these jobs with a run queued or in progress, if any (one guard against
    double sends)."""
    for job_name in job_names:
        if instance.get_run_records(
            dg.RunsFilter(
                job_name=job_name,
                statuses=[
                    dg.DagsterRunStatus.QUEUED,
                    dg.DagsterRunStatus.NOT_STARTED,
                    dg.DagsterRunStatus.STARTING,
                    dg.DagsterRunStatus.STARTED,
                ],
            ),
            limit=1,
        ):
            return job_name
    return None


def _send_window_fields(quiet: QuietHoursSpec, *, fallback: bool = False) -> dict[str, Any]:
    """The Launchpad's send window (the complement of the activation's quiet hours). The first
    send's decisions default to defs.yaml's; a fallback defaults to empty: the window its
    partition's first send was decided with (`_first_send_window`)."""
    inherited = (
        " Empty: the window the partition's latest real send was decided with (its "
        f"decisions' `send_window`; defs.yaml's quiet hours give {quiet.end}-{quiet.start})."
        if fallback
        else ""
    )
    return {
        "send_window_start": (
            str | None if fallback else str,
            Field(
                default=None if fallback else quiet.end,
                description="Earliest local time of day (HH:MM, in each customer's time zone) "
                f"a message may go out; earlier ones wait until then.{inherited}",
            ),
        ),
        "send_window_end": (
            str | None if fallback else str,
            Field(
                default=None if fallback else quiet.start,
                description="Latest local time of day (HH:MM) a message may go out; later "
                f"ones wait until the next day's window.{inherited}",
            ),
        ),
    }


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _audience_config_class(activation: run.Activation) -> type[dg.Config]:
    fields: dict[str, Any] = {}
    for pname, pspec in activation.spec.audience.parameters.items():
        py_type = _PY_TYPES[pspec.type]
        default = pspec.default
        if default is not None:
            default = coerce_parameter(pspec.type, default)
            if pspec.type == "date":
                default = default.isoformat()
        fields[pname] = (py_type, Field(default=default, description=pspec.description))
    return create_model(
        f"{_class_name(activation.name)}AudienceConfig", __base__=dg.Config, **fields
    )
