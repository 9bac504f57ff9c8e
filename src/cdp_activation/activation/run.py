"""One activation run in plain Python: audience -> decisions -> deliveries.

The Dagster assets call these functions; tests and the CLI can call them without Dagster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import polars as pl
from pydantic import ValidationError

from cdp_activation import logs
from cdp_activation.activation.daily_cap import as_recent_sends, daily_claims, taken_per_channel
from cdp_activation.audience.sql import AudienceQuery, load_audience_sql
from cdp_activation.audience.warehouse import Warehouse
from cdp_activation.connectors.base import Connector, ConnectorError, TemplateInfo
from cdp_activation.delivery.engine import (
    DeliveryOptions,
    DeliveryReport,
    DeliveryScope,
    claim_horizon,
    deliver,
    rate_of,
)
from cdp_activation.errors import CdpError
from cdp_activation.ledger import (
    DEAD_LETTER,
    DEADLINE_PASSED,
    FAILED,
    FALLBACK_STEP,
    IN_FLIGHT,
    INITIAL_STEP,
    PLANNED,
    SENT,
    UNKNOWN,
    FrequencyCap,
    LeaseLost,
    Ledger,
)
from cdp_activation.masking import mask_phone
from cdp_activation.partitions import FRAMEWORK_PARAMETERS, bound_parameters
from cdp_activation.pii import pii_key
from cdp_activation.plugins import plugins
from cdp_activation.policy import Decisions, decide, reasons
from cdp_activation.policy.addresses import address_column
from cdp_activation.policy.caps import EMPTY_SENDS
from cdp_activation.policy.consent import consent_column
from cdp_activation.policy.engine import DEFER, EXCLUDE, HOLDOUT, SEND, rendered
from cdp_activation.policy.phone_cache import PhoneCache
from cdp_activation.policy.suppression import normalise_suppressions
from cdp_activation.policy.templates import template_problem
from cdp_activation.policy.variants import (
    decide_experiment,
    plans_by_variant,
    rendered_messages,
    variant_plan,
    variant_salt,
)
from cdp_activation.policy.window import last_inbound_column
from cdp_activation.settings import get_settings, is_loopback, project_root, sandbox_mode
from cdp_activation.spec import (
    CATEGORIES_FOR_PURPOSE,
    ActivationSpec,
    ChannelPlanSpec,
    ExperimentSpec,
    QuietHoursSpec,
    coerce_parameter,
)
from cdp_activation.vocabulary import idempotency_key_expr


class AudienceContractError(CdpError, ValueError):
    """The audience query's result breaks the contract (columns, nulls, duplicates)."""


@dataclass(frozen=True)
class Activation:
    """A named, validated activation with its audience query loaded."""

    name: str
    spec: ActivationSpec
    query: AudienceQuery
    suppression_sql: Path
    events_query: AudienceQuery | None = None  # an event-driven activation's new-events SQL
    conversion_query: AudienceQuery | None = None  # an experiment's conversions (results)

    @classmethod
    def from_spec(
        cls, name: str, spec: ActivationSpec, root: Path | None = None, dialect: str = "duckdb"
    ) -> Activation:
        """Load and check the audience SQL in the warehouse's `dialect` (sqlglot name)."""
        root = root or project_root()
        query = load_audience_sql(root / spec.audience.sql, dialect)
        undeclared = sorted(query.parameters - set(spec.audience.parameters) - FRAMEWORK_PARAMETERS)
        if undeclared:
            raise ValueError(
                f"{query.path}: uses parameter(s) {', '.join(':' + p for p in undeclared)} that "
                f"activation {name!r} does not declare under audience.parameters"
            )
        windowed = {"window_start", "window_end"} & query.parameters
        if windowed and spec.events is None:
            raise ValueError(
                f"{query.path}: uses {', '.join(':' + p for p in sorted(windowed))}, which only "
                f"an event-driven activation binds: give activation {name!r} an `events` block "
                "(or use :as_of / :partition_date)"
            )
        events_query = None
        if spec.events is not None:
            events_query = load_audience_sql(root / spec.events.sql, dialect)
            if extra := sorted(events_query.parameters - {"since"}):
                raise ValueError(
                    f"{events_query.path}: binds only :since (the last load time seen), got "
                    f"{', '.join(':' + p for p in extra)}"
                )
        conversion_query = None
        if spec.experiment is not None and spec.experiment.conversion_sql is not None:
            conversion_query = load_audience_sql(root / spec.experiment.conversion_sql, dialect)
            if extra := sorted(conversion_query.parameters - {"start", "end"}):
                raise ValueError(
                    f"{conversion_query.path}: binds only :start and :end (the span the "
                    f"results need), got {', '.join(':' + p for p in extra)}"
                )
        check_step_connectors(spec.channel_plan)
        return cls(
            name=name,
            spec=spec,
            query=query,
            suppression_sql=root / spec.suppression_sql,
            events_query=events_query,
            conversion_query=conversion_query,
        )

    def variable_columns(self) -> list[str]:
        columns = [c for step in self.spec.channel_plan.steps for c in step.variable_columns()]
        return list(dict.fromkeys(columns))

    def required_columns(self) -> list[str]:
        columns = ["customer_id", "phone", "country"]
        purpose = self.spec.channel_plan.purpose
        for step in self.spec.channel_plan.steps:
            columns.append(consent_column(step.channel, purpose))
            if step.channel == "whatsapp" and step.body is not None:
                columns.append(last_inbound_column(step.channel))
            if (address := address_column(step.channel)) is not None:
                columns.append(address)
            columns.extend(step.variable_columns())
        return list(dict.fromkeys(columns))


def check_step_connectors(plan: ChannelPlanSpec) -> None:
    """A `handoff` step goes to a connector that takes audiences (braze_audience), and a
    message step to one that sends messages; an unknown connector is reported elsewhere."""
    installed = plugins()
    for step in plan.steps:
        found = installed.get(step.connector)
        if found is None:
            continue
        takes_audiences = found.capabilities.handoff
        if step.handoff is not None and not takes_audiences:
            usable = sorted(n for n, p in installed.items() if p.capabilities.handoff)
            raise ValueError(
                f"step '{step.channel}': connector {step.connector!r} sends messages and "
                f"cannot take a `handoff`; use {', '.join(usable) or 'an audience connector'}"
            )
        if step.handoff is None and takes_audiences:
            raise ValueError(
                f"step '{step.channel}': connector {step.connector!r} takes audience handoffs, "
                "not messages: give the step a `handoff` (attribute, subscription_group, "
                "properties) instead of a template or body"
            )


