"""A delivery step as Dagster runs it: prepare -> N claim workers -> finish.

The deliveries and fallback assets are graph-backed: one op prepares (plans the rows in the
ledger, mends what gone workers left, checks the connectors), `workers` claim ops send (each
claims batches from the ledger until none are due: the ledger's claim hands every row to one
of them, whichever process or host they run in), and one op sums their reports into the
asset's materialisation. With the multiprocess executor each claim op is a process; with the
Celery executor each is a task on whichever worker takes it (docs/scaling.md). The work itself
is `activation_run.prepare_delivery`, `send_due` and `finish_delivery`.
"""

from collections.abc import Iterator
from typing import Any, NamedTuple

import dagster as dg

from cdp_activation.activation import run as run
from cdp_activation.delivery.engine import DeliveryReport, DeliveryScope
from cdp_activation.ledger import FrequencyCap


class Prepared(NamedTuple):
    """What the prepare op hands the finish op (through the IO manager)."""

    summary: run.DeliverySummary
    extra: Any = None  # what the finish op's metadata needs besides (fallback decisions)


def connectors_of(context: Any, names: set[str]) -> dict[str, Any]:
    """The plain-Python connectors behind the run's connector resources."""
    return {name: getattr(context.resources, name).connector() for name in names}


class Ticket(NamedTuple):
    """What one claim worker is handed: its number and the requests it keeps in the air."""

    worker: int
    in_flight: int | None = None  # None: CDP_DELIVERY_CONCURRENCY


def tickets(
    summary: run.DeliverySummary, workers: int, in_flight: int | None = None
) -> Iterator[dg.DynamicOutput]:
    """One dynamic output per claim worker, none when there is nothing to claim (a dry run,
    or nothing due now or within a delivery's wait): then the finish op runs at once."""
    if summary.dry_run or summary.claimable <= 0:
        return
    for worker in range(1, workers + 1):
        yield dg.DynamicOutput(
            Ticket(worker, in_flight), mapping_key=f"w{worker}", output_name="tickets"
        )


def claim_op(
    op_name: str,
    *,
    activation: str,
    step: str,
    connector_keys: set[str],
    pool: str,
    caps: tuple[FrequencyCap, ...] = (),
) -> dg.OpDefinition:
    """The claim worker op of one activation's step; `caps`: its frequency caps, held again
    at each claim."""

    @dg.op(
        name=op_name,
        description=f"One claim worker of {activation}'s {step} step: claims due rows from the "
        "ledger in batches and sends them until none are due.",
        required_resource_keys={"ledger", *connector_keys},
        pool=pool,
    )
    def claim(context: dg.OpExecutionContext, ticket: Ticket) -> DeliveryReport:
        scope = DeliveryScope(activation, context.partition_key, step, context.run.run_id, caps)
        store = context.resources.ledger.ledger()
        report = run.send_due(
            store,
            scope,
            connectors_of(context, connector_keys),
            options=run.delivery_options(ticket.in_flight),
            worker=str(ticket.worker),
        )
        context.log.info(
            f"claim worker {ticket}: {report.sent:,} sent, {report.failed:,} failed, "
            f"{report.unknown:,} unknown in {report.elapsed:.1f} s"
            + (f"; stopped: {report.stopped_by}" if report.stopped_by else "")
        )
        return report

    return claim


def workers_config(workers: int) -> tuple[type, Any]:
    """The `workers` field of a delivery step's run config (its default from defs.yaml)."""
    from pydantic import Field

    return (
        int,
        Field(
            default=workers,
            ge=1,
            description="Claim workers to fan the sending out into (separate Dagster steps; "
            "processes with the multiprocess executor, Celery tasks with the Celery executor). "
            "Default: delivery.workers in the activation's defs.yaml.",
        ),
    )


def in_flight_config(in_flight: int | None) -> tuple[Any, Any]:
    """The `in_flight` field of a delivery step's run config (its default from defs.yaml)."""
    from pydantic import Field

    return (
        int | None,
        Field(
            default=in_flight,
            ge=1,
            le=1024,
            description="Requests each claim worker keeps in the air at once. Default: "
            "delivery.in_flight in the activation's defs.yaml, else CDP_DELIVERY_CONCURRENCY.",
        ),
    )


def mapped_to(op_name: str, config_class: type[dg.Config]) -> dg.ConfigMapping:
    """The graph asset's run config (what the Launchpad shows under the asset's name) passed
    whole to its prepare op, so `ops: {<name>__deliveries: {config: …}}` stays as it was."""

    def to_prepare(config: dict[str, Any]) -> dict[str, Any]:
        return {op_name: {"config": dict(config)}}

    return dg.ConfigMapping(config_fn=to_prepare, config_schema=config_class.to_config_schema())
