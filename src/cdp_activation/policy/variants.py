"""A/B/n experiments: which variant each customer is in, and the policy applied per variant.

A customer's variant is the one the ledger recorded for them in this activation (the first
time they were planned), else the one their stable hash (`hashing.stable_fraction` of the
customer id under `variant:<salt>`) falls in, by the variants' weights. So re-runs agree,
a new customer joins by today's weights, and a change of weights or audience never moves a
customer already assigned. A recorded variant the experiment no longer has is assigned
again by the hash.

Each variant is decided by the same engine with its own plan (messages, channel order) and
quiet hours (its send window); the rules that span the audience, one message per phone
number and the recipient cap, are then applied across variants, so an experiment never
sends more than the activation would without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from cdp_activation.policy import reasons
from cdp_activation.policy.engine import Decisions, decide, rendered
from cdp_activation.policy.hashing import stable_fraction
from cdp_activation.spec import (
    ChannelPlanSpec,
    ExperimentSpec,
    HoldoutSpec,
    PolicySpec,
    QuietHoursSpec,
    VariantSpec,
)
from cdp_activation.vocabulary import DEFER, EXCLUDE, HOLDOUT, SEND

# Set to null on a customer taken off their channel after the variants are decided.
_MESSAGE_COLUMNS = (
    "channel",
    "connector",
    "step",
    "template_name",
    "template_language",
    "variables",
    "not_before",
    "send_until",
    "reopens_at",
    "window_until",
)


def variant_salt(experiment: ExperimentSpec, activation: str) -> str:
    return experiment.salt or activation


def hashed_variant(customer_id: pl.Expr, experiment: ExperimentSpec, salt: str) -> pl.Expr:
    """The index of the variant the customer's hash falls in, by the weights (UInt8)."""
    weights = [v.weight for v in experiment.variants]
    total = sum(weights)
    fraction = stable_fraction(customer_id, f"variant:{salt}")
    index: pl.Expr = pl.lit(len(weights) - 1, dtype=pl.UInt8)
    bound = 0.0
    bounds = []
    for weight in weights[:-1]:
        bound += weight / total
        bounds.append(bound)
    for position in reversed(range(len(bounds))):
        index = (
            pl.when(fraction < bounds[position])
            .then(pl.lit(position, dtype=pl.UInt8))
            .otherwise(index)
        )
    return index


def assign(
    customer_ids: pl.Series,
    experiment: ExperimentSpec,
    salt: str,
    recorded: pl.DataFrame | None = None,
) -> pl.Series:
    """Each customer's variant name (an Enum of the experiment's names), in `customer_ids`'
    order. `recorded` holds (customer_id text, variant) the ledger kept for this activation."""
    names = [v.name for v in experiment.variants]
    dtype = pl.Enum(names)
    frame = pl.DataFrame({"customer_id": customer_ids}).with_columns(
        pl.col("customer_id").cast(pl.String).alias("_id"),
        hashed_variant(pl.col("customer_id"), experiment, salt).alias("_hashed"),
    )
    hashed = pl.lit(pl.Series(names, dtype=dtype)).gather(pl.col("_hashed"))
    if recorded is None or recorded.is_empty():
        return frame.select(hashed.alias("variant")).to_series()
    kept = recorded.filter(pl.col("variant").is_in(names)).select(
        pl.col("customer_id").cast(pl.String).alias("_id"),
        pl.col("variant").cast(dtype).alias("_recorded"),
    )
    joined = frame.join(kept, on="_id", how="left", maintain_order="left")
    return joined.select(pl.coalesce("_recorded", hashed).alias("variant")).to_series()


def variant_steps(plan: ChannelPlanSpec, variant: VariantSpec) -> ChannelPlanSpec:
    """The plan as one variant sends it: its own messages, in its channel order."""
    steps = []
    for step in plan.steps:
        message = variant.messages.get(step.channel)
        if message is not None:
            step = step.model_copy(update={"template": message.template, "body": message.body})
        steps.append(step)
    if variant.channel_order is not None:
        steps.sort(key=lambda s: variant.channel_order.index(s.channel))  # type: ignore[union-attr]
    return plan.model_copy(update={"steps": steps})


def plans_by_variant(
    frame: pl.DataFrame, plan: ChannelPlanSpec, experiment: ExperimentSpec | None
) -> list[tuple[str | None, pl.DataFrame, ChannelPlanSpec]]:
    """`frame` (decisions rows) split by variant, each part with the plan its messages come
    from; one part with the plan itself without an experiment (or variant column)."""
    if experiment is None or "variant" not in frame.columns:
        return [(None, frame, plan)]
    parts: list[tuple[str | None, pl.DataFrame, ChannelPlanSpec]] = [
        (None, frame.filter(pl.col("variant").is_null()), plan)
    ]
    for variant in experiment.variants:
        part = frame.filter(pl.col("variant") == variant.name)
        parts.append((variant.name, part, variant_steps(plan, variant)))
    return [p for p in parts if not p[1].is_empty()]