# ---------------------------------------------------------------- audience


LEDGER_RECENT_SENDS = "ledger_recent_sends"


def compute_audience(
    activation: Activation,
    warehouse: Warehouse,
    partition_key: str,
    parameters: Mapping[str, Any],
    ledger: Ledger | None = None,
) -> pl.DataFrame:
    """Run the audience SQL with its parameters bound.

    An audience that reads `ledger_recent_sends` gets the ledger's accepted messages per
    customer, channel and purpose (sends_24h, sends_7d, sends_30d, last_sent_at, as of the
    partition, this partition's own sends left out) as a table in the warehouse session, so it
    can leave out recently messaged customers where the data lives.
    """
    specs = activation.spec.audience.parameters
    bound: dict[str, Any] = bound_parameters(partition_key, activation.spec.window_minutes)
    for name, value in parameters.items():
        kind = specs[name].type if name in specs else "str"
        try:
            bound[name] = coerce_parameter(kind, value)
        except ValueError as err:
            raise ValueError(f"parameter {name!r} of {activation.name}: {err}") from None
    tables = {}
    if activation.query.reads_table(LEDGER_RECENT_SENDS):
        if ledger is None:
            raise ValueError(f"{activation.query.path} reads {LEDGER_RECENT_SENDS}: needs a ledger")
        # This partition's own sends are a re-run's "already sent", not "recently messaged".
        recent = ledger.recent_sends(bound["as_of"], exclude=(activation.name, partition_key))
        tables[LEDGER_RECENT_SENDS] = recent.to_arrow()
    return warehouse.query(activation.query, bound, tables=tables or None)


def audience_problems(activation: Activation, frame: pl.DataFrame) -> list[str]:
    """Every way the result breaks the audience contract (docs/audiences.md), each actionable.

    Customer ids may appear in the messages (they are keys, not personal data); phone numbers
    and names never do.
    """
    where = f"{activation.query.path.name} (activation {activation.name})"
    problems: list[str] = []
    missing = [c for c in activation.required_columns() if c not in frame.columns]
    if missing:
        problems.append(
            f"{where}: the audience lacks column(s) {', '.join(missing)}, which the channel "
            f"plan needs. The query returned: {', '.join(frame.columns)}"
        )
    schema = frame.schema
    expected = _expected_types(activation)
    for column, (allowed, meaning) in expected.items():
        if column in schema and not any(_is(schema[column], kind) for kind in allowed):
            problems.append(f"{where}: column {column} must be {meaning}, got {schema[column]}")
    for column in activation.variable_columns():
        if column in schema and schema[column].is_nested():
            problems.append(
                f"{where}: column {column} feeds a message variable and must be a plain value, "
                f"got {schema[column]}"
            )
    if "customer_id" in schema:
        nulls = frame["customer_id"].null_count()
        if nulls:
            problems.append(f"{where}: {nulls:,} row(s) have a null customer_id")
        # Nulls are reported above, once: not as a duplicated id "None".
        ids = frame["customer_id"].drop_nulls()
        duplicated = ids.filter(ids.is_duplicated())
        if len(duplicated):
            unique = duplicated.unique().sort()
            sample = ", ".join(str(v) for v in unique.head(5).to_list())
            problems.append(
                f"{where}: customer_id must be unique; {len(unique):,} id(s) appear more than "
                f"once, e.g. {sample}"
            )
    return problems


def _is(dtype: pl.DataType, kind: str) -> bool:
    if kind == "null":
        return dtype == pl.Null
    if kind == "bool":
        return dtype == pl.Boolean
    if kind == "string":
        return dtype in (pl.String, pl.Categorical) or isinstance(dtype, pl.Enum)
    if kind == "integer":
        return dtype.is_integer()
    if kind == "datetime":
        return isinstance(dtype, pl.Datetime)
    raise ValueError(kind)


def _expected_types(activation: Activation) -> dict[str, tuple[tuple[str, ...], str]]:
    text = (("string", "null"), "text")
    types: dict[str, tuple[tuple[str, ...], str]] = {
        "customer_id": (("integer", "string"), "an integer or text key"),
        "phone": text,
        "country": (("string", "null"), "an ISO-3166 alpha-2 country code (text)"),
    }
    purpose = activation.spec.channel_plan.purpose
    for step in activation.spec.channel_plan.steps:
        types[consent_column(step.channel, purpose)] = (
            ("bool", "null"),
            "boolean (true = opted in, false or NULL = no consent)",
        )
        types[last_inbound_column(step.channel)] = (
            ("datetime", "null"),
            "a timestamp (with time zone) of the customer's last inbound message",
        )
        if (address := address_column(step.channel)) is not None:
            types[address] = text
    return types


def validate_audience(activation: Activation, frame: pl.DataFrame) -> None:
    """Raise `AudienceContractError` with every problem found; nothing is sent after it."""
    problems = audience_problems(activation, frame)
    if problems:
        raise AudienceContractError("\n".join(problems))


# ---------------------------------------------------------------- decisions


def fetch_catalogs(
    activation: Activation, connectors: Mapping[str, Connector]
) -> dict[str, list[TemplateInfo] | None]:
    """Template catalogs of the connectors whose steps send templates; None for a platform
    that owns its templates (a CEP's campaign: there is no catalog to check)."""
    wanted = {s.connector for s in activation.spec.channel_plan.steps if s.template is not None}
    owned = {n for n in wanted if connectors[n].capabilities.platform_owns_templates}
    wanted -= owned

    async def fetch() -> dict[str, list[TemplateInfo] | None]:
        out: dict[str, list[TemplateInfo] | None] = dict.fromkeys(owned)
        async with httpx.AsyncClient(timeout=30) as client:
            for name in sorted(wanted):
                connector = connectors[name]
                fetcher = getattr(connector, "fetch_templates", None)
                try:
                    out[name] = await fetcher(client) if fetcher else []
                except httpx.TransportError as err:
                    raise ConnectorError(unreachable(name, connector, err)) from None
        return out

    return asyncio.run(fetch()) if wanted else dict.fromkeys(owned)


def unreachable(name: str, connector: Connector, err: Exception) -> str:
    base = connector.redact(str(getattr(connector, "base_url", "?")))
    hint = (
        " The local sandbox is not running: start it with `cdp-activation sandbox` (or `make dev`)."
        if sandbox_mode() and is_loopback(base)
        else " Check the connector's base URL setting and the network path to the provider."
    )
    return f"cannot reach {name} at {base} ({type(err).__name__}).{hint}"


