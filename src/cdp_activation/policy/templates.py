"""Templates: is the plan's template approved, and do the variables pass WhatsApp's checks?

WhatsApp rejects a template parameter that is empty, holds a newline or a tab, or more than
four consecutive spaces; a body parameter is limited in length. A recipient whose variables
fail is excluded with a reason, the rest still go.
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

from cdp_activation.contracts import TemplateInfo
from cdp_activation.spec import CATEGORIES_FOR_PURPOSE, TemplateSpec

MAX_PARAMETER_LENGTH = 1024


def find_template(catalog: Iterable[TemplateInfo], spec: TemplateSpec) -> TemplateInfo | None:
    for info in catalog:
        if info.name == spec.name and info.language == spec.language:
            return info
    return None


def template_problem(
    catalog: Iterable[TemplateInfo], spec: TemplateSpec, purpose: str
) -> str | None:
    """Why this template may not be sent, or None when it may."""
    info = find_template(catalog, spec)
    if info is None:
        return f"template {spec.name!r} ({spec.language}) is not in the provider's catalog"
    if info.status.upper() != "APPROVED":
        return f"template {spec.name!r} ({spec.language}) is {info.status}, not APPROVED"
    allowed = CATEGORIES_FOR_PURPOSE[purpose]
    if info.category.lower() not in allowed:
        return (
            f"template {spec.name!r} is category {info.category} in the catalog; a {purpose} "
            f"activation may use only {sorted(allowed)}"
        )
    positional = tuple(str(i) for i in range(1, info.body_parameter_count + 1))
    if info.parameter_names and info.parameter_names != positional:
        return (
            f"template {spec.name!r} takes named parameters "
            f"({', '.join(info.parameter_names)}); the plan maps its variables by position "
            "({{1}}, {{2}}, …): use a positional template"
        )
    if info.body_parameter_count != len(spec.variables):
        return (
            f"template {spec.name!r} takes {info.body_parameter_count} body parameters, the plan "
            f"maps {len(spec.variables)} ({', '.join(spec.variables) or 'none'})"
        )
    return None


def variable_as_text(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.String)


def _never_blank(schema: pl.Schema | None, column: str) -> bool:
    """Whether every non-null value of the column's type reads as short text with no run of
    spaces, tab or newline (numbers, booleans, dates and times): its checks reduce to "not
    null", with no text built for 10,000,000 rows."""
    dtype = schema.get(column) if schema is not None else None
    if dtype is None:
        return False
    return dtype.is_numeric() or dtype.is_temporal() or dtype == pl.Boolean


def variable_present(column: str, schema: pl.Schema | None = None) -> pl.Expr:
    """True where the variable has something other than whitespace in it (Unicode
    whitespace, as `str.strip` counts it): what every message needs of its variables. With
    the audience's `schema`, a column of numbers, booleans or times is only checked for nulls.
    """
    if _never_blank(schema, column):
        return pl.col(column).is_not_null()
    text = variable_as_text(column)
    # Anchored, the regex engine stops at the first character that is not whitespace: 0.6 of
    # the time of searching for one (`\S`).
    return (text.is_not_null() & ~text.str.contains(r"^\s*$")).fill_null(False)


# What WhatsApp refuses inside a parameter: a newline, a tab, more than four spaces in a row.
_FORBIDDEN = ["\n", "\t", " " * 5]


def whatsapp_parameter_ok(column: str, schema: pl.Schema | None = None) -> pl.Expr:
    """True where a present template variable also passes WhatsApp's parameter rules: no
    newline, tab or run of five spaces, at most `MAX_PARAMETER_LENGTH` characters (always,
    for numbers, booleans and times). A template's variable must pass this and
    `variable_present`; a body's fields only the latter."""
    if _never_blank(schema, column):
        return pl.lit(True)
    text = variable_as_text(column)
    forbidden = text.str.contains_any(_FORBIDDEN)  # one pass for the three
    return (~forbidden & (text.str.len_chars() <= MAX_PARAMETER_LENGTH)).fill_null(False)