def rendered_messages(
    frame: pl.DataFrame, plan: ChannelPlanSpec, experiment: ExperimentSpec | None
) -> pl.DataFrame:
    """`engine.rendered` of each variant's rows with that variant's own texts."""
    parts = [rendered(part, own) for _, part, own in plans_by_variant(frame, plan, experiment)]
    return pl.concat(parts, how="vertical") if len(parts) != 1 else parts[0]


def variant_plan(
    plan: ChannelPlanSpec, policy: PolicySpec, variant: VariantSpec
) -> tuple[ChannelPlanSpec, PolicySpec]:
    """The plan and policy one variant is decided with: its messages and channel order, its
    send window as quiet hours, everyone it routes held out if it is the holdout."""
    update: dict[str, Any] = {}
    if variant.send_window is not None:
        window = variant.send_window
        update["quiet_hours"] = QuietHoursSpec(start=window.end, end=window.start)
    if variant.holdout:
        # Decided as the plan would send them (`_hold` then holds them back).
        update["holdout"] = HoldoutSpec()
    return variant_steps(plan, variant), policy.model_copy(update=update)


def _hold(frame: pl.DataFrame) -> pl.DataFrame:
    """The holdout variant's chosen customers held back: decision and reason `holdout`, the
    channel they would have had kept, and their `not_before` too — when the message would
    have gone — so the results compare them with the sent arms from the same moment."""
    return _relabel(frame, pl.col("decision").is_in([SEND, DEFER]), HOLDOUT, reasons.HOLDOUT)


def _relabel(frame: pl.DataFrame, mask: pl.Expr, decision: str, reason: str) -> pl.DataFrame:
    """The masked rows' decision and reason replaced (the reason enum widened to hold it)."""
    reason_dtype = frame.schema["reason"]
    categories = reason_dtype.categories.to_list()  # type: ignore[attr-defined]
    if reason not in categories:
        reason_dtype = pl.Enum([*categories, reason])
    return frame.with_columns(
        pl.when(mask)
        .then(pl.lit(decision))
        .otherwise(pl.col("decision").cast(pl.String))
        .cast(frame.schema["decision"])
        .alias("decision"),
        pl.when(mask)
        .then(pl.lit(reason))
        .otherwise(pl.col("reason").cast(pl.String))
        .cast(reason_dtype)
        .alias("reason"),
    )


def decide_experiment(
    audience: pl.DataFrame,
    plan: ChannelPlanSpec,
    experiment: ExperimentSpec,
    *,
    salt: str,
    policy: PolicySpec | None = None,
    recorded: pl.DataFrame | None = None,
    max_recipients: int | None = None,
    **engine: Any,
) -> Decisions:
    """`decide` for an activation with an experiment: per customer also `variant`.

    `engine` is passed to `decide` as it is (now, suppressions, catalogs, recent sends, …);
    `recorded` holds the ledger's earlier assignments (customer_id text, variant)."""
    policy = policy or PolicySpec()
    variant = assign(audience["customer_id"], experiment, salt, recorded)
    frames: list[pl.DataFrame] = []
    positions: list[pl.Series] = []
    problems: dict[str, str] = {}
    for spec in experiment.variants:
        mask = variant == spec.name
        part = audience.filter(mask)
        if part.is_empty():
            continue
        own_plan, own_policy = variant_plan(plan, policy, spec)
        decided = decide(part, own_plan, policy=own_policy, salt=salt, **engine)
        frame = _hold(decided.frame) if spec.holdout else decided.frame
        frames.append(frame.with_columns(pl.lit(spec.name).alias("variant")))
        positions.append(mask.arg_true())
        for channel, problem in decided.template_problems.items():
            problems[f"{channel} ({spec.name})"] = problem
    if not frames:
        empty = decide(audience, plan, policy=policy, salt=salt, **engine).frame
        frames = [empty.with_columns(pl.lit(None, dtype=pl.String).alias("variant"))]
    frame = _concat(frames, [v.name for v in experiment.variants])
    if positions:  # the audience's order, as `decide` keeps it
        frame = frame.with_columns(pl.concat(positions).alias("_position"))
        frame = frame.sort("_position").drop("_position")
    frame = _one_message_per_phone(frame)
    frame = _apply_cap(frame, max_recipients, salt)
    return Decisions(frame=frame, template_problems=problems)