def preflight(connectors: Mapping[str, Connector], timeout: float = 5.0) -> None:
    """Refuse to start sending when a provider cannot even be connected to.

    Without this, a run against an unreachable provider would claim rows and try each until
    the step stopped; stopping first leaves every row planned, untouched, for the next run.
    """
    for name, connector in connectors.items():
        url = httpx.URL(str(getattr(connector, "base_url", "")))
        if not url.host:
            continue
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            socket.create_connection((url.host, port), timeout=timeout).close()
        except OSError as err:
            raise ConnectorError(unreachable(name, connector, err)) from None


def template_problems(
    activation: Activation,
    connectors: Mapping[str, Connector],
    template: str | None = None,
) -> list[str]:
    """Why the plan's templates may not be sent (the blocking `template_approved` check):
    each must be in its provider's catalog, APPROVED, of a category the purpose allows, with
    the parameters the plan maps. `template` is the run's choice for the first template step
    (`--template`, the Launchpad's `template`): the check is of what the run would send."""
    override = template_override_problem(activation, template, connectors)
    if override is not None:
        return [override]
    activation = with_run_choices(activation, template=template)
    catalogs = fetch_catalogs(activation, connectors)
    plan = activation.spec.channel_plan
    # The plan's templates, then each experiment variant's own.
    checked = [("", step) for step in plan.steps]
    experiment = activation.spec.experiment
    for variant in experiment.variants if experiment is not None else []:
        own, _ = variant_plan(plan, activation.spec.policy, variant)
        checked += [
            (f"variant {variant.name}: ", step)
            for step in own.steps
            if step.channel in variant.messages
        ]
    problems = []
    for prefix, step in checked:
        if step.template is None:
            continue
        catalog = catalogs[step.connector]
        if catalog is None:
            continue  # the platform approves its own campaigns
        if not hasattr(connectors[step.connector], "fetch_templates"):
            problems.append(f"connector {step.connector!r} cannot list its templates")
            continue
        problem = template_problem(catalog, step.template, plan.purpose)
        if problem:
            problems.append(prefix + problem)
    return list(dict.fromkeys(problems))


def template_override_problem(
    activation: Activation, template: str | None, connectors: Mapping[str, Connector]
) -> str | None:
    """Why a run's template choice (`--template`, the Launchpad's `template`) may not be sent,
    in one actionable line; None when it may, or when it is defs.yaml's own template.

    The rules are the `template_approved` check's. Without this, a typo or a PENDING template
    would not fail the run: the policy would exclude every customer from the step
    (template_not_approved) and quietly move them to the next channel of the plan.
    """
    first = next((s for s in activation.spec.channel_plan.steps if s.template is not None), None)
    if not template or first is None or first.template is None or template == first.template.name:
        return None
    chosen = with_run_choices(activation, template=template)
    step = next(s for s in chosen.spec.channel_plan.steps if s.template is not None)
    assert step.template is not None
    catalog = fetch_catalogs(chosen, connectors).get(step.connector)
    if catalog is None:
        return None  # the platform approves its own campaigns: nothing to check here
    purpose = chosen.spec.channel_plan.purpose
    problem = template_problem(catalog, step.template, purpose)
    if problem is None:
        return None
    spec = step.template
    usable = sorted(
        {
            info.name
            for info in catalog
            if info.language == spec.language
            and template_problem(catalog, spec.model_copy(update={"name": info.name}), purpose)
            is None
        }
    )
    categories = " or ".join(sorted(CATEGORIES_FOR_PURPOSE[purpose]))
    return (
        f"run template {template!r} refused: {problem}. Choose an APPROVED {categories} "
        f"template of {step.connector} in {spec.language} taking {len(spec.variables)} "
        f"parameter(s) ({', '.join(usable) or 'none in the catalog'}), or leave --template "
        f"(the Launchpad's template) unset to send {first.template.name!r} from defs.yaml"
    )


def load_suppressions(
    activation: Activation,
    warehouse: Warehouse,
    regions: list[str],
    cache: PhoneCache | None = None,
) -> pl.DataFrame:
    path = activation.suppression_sql
    if not path.is_file():
        raise FileNotFoundError(f"{path}: suppression SQL not found (activation {activation.name})")
    raw = warehouse.read_table_sql(path.read_text(encoding="utf-8"))
    return normalise_suppressions(raw, regions, cache)


def phone_cache(ledger: Ledger | None) -> PhoneCache | None:
    """The numbers' normalisations kept beside `ledger`; None without a ledger or without a
    key (no key, no cache: nothing derived from a number is kept, pii.py)."""
    key = pii_key()
    return PhoneCache(ledger.engine, key=key) if ledger is not None and key else None


def compute_decisions(
    activation: Activation,
    audience: pl.DataFrame,
    warehouse: Warehouse,
    connectors: Mapping[str, Connector] | None,
    now: datetime,
    max_recipients: int | None,
    ledger: Ledger | None = None,
    partition_key: str | None = None,
) -> Decisions:
    """The policy's decision for every customer of `audience`. `connectors` None: the
    templates are taken as approved (another activation's decisions worked out for the daily
    cap, whose catalogs are its own connectors' to read)."""
    validate_audience(activation, audience)  # the blocking check said so; never decide on less
    regions = sorted(audience["country"].drop_nulls().unique().to_list())
    cache = phone_cache(ledger)
    suppressions = load_suppressions(activation, warehouse, regions, cache)
    catalogs: Mapping[str, list[TemplateInfo] | None] = (
        fetch_catalogs(activation, connectors)
        if connectors is not None
        else dict.fromkeys(activation.spec.connectors())
    )
    policy = activation.spec.policy
    recent = None
    if ledger is not None and policy.frequency_caps:
        days = max(cap.days for cap in policy.frequency_caps)
        # This partition's own sends are a re-run's "already sent", not a reason to cap.
        exclude = (activation.name, partition_key) if partition_key else None
        recent = ledger.sends_since(now - timedelta(days=days), exclude=exclude, committed=True)
    opted_out = backoff = None
    if ledger is not None:
        # What customers told us since the warehouse last heard: opt-outs (their replies, the
        # providers' refusals) and, for the 24-hour window, their latest WhatsApp message.
        ledger.suppress_refusals(refusal_codes())
        opted_out = ledger.opt_outs()
        backoff = ledger.marketing_backoff(backoff_codes(), now)
        audience = with_replies(audience, ledger.last_inbound("whatsapp"))
    engine: dict[str, Any] = {
        "now": now,
        "suppressions": suppressions,
        "catalogs": catalogs,
        "policy": policy,
        "recent_sends": recent,
        "max_recipients": max_recipients,
        "salt": activation.name,
        "phone_cache": cache,
        "opt_outs": opted_out,
        "marketing_backoff": backoff,
    }
    cap = get_settings().daily_cap
    spec = activation.spec
    if cap and spec.priority is not None and spec.events is None and ledger and partition_key:
        # One message a day across activations: what those above this one take today.
        def decide_other(name: str, other: ActivationSpec, day: str) -> pl.DataFrame:
            assert ledger is not None
            them = Activation.from_spec(name, other, dialect=warehouse.dialect)
            defaults = {
                k: p.default for k, p in other.audience.parameters.items() if p.default is not None
            }
            their_audience = compute_audience(them, warehouse, day, defaults, ledger)
            theirs = compute_decisions(
                them,
                their_audience,
                warehouse,
                None,
                now,
                other.limits.max_recipients,
                ledger,
                day,
            ).frame
            return theirs.filter(pl.col("decision").is_in([SEND, DEFER])).select(
                pl.col("customer_id").cast(pl.String), pl.col("channel").cast(pl.String)
            )

        claims = daily_claims(activation.name, spec, partition_key, ledger, decide_other)
        engine["daily_taken"] = taken_per_channel(claims)
        engine["daily_cap"] = cap
        pending = as_recent_sends(claims, now)
        if not pending.is_empty():
            engine["recent_sends"] = pl.concat(
                [
                    engine["recent_sends"] if engine["recent_sends"] is not None else EMPTY_SENDS,
                    pending,
                ],
                how="vertical",
            )
    experiment = activation.spec.experiment
    if experiment is None:
        decided = decide(audience, activation.spec.channel_plan, **engine)
    else:
        # Customers keep the variant the ledger recorded for them; the rest by their hash.
        salt = variant_salt(experiment, activation.name)
        recorded = ledger.variant_assignments(activation.name, salt) if ledger is not None else None
        decided = decide_experiment(
            audience, activation.spec.channel_plan, experiment, recorded=recorded, **engine
        )
    return with_country(decided, audience)


def with_country(decided: Decisions, audience: pl.DataFrame) -> Decisions:
    """The decisions with each customer's `country` (upper case, categorical): the ledger
    keeps it beside the send, to price it by the rate card the provider bills by. The
    engine keeps the audience's rows in their order, so it is the audience's own column."""
    frame = decided.frame
    if frame.height != audience.height:  # never: `decide` answers every row, in order
        raise AssertionError("the decisions do not match the audience row for row")
    country = audience["country"].cast(pl.String).str.to_uppercase().cast(pl.Categorical)
    return dataclasses.replace(decided, frame=frame.with_columns(country.alias("country")))


def refusal_codes() -> dict[tuple[str, str], str]:
    """(connector, error code) -> the purpose an opt-out it means covers, from every installed
    connector's `opt_out_codes` (Twilio 21610: all; Meta 131050: marketing)."""
    return {
        (name, code): purpose
        for name, found in plugins().items()
        for code, purpose in found.capabilities.opt_out_codes
    }


def backoff_codes() -> dict[str, frozenset[str]]:
    """Connector -> its `backoff_codes` (Meta 131049), from every installed connector."""
    return {name: found.capabilities.backoff_codes for name, found in plugins().items()}


def with_replies(audience: pl.DataFrame, replies: pl.DataFrame) -> pl.DataFrame:
    """`whatsapp_last_inbound_at` as the later of the warehouse's and the customer's latest
    WhatsApp message to us (the receiver's), so a free-form message may follow a reply at once."""
    column = "whatsapp_last_inbound_at"
    if replies.is_empty() or column not in audience.columns:
        return audience
    ids = audience["customer_id"].cast(pl.String).alias("_id")
    latest = audience.select(ids).join(
        replies.rename({"customer_id": "_id"}), on="_id", how="left", maintain_order="left"
    )["last_inbound_at"]
    merged = pl.max_horizontal(pl.col(column).cast(pl.Datetime("us", "UTC")), latest)
    return audience.with_columns(merged.alias(column))


def quiet_hours_outside(send_window: tuple[str, str], enabled: bool = True) -> QuietHoursSpec:
    """The quiet hours a local send window (start, end: HH:MM) leaves: its complement.
    Raises ValueError naming the window when it is not two times of day."""
    start, end = send_window
    try:
        return QuietHoursSpec(enabled=enabled, start=end, end=start)
    except ValidationError as err:
        message = err.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"send window {start}-{end}: {message}") from None


def with_run_choices(
    activation: Activation,
    template: str | None = None,
    send_window: tuple[str, str] | None = None,
) -> Activation:
    """The activation with a run's Launchpad choices: another template name for the plan's
    first template step, and the local send window (the complement of the quiet hours).
    Invalid values are refused with the field's name; the policy still checks the template
    against the provider's catalog."""
    spec = activation.spec
    plan = spec.channel_plan
    steps = list(plan.steps)
    if template:
        index = next((i for i, s in enumerate(steps) if s.template is not None), None)
        if index is None:
            raise ValueError(f"template {template!r}: the plan of {activation.name} has none")
        old = steps[index]
        steps[index] = old.model_copy(
            update={"template": old.template.model_copy(update={"name": template})}  # type: ignore[union-attr]
        )
    policy = spec.policy
    if send_window is not None:
        quiet = quiet_hours_outside(send_window, policy.quiet_hours.enabled)
        policy = policy.model_copy(update={"quiet_hours": quiet})
    changed = spec.model_copy(
        update={"channel_plan": plan.model_copy(update={"steps": steps}), "policy": policy}
    )
    return dataclasses.replace(activation, spec=changed)


def decision_counts(decisions: pl.DataFrame) -> pl.DataFrame:
    """Customers per country, channel, decision and reason (the funnel's first stages)."""
    country = pl.col("country") if "country" in decisions.columns else pl.lit(None, pl.String)
    keys = ("country", "channel", "decision", "reason")
    # By their codes, on the streaming engine, named after: grouped by the four as text,
    # eagerly, 5,397,003 decisions (10,000,000 customers) took 1.3 GB more; this, 6 MB.
    return (
        decisions.lazy()
        .group_by(country.alias("country"), "channel", "decision", "reason")
        .agg(pl.len().alias("customers"))
        .with_columns(pl.col(*keys).cast(pl.String))
        .collect(engine="streaming")
    )