def _concat(frames: Sequence[pl.DataFrame], names: list[str]) -> pl.DataFrame:
    """The variants' decisions as one frame: each Enum column over the union of the
    variants' categories, `variant` an Enum of the experiment's names."""
    columns = frames[0].columns
    unified: dict[str, pl.DataType] = {"variant": pl.Enum(names)}
    widened: dict[str, list[str]] = {}
    for column in columns:
        dtypes = [f.schema[column] for f in frames]
        if isinstance(dtypes[0], pl.Enum):
            categories: list[str] = []
            for dtype in dtypes:
                categories.extend(dtype.categories.to_list())  # type: ignore[attr-defined]
            unified[column] = pl.Enum(list(dict.fromkeys(categories)))
        elif isinstance(dtypes[0], pl.Struct):
            # `variables`: as many fields as the variant with the most ("1", "2", …).
            fields: list[str] = []
            for dtype in dtypes:
                fields.extend(f.name for f in dtype.fields)  # type: ignore[attr-defined]
            widened[column] = list(dict.fromkeys(fields))

    def widen(frame: pl.DataFrame, column: str, fields: list[str]) -> pl.Expr:
        own = {f.name for f in frame.schema[column].fields}  # type: ignore[attr-defined]
        parts = [
            pl.col(column).struct.field(f) if f in own else pl.lit(None, dtype=pl.String).alias(f)
            for f in fields
        ]
        return pl.when(pl.col(column).is_not_null()).then(pl.struct(parts)).alias(column)

    return pl.concat(
        [
            f.select(columns).with_columns(
                *(pl.col(c).cast(t) for c, t in unified.items()),
                *(widen(f, c, fields) for c, fields in widened.items()),
            )
            for f in frames
        ],
        how="vertical",
    )


def _take_off(frame: pl.DataFrame, mask: pl.Series, reason: str) -> pl.DataFrame:
    """The masked customers excluded with `reason`, their message cleared."""
    off = pl.lit(mask)
    return _relabel(frame, off, EXCLUDE, reason).with_columns(
        pl.when(off).then(None).otherwise(pl.col(c)).alias(c) for c in _MESSAGE_COLUMNS
    )


def _chosen(frame: pl.DataFrame) -> pl.Series:
    return frame["decision"].is_in([SEND, DEFER])


def _one_message_per_phone(frame: pl.DataFrame) -> pl.DataFrame:
    """Across variants as within one: of chosen customers with the same number, only the
    lowest customer id is messaged (each variant already kept only its lowest)."""
    numbered = frame.select(
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"),
        "customer_id",
        "phone_e164",
        pl.Series(_chosen(frame)).alias("_chosen"),
    ).filter(pl.col("_chosen") & pl.col("phone_e164").is_not_null())
    losers = numbered.filter(
        pl.col("customer_id") != pl.col("customer_id").min().over("phone_e164")
    )["_row"]
    if losers.is_empty():
        return frame
    mask = pl.int_range(frame.height, dtype=pl.UInt32, eager=True).is_in(losers.implode())
    return _take_off(frame, mask, reasons.DUPLICATE_PHONE)


def _apply_cap(frame: pl.DataFrame, max_recipients: int | None, salt: str) -> pl.DataFrame:
    """At most `max_recipients` chosen across all variants, by the engine's own stable
    ranking (`engine._apply_cap`: the same salt, so the same customers as without variants)."""
    if max_recipients is None:
        return frame
    ranked = (
        frame.select(
            pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"),
            "customer_id",
            stable_fraction(pl.col("customer_id"), f"cap:{salt}").alias("_fraction"),
            pl.Series(_chosen(frame)).alias("_chosen"),
        )
        .filter("_chosen")
        .sort(["_fraction", "customer_id"])
    )
    if ranked.height <= max_recipients:
        return frame
    over = ranked["_row"].slice(max_recipients)
    mask = pl.int_range(frame.height, dtype=pl.UInt32, eager=True).is_in(over.implode())
    return _take_off(frame, mask, reasons.OVER_RECIPIENT_CAP)


def variant_counts(frame: pl.DataFrame) -> dict[str, dict[str, int]]:
    """Per variant, customers by decision (send, defer, holdout, exclude); {} without one."""
    if "variant" not in frame.columns:
        return {}
    counts = frame.group_by(
        pl.col("variant").cast(pl.String), pl.col("decision").cast(pl.String)
    ).len()
    out: dict[str, dict[str, int]] = {}
    for variant, decision, n in counts.sort("variant", "decision").iter_rows():
        out.setdefault(variant, {})[decision] = n
    return out