def eligible_count(decisions: pl.DataFrame) -> int:
    """Customers a run would message, now or after their quiet hours."""
    return decisions.filter(pl.col("decision").is_in([SEND, DEFER])).height


def sample_messages(
    decisions: pl.DataFrame,
    plan: ChannelPlanSpec,
    per_channel: int = 3,
    experiment: ExperimentSpec | None = None,
) -> str:
    """A Markdown table of rendered messages per channel (and variant, in an experiment),
    phone numbers masked."""
    chosen = decisions.filter(pl.col("channel").is_not_null())
    parts = plans_by_variant(chosen, plan, experiment)
    variants = any(name is not None for name, _, _ in parts)
    lines = [
        "| variant | channel | to | message |" if variants else "| channel | to | message |",
        "|---|---|---|---|" if variants else "|---|---|---|",
    ]
    for name, part, own in parts:
        lines += _sample_lines(part, own, per_channel, f"{name or ''} | " if variants else "")
    return "\n".join(lines)


def _sample_lines(
    chosen: pl.DataFrame, plan: ChannelPlanSpec, per_channel: int, prefix: str
) -> list[str]:
    lines = []
    for channel in sorted(chosen["channel"].cast(pl.String).unique().to_list()):
        sample = rendered(chosen.filter(pl.col("channel") == channel).head(per_channel), plan)
        for row in sample.iter_rows(named=True):
            step = plan.step_for(channel)
            if step.handoff is not None:
                values = zip(step.handoff.properties, row["variables"] or [], strict=False)
                group = step.handoff.subscription_group
                text = (
                    f"handed to `{step.connector}`: `{step.handoff.attribute}` set, "
                    + ", ".join(f"{name}={value}" for name, value in values)
                    + (f"; subscribed to `{group}`" if group else "")
                )
            elif row["template_name"]:
                params = ", ".join(row["variables"] or [])
                text = f"template `{row['template_name']}` ({row['template_language']}): {params}"
            else:
                text = row["body"]
            text = text.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {prefix}{channel} | {mask_phone(row['phone_e164'])} | {text} |")
    return lines


def policy_breaches(
    activation: Activation,
    decisions: pl.DataFrame,
    audience: pl.DataFrame,
    suppressions: pl.DataFrame,
) -> dict[str, int]:
    """Chosen recipients that break consent or suppression, re-checked independently of the
    engine: from the audience's own consent columns and a fresh suppression list."""
    purpose = activation.spec.channel_plan.purpose
    chosen = (  # only the columns read here: not a copy of every column of the chosen rows
        decisions.lazy()
        .filter(pl.col("decision").is_in([SEND, DEFER]))
        .select("customer_id", "channel", "phone_e164", "reason")
        .collect()
    )
    no_consent = pl.lit(False)
    consents: dict[str, str] = {}
    for step in activation.spec.channel_plan.steps:
        column = consent_column(step.channel, purpose)
        consents.setdefault(column, f"_consent_{len(consents)}")
        no_consent = no_consent | (
            (pl.col("channel") == step.channel) & ~pl.col(consents[column]).fill_null(False)
        )
    # Only the key and the consent columns of the audience: the whole frame joined to the
    # chosen rows would copy every column (gigabytes at 10,000,000 customers).
    opt_ins = audience.select("customer_id", *(pl.col(c).alias(a) for c, a in consents.items()))
    joined = chosen.select("customer_id", "channel").join(opt_ins, on="customer_id", how="left")
    everywhere = suppressions.filter(pl.col("channel").is_null())["phone_e164"]
    per_channel = suppressions.filter(pl.col("channel").is_not_null()).select(
        "phone_e164", "channel", pl.lit(True).alias("_suppressed")
    )
    on_channel = (
        chosen.with_columns(pl.col("channel").cast(pl.String))
        .join(per_channel, on=["phone_e164", "channel"], how="inner")
        .height
    )
    return {
        "without_consent": joined.filter(no_consent).height,
        "suppressed": chosen.filter(pl.col("phone_e164").is_in(everywhere.implode())).height
        + on_channel,
        "chosen_with_a_reason": chosen.filter(pl.col("reason").is_not_null()).height,
    }


def audience_size_problem(size: int, previous: int | None, factor: float) -> str | None:
    """Why this audience size is suspicious against the last run's, or None."""
    if previous is None or previous < 100:
        return None  # no baseline worth comparing (first run, or a tiny audience)
    if size == 0:
        return f"the audience is empty; the last successful run had {previous:,}"
    ratio = max(size / previous, previous / size)
    if ratio > factor:
        return (
            f"the audience is {size:,}, {ratio:.1f}x the last successful run's {previous:,} "
            f"(limit {factor:g}x, limits.max_audience_change). If this is intended, re-run "
            "with the run tag cdp/allow_audience_change=true"
        )
    return None


def invalid_phone_share(excluded: Mapping[str, int], audience_size: int) -> float:
    """The share of the audience excluded for a missing or invalid number, from the decisions'
    counts by reason (`Decisions.excluded_by_reason`)."""
    if audience_size <= 0:
        return 0.0
    invalid = excluded.get(reasons.INVALID_PHONE, 0) + excluded.get(reasons.MISSING_PHONE, 0)
    return invalid / audience_size


# ---------------------------------------------------------------- deliveries


@dataclass
class DeliverySummary:
    """What the deliveries step did, and where the whole partition stands; recorded as the
    asset's metadata (which the CLI's `RunSummary` reads back)."""

    activation: str
    partition: str
    dry_run: bool
    eligible: int = 0  # chosen now or after quiet hours (what a preview is compared on)
    to_send: int = 0
    claimable: int = 0  # due now or within a delivery's wait: what claim workers are for
    deferred: int = 0
    holdout: int = 0
    cancelled: int = 0
    sent: int = 0
    failed: int = 0
    unknown: int = 0
    dead_letter: int = 0
    already_sent: int = 0
    already_done_other: int = 0
    recovered_in_flight: int = 0
    resent_unknown: int = 0  # unknown rows planned again (delivery.resend_unknown)
    retried: int = 0  # retryable answers waited out in the ledger, then sent again
    # Claimed in their customer's quiet hours (a long send reached them after these began):
    # not sent, waiting in the ledger until the hours end (also in `deferred`).
    held_for_quiet_hours: int = 0
    revived: int = 0  # dead letters an earlier version gave up on, planned again
    waiting: int = 0  # planned and due, not sent by this run (a stopped or failed step)
    # In flight now: another run is sending them, or a stopped one left them (recovered by
    # the next run once its worker is gone).
    in_flight: int = 0
    unknown_reconciled: int = 0  # the partition's `unknown` sends a status report proved sent
    replied: int = 0  # the partition's customers who wrote back (any channel, any time)
    opted_out: int = 0  # … and who are opted out now
    elapsed_seconds: float = 0.0
    throughput_per_second: float = 0.0
    p50_latency_ms: float = 0.0
    p95_latency_ms: float = 0.0
    estimated_seconds: float = 0.0
    # The rate the connectors' limits allow for this step's mix of connectors (the alerts'
    # "far below the configured rate"); 0 when nothing was chosen.
    configured_rate_per_second: float = 0.0
    error_codes: dict[str, int] = field(default_factory=dict)
    # Sent, but qualified by the provider (Meta: held_for_quality_assessment, paused).
    accepted_as: dict[str, int] = field(default_factory=dict)
    ledger_states: dict[str, int] = field(default_factory=dict)
    dead_letter_by_reason: dict[str, int] = field(default_factory=dict)  # the partition's
    cancelled_by_reason: dict[str, int] = field(default_factory=dict)  # the partition's
    stopped_by: str | None = None  # why the step stopped before sending everything due
    started_at: float = 0.0  # epoch seconds when the step began (its workers may be elsewhere)
    workers: list[dict[str, Any]] = field(default_factory=list)  # each claim worker's figures

    def as_json(self) -> dict[str, Any]:
        """Recorded whole as the deliveries asset's `summary` metadata entry."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeliverySummary:
        """Rebuilt from `as_json` (by the CLI); names an older version did not record keep
        their defaults, names this one does not know are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class DeliveryFailed(CdpError):
    """The deliveries step stopped before everything due was sent (provider down, refused
    credentials or template, interrupted): `summary` says where the partition stands, and
    every message not sent stays planned for the next run."""

    transient = True

    def __init__(self, message: str, summary: DeliverySummary) -> None:
        super().__init__(message)
        self.summary = summary


def delivery_options(in_flight: int | None = None) -> DeliveryOptions:
    """The delivery engine's settings (CDP_DELIVERY_*), checked when they are read; a run's
    `in_flight` (defs.yaml, the Launchpad, --in-flight) replaces CDP_DELIVERY_CONCURRENCY."""
    settings = get_settings()
    return DeliveryOptions(
        concurrency=in_flight or settings.delivery_concurrency,
        max_attempts=settings.delivery_max_attempts,
        lease_seconds=settings.delivery_lease_seconds,
        rate_limit_url=settings.rate_limit_url or None,
    )


def deliver_decisions(
    activation: Activation,
    decisions: pl.DataFrame,
    ledger: Ledger,
    connectors: Mapping[str, Connector],
    partition_key: str,
    dry_run: bool,
    run_id: str | None = None,
    options: DeliveryOptions | None = None,
    step: str = INITIAL_STEP,
) -> DeliverySummary:
    """Plan `decisions` (rows of one `step`) in the ledger and send what is due of that step,
    in this process: `prepare_delivery`, one `send_due`, `finish_delivery`. (Dagster runs
    the three as separate steps, with `delivery.workers` claim workers in the middle.)

    Raises `DeliveryFailed` (with the summary) when the step stopped before sending
    everything due.
    """
    try:
        summary = prepare_delivery(
            activation, decisions, ledger, connectors, partition_key, dry_run, run_id, step
        )
        if dry_run:
            return summary
        return send_and_finish(
            summary, ledger, connectors, step, run_id, options, caps_at_claim(activation)
        )
    finally:
        ledger.dispose()


def caps_at_claim(activation: Activation) -> tuple[FrequencyCap, ...]:
    """The activation's frequency caps as each claim holds them again (`Ledger.claim`): the
    policy reads them when it decides, the claim when two activations decided at once."""
    caps = activation.spec.policy.frequency_caps
    return tuple(FrequencyCap(c.purpose, c.channel, c.max_messages, c.days) for c in caps)


def send_and_finish(
    summary: DeliverySummary,
    ledger: Ledger,
    connectors: Mapping[str, Connector],
    step: str,
    run_id: str | None,
    options: DeliveryOptions | None = None,
    caps: tuple[FrequencyCap, ...] = (),
) -> DeliverySummary:
    """A prepared step's sending in this process: one claim worker, then `finish_delivery`;
    `caps`: the activation's frequency caps, held again at each claim."""
    scope = DeliveryScope(summary.activation, summary.partition, step, run_id, caps)
    return finish_delivery(summary, [send_due(ledger, scope, connectors, options)], ledger, step)


def prepare_delivery(
    activation: Activation,
    decisions: pl.DataFrame,
    ledger: Ledger,
    connectors: Mapping[str, Connector],
    partition_key: str,
    dry_run: bool,
    run_id: str | None = None,
    step: str = INITIAL_STEP,
) -> DeliverySummary:
    """Everything before the first claim: a dry run's whole preview; otherwise mend what
    gone workers left in flight, revive rows an earlier version gave up on, plan the rows,
    cancel what the policy no longer chooses (and, for the `fallback` step, fallbacks whose
    first message has since landed), expire overdue ones, and check the connectors answer.

    For the `fallback` step, refused fallbacks are recorded too (`excluded`, with their
    reason), so each is decided once. Raises `ConnectorError` when a connector does not answer
    or refuses the credentials (nothing claimed).
    """
    now = datetime.now(UTC)
    fallback = step == FALLBACK_STEP
    chosen = decisions.filter(pl.col("decision").is_in([SEND, DEFER]))
    summary = DeliverySummary(activation=activation.name, partition=partition_key, dry_run=dry_run)
    summary.started_at = time.time()
    summary.eligible = chosen.height
    summary.holdout = decisions.filter(pl.col("decision") == HOLDOUT).height
    if seconds := _seconds_at_rate(chosen, connectors, chosen.height):
        summary.configured_rate_per_second = round(chosen.height / seconds, 1)
    # The chosen rows' keys, written by the expression the plan writes its own with.
    keys = chosen.select(
        idempotency_key_expr(
            activation.name,
            partition_key,
            pl.col("customer_id").cast(pl.String),
            pl.col("step").cast(pl.String),
        )
    ).to_series()
    if dry_run:
        held = ledger.partition_states(activation.name, partition_key)
        resendable = _resendable(activation, connectors)
        _preview_counts(summary, chosen, keys, held, now, activation.spec, resendable)

        summary.estimated_seconds = _estimate_seconds(chosen, connectors, summary.to_send)
        _stamp_elapsed(summary)
        return summary

    recorded = [SEND, DEFER, HOLDOUT, *([EXCLUDE] if fallback else [])]
    to_plan = rendered_messages(
        decisions.filter(pl.col("decision").is_in(recorded)),
        activation.spec.channel_plan,
        activation.spec.experiment,
    )
    recover_interrupted(activation, ledger, connectors, partition_key, summary)
    deadline = activation.spec.send_deadline()
    # Before the plan: a revived row is planned like any other, so it takes the decision's
    # latest `not_before` (quiet hours now) or is cancelled below when no longer chosen.
    summary.revived = ledger.revive_given_up(activation.name, partition_key, step, deadline)
    experiment = activation.spec.experiment
    if experiment is not None and not fallback and "variant" in to_plan.columns:
        # Before the plan: a crash between the two leaves assignments a re-run reuses.
        ledger.record_assignments(
            activation.name, variant_salt(experiment, activation.name), to_plan
        )
    planned = ledger.plan(
        activation.name,
        partition_key,
        to_plan,
        run_id=run_id,
        purpose=activation.spec.channel_plan.purpose,
    )
    if not fallback:  # the funnel's audience and eligible stages (sql/reporting/funnel.sql)
        # After the plan, never before: they tell the daily cap's lower activations that this
        # one ran the day, which then read whom it takes from its rows (daily_cap._ran). Before
        # them, a lower one deciding between the two commits found it ran and took nobody.
        ledger.record_decision_counts(
            activation.name, partition_key, step, decision_counts(decisions)
        )
    summary.already_sent = planned.existing.get(SENT, 0)
    summary.already_done_other = (
        planned.existing.get(FAILED, 0)
        + planned.existing.get(UNKNOWN, 0)
        + planned.existing.get(DEAD_LETTER, 0)
    )
    if fallback:
        summary.cancelled = ledger.cancel_landed_fallbacks(activation.name, partition_key)
    # Read only for rows no longer chosen (none, mostly): lazy, so a large audience's
    # exclusions are not copied for nothing.
    excluded = (
        decisions.lazy()
        .filter(pl.col("decision") == EXCLUDE)
        .select(pl.col("customer_id").cast(pl.String), pl.col("reason").cast(pl.String))
    )
    summary.cancelled += ledger.cancel_unchosen(
        activation.name,
        partition_key,
        keys,
        reason=f"no longer chosen by the policy at {now:%Y-%m-%d %H:%M} UTC",
        step=step,
        excluded=excluded,
        absent=reasons.FALLBACK_NOT_DUE if fallback else reasons.LEFT_AUDIENCE,
    )
    # A STOP recorded after the policy read the opt-outs found no row of this run to cancel:
    # a covering opt-out of the last day cancels it now (an older one the policy applied).
    summary.cancelled += ledger.cancel_recently_opted_out(
        activation.name, partition_key, step, now - timedelta(days=1)
    )
    ledger.expire_overdue(activation.name, partition_key, step, deadline)
    due_now = ledger.due_counts(activation.name, partition_key, step, now)
    summary.to_send = sum(due_now.values())
    # What claim workers would find: due now, or within the wait of a delivery (a retry an
    # earlier run backed off), which they wait out, as one in-process delivery does.
    soon = ledger.due_counts(
        activation.name, partition_key, step, now + claim_horizon(delivery_options())
    )
    summary.claimable = sum(soon.values())
    preflight({name: connectors[name] for name in soon if name in connectors})
    return summary


def _preview_counts(
    summary: DeliverySummary,
    chosen: pl.DataFrame,
    keys: pl.Series | Sequence[str],
    held: pl.DataFrame,
    now: datetime,
    spec: ActivationSpec,
    resendable: Sequence[str],
) -> None:
    """A dry run's counts, as the run would make them. First what the run mends before its
    plan: a row a gone worker left in flight (`orphaned`) is planned again through a
    connector in `resendable`, else unknown (`recover_interrupted`); a dead letter an earlier
    version gave up on within the send deadline is planned again (`revive_given_up`).
    Then: a chosen message the ledger does not hold yet is planned, and one it holds still
    planned (deferred by an earlier run, or left by a stopped one) takes the decision's latest
    `not_before` (`Ledger.plan`), as does an `unknown` one when the activation resends those
    (`delivery.resend_unknown`); such a message is sent now when that is due, else deferred,
    unless it has waited past the send deadline (`expire_overdue` makes it a dead letter
    instead). A message in any other state is not sent again: counted as already sent, or
    done otherwise (failed, unknown, dead letter). Rows a living worker of another run holds
    in flight are in neither count."""
    resend_unknown = spec.delivery.resend_unknown
    deadline = spec.send_deadline()
    held_at = {
        name: pl.col(name).str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_zone="UTC")
        if held.schema[name] == pl.String  # SQLite's text
        else pl.col(name)
        for name in ("planned_at", "not_before")
    }
    given_up = (
        (pl.col("state") == DEAD_LETTER)
        & (pl.col("error_code").is_null() | (pl.col("error_code") != DEADLINE_PASSED))
        & (pl.coalesce(held_at["not_before"], held_at["planned_at"]) >= now - deadline)
    )
    recovered = pl.when(pl.col("connector").is_in(list(resendable))).then(pl.lit(PLANNED))
    mended = (
        pl.when(pl.col("orphaned"))
        .then(recovered.otherwise(pl.lit(UNKNOWN)))
        .when(given_up)
        .then(pl.lit(PLANNED))
        .otherwise(pl.col("state"))
    )
    states = pl.DataFrame(
        {
            "idempotency_key": keys,
            "not_before": chosen["not_before"].cast(pl.Datetime("us", "UTC")),
        }
    ).join(
        held.select(
            "idempotency_key",
            mended.alias("state"),
            held_at["planned_at"].cast(pl.Datetime("us", "UTC")).alias("planned_at"),
        ),
        on="idempotency_key",
        how="left",
    )
    state = pl.col("state")
    # Not in the ledger yet: a null state, which is in no list (fill_null: polars' `is_in`
    # of a null is null, and a null would drop the row from every sum).
    reopened = state.is_in([PLANNED, UNKNOWN] if resend_unknown else [PLANNED]).fill_null(False)
    open_ = state.is_null() | reopened
    due = pl.col("not_before").is_null() | (pl.col("not_before") <= now)
    waited_since = pl.coalesce("not_before", "planned_at")
    late = reopened & (waited_since < now - deadline).fill_null(False)
    done = [FAILED, DEAD_LETTER, *([] if resend_unknown else [UNKNOWN])]
    counts = states.select(
        to_send=(open_ & due & ~late).sum(),
        deferred=(open_ & ~due & ~late).sum(),
        already_sent=(state == SENT).sum(),
        done_other=state.is_in(done).sum(),
    ).row(0, named=True)
    summary.to_send, summary.deferred = counts["to_send"], counts["deferred"]
    summary.already_sent, summary.already_done_other = counts["already_sent"], counts["done_other"]


def send_due(
    ledger: Ledger,
    scope: DeliveryScope,
    connectors: Mapping[str, Connector],
    options: DeliveryOptions | None = None,
    worker: str = "1",
) -> DeliveryReport:
    """One claim worker: claim and send due rows of `scope` until none are due. Any number
    of these may run at once, in any processes or hosts sharing the ledger (the claim hands
    each row to one of them). A worker that stopped early says why in `stopped_by`; what it
    did not send stays planned."""
    try:
        report = deliver(ledger, scope, connectors, options or delivery_options())
    except (ConnectorError, LeaseLost) as err:
        report = getattr(err, "report", None) or DeliveryReport()
        report.stopped_by = str(err)
    report.worker = worker
    return report


def finish_delivery(
    summary: DeliverySummary,
    reports: list[DeliveryReport],
    ledger: Ledger,
    step: str = INITIAL_STEP,
) -> DeliverySummary:
    """After every claim worker stopped: statuses that beat their send's answer find it, the
    workers' reports are summed, and the summary says where the whole partition stands.
    Raises `DeliveryFailed` (with the summary) when a worker stopped before everything due
    was sent."""
    ledger.apply_pending_statuses()
    report = DeliveryReport.combined(reports)
    _fill_from_report(summary, report)
    summary.workers = [
        {
            "worker": r.worker,
            "sent": r.sent,
            "seconds": round(r.elapsed, 2),
            "per_second": round(r.sent / r.elapsed, 1) if r.elapsed else 0.0,
            **({"stopped_by": r.stopped_by} if r.stopped_by else {}),
        }
        for r in reports
    ]
    _fill_partition(summary, ledger, step)
    _stamp_elapsed(summary)
    stopped = [r.stopped_by for r in reports if r.stopped_by]
    if stopped:
        summary.stopped_by = stopped[0]
    logs.run_summary({**summary.as_json(), "step": step})
    if stopped:
        raise DeliveryFailed(stopped[0], summary)
    return summary


def _stamp_elapsed(summary: DeliverySummary) -> None:
    """Wall time since the step began (across processes: `started_at` is epoch seconds)."""
    summary.elapsed_seconds = round(time.time() - summary.started_at, 3)
    if summary.elapsed_seconds and summary.sent:
        summary.throughput_per_second = round(summary.sent / summary.elapsed_seconds, 1)


def _fill_from_report(summary: DeliverySummary, report: DeliveryReport) -> None:
    summary.sent = report.sent
    summary.failed = report.failed
    summary.unknown = report.unknown
    summary.retried = report.retried
    summary.held_for_quiet_hours = report.quiet_hours
    summary.error_codes = dict(report.error_codes)
    summary.accepted_as = dict(report.provider_statuses)
    summary.p50_latency_ms = round(report.latency_ms(0.50), 1)
    summary.p95_latency_ms = round(report.latency_ms(0.95), 1)


def _fill_partition(summary: DeliverySummary, ledger: Ledger, step: str) -> None:
    """Where the whole partition stands after this run (not only what this run did)."""
    name, partition = summary.activation, summary.partition
    summary.deferred = ledger.deferred(name, partition, step=step)
    summary.ledger_states = ledger.counts(name, partition)
    summary.waiting = sum(ledger.due_counts(name, partition, step, datetime.now(UTC)).values())
    summary.in_flight = summary.ledger_states.get(IN_FLIGHT, 0)
    summary.dead_letter_by_reason = ledger.dead_letters_by_reason(name, partition)
    summary.cancelled_by_reason = ledger.cancelled_by_reason(name, partition)
    summary.unknown_reconciled = ledger.reconciled_count(name, partition)
    summary.dead_letter = sum(summary.dead_letter_by_reason.values())
    replies = ledger.reply_counts(name, partition)
    summary.replied, summary.opted_out = replies["replied"], replies["opted_out"]


def recover_interrupted(
    activation: Activation,
    ledger: Ledger,
    connectors: Mapping[str, Connector],
    partition_key: str,
    summary: DeliverySummary,
) -> None:
    """Before anything is planned or sent: rows that workers which are gone (killed, stopped,
    or silent past their lease) left in flight become `unknown` (or `planned` again through an
    idempotent provider), and with `resend_unknown` the partition's unknown rows are planned
    again. Rows a living worker holds are left alone."""
    summary.recovered_in_flight = ledger.recover_interrupted(
        activation.name, partition_key, _resendable(activation, connectors)
    )
    if activation.spec.delivery.resend_unknown:  # opted in: the customer may get these twice
        summary.resent_unknown = ledger.replan_unknown(activation.name, partition_key)


def _resendable(activation: Activation, connectors: Mapping[str, Connector]) -> list[str]:
    """The connectors through which a message left in flight is sent again: those whose
    provider de-duplicates on our key, or every one when the activation resends unknowns."""
    resend_unknown = activation.spec.delivery.resend_unknown
    return [n for n, c in connectors.items() if c.capabilities.idempotency or resend_unknown]


def _estimate_seconds(chosen: pl.DataFrame, connectors: Mapping[str, Connector], n: int) -> float:
    return round(_seconds_at_rate(chosen, connectors, n), 1)


def _seconds_at_rate(chosen: pl.DataFrame, connectors: Mapping[str, Connector], n: int) -> float:
    """Seconds `n` of the chosen messages take at their connectors' rate limits (each
    connector sends its share in parallel with the others)."""
    if n <= 0 or chosen.is_empty():
        return 0.0
    shares = chosen.group_by("connector").len()
    total = chosen.height
    seconds = 0.0
    for name, count in zip(shares["connector"].to_list(), shares["len"].to_list(), strict=True):
        if name in connectors:
            seconds = max(seconds, (n * count / total) / rate_of(connectors[name]))
    return seconds
