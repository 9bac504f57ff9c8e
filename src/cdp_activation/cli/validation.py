"""`cdp-activation validate`: check every activation and audience SQL file, report all problems.

Unlike loading the Dagster definitions, which stops at the first broken activation, this walks
every `defs.yaml`, every `sql/audiences/*.sql`, `sql/events/*.sql` and `sql/statuses/*.sql`, and
collects each problem with its file, line and field, so an analyst fixes them in one pass.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cdp_activation.activation.run import Activation
from cdp_activation.audience.sql import AudienceSQLError, load_audience_sql, sql_dialect
from cdp_activation.connectors import CONNECTORS
from cdp_activation.feedback.status_sources import STATUS_SQL_DIR
from cdp_activation.partitions import bound_parameters, window_key
from cdp_activation.settings import get_settings
from cdp_activation.spec import ActivationSpec

COMPONENT_TYPES = {
    "cdp_activation.components.ActivationComponent",
    "cdp_activation.components.activation.ActivationComponent",
}


def activations_dir(root: Path) -> Path:
    return root / "src" / "cdp_activation" / "defs" / "activations"


def validate_project(root: Path) -> tuple[list[str], list[str]]:
    """(activation names that are valid, problems found) for the project at `root`."""
    problems: list[str] = []
    valid: list[str] = []
    dialect = sql_dialect(get_settings().warehouse_url)
    for path in sorted(activations_dir(root).glob("*/defs.yaml")):
        name = path.parent.name
        found = validate_defs_yaml(path, root, dialect)
        problems.extend(found)
        if not found:
            valid.append(name)
    for path in sorted(
        [
            *(root / "sql" / "audiences").glob("*.sql"),
            *(root / "sql" / "events").glob("*.sql"),
            *statuses_sql(root),
        ]
    ):
        try:
            load_audience_sql(path, dialect)
        except AudienceSQLError as err:
            message = str(err)
            if message not in problems and not any(message in p for p in problems):
                problems.append(message)
    return valid, problems


def statuses_sql(root: Path) -> list[Path]:
    """The status sources' SQL: read-only single SELECTs, like audiences."""
    return sorted((root / STATUS_SQL_DIR).glob("*.sql"))


def validate_defs_yaml(path: Path, root: Path, dialect: str = "duckdb") -> list[str]:
    text = path.read_text(encoding="utf-8")
    try:
        document = yaml.safe_load(text)
        tree = yaml.compose(text)
    except yaml.YAMLError as err:
        return [f"{path}: not valid YAML: {err}"]
    if not isinstance(document, dict):
        return [f"{path}: expected a mapping with `type` and `attributes`"]
    problems: list[str] = []
    if document.get("type") not in COMPONENT_TYPES:
        problems.append(
            f"{path}:1: type must be cdp_activation.components.ActivationComponent, "
            f"got {document.get('type')!r}"
        )
    attributes = document.get("attributes")
    if not isinstance(attributes, dict):
        return [*problems, f"{path}: `attributes` is missing or not a mapping"]
    try:
        spec = ActivationSpec.model_validate(attributes)
    except ValidationError as err:
        for error in err.errors():
            loc = ["attributes", *[str(p) for p in error["loc"]]]
            line = _line_of(tree, loc)
            field = ".".join(loc[1:]) or "attributes"
            problems.append(f"{path}:{line}: {field}: {error['msg']}")
        return problems
    for step in spec.channel_plan.steps:
        if step.connector not in CONNECTORS:
            index = spec.channel_plan.steps.index(step)
            loc = ["attributes", "channel_plan", "steps", str(index), "connector"]
            problems.append(
                f"{path}:{_line_of(tree, loc)}: channel_plan.steps.{index}.connector: unknown "
                f"connector {step.connector!r}; known: {', '.join(sorted(CONNECTORS))}"
            )
    try:
        Activation.from_spec(path.parent.name, spec, root, dialect)
    except (AudienceSQLError, ValueError, FileNotFoundError) as err:
        problems.append(str(err))
    return problems


def _line_of(node: Any, loc: list[str]) -> int:
    """The 1-based line of the deepest YAML node along `loc` that exists."""
    line = (node.start_mark.line + 1) if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
            if match is None:
                break
            node = match
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
        else:
            break
        line = node.start_mark.line + 1
    return line


def check_live(root: Path, names: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """(problems by activation, notes) of the valid activations `names` against what they
    will meet:
    each audience query run with `LIMIT 0` in the warehouse (it runs, and returns the
    contract's columns with the right types), and each template in its provider's catalog
    (name, approval, category, parameters). What cannot be reached is a note saying it was
    not checked, not a problem."""
    from cdp_activation.activation.events import new_events
    from cdp_activation.activation.run import (
        Activation,
        audience_problems,
        template_problems,
    )
    from cdp_activation.audience.warehouse import Warehouse
    from cdp_activation.connectors import connector_from_settings
    from cdp_activation.connectors.base import ConnectorError
    from cdp_activation.masking import masked
    from cdp_activation.spec import coerce_parameter

    settings = get_settings()
    dialect = sql_dialect(settings.warehouse_url)
    warehouse = Warehouse(settings.warehouse_url, duckdb_memory_limit=settings.duckdb_memory_limit)
    found: dict[str, list[str]] = {}
    notes: list[str] = []
    try:
        warehouse.read_table_sql("SELECT 1 AS reachable")
        reachable = True
    except Exception as err:  # not there, or not answering: said, not judged
        reachable = False
        notes.append(
            f"audiences not run in the warehouse ({masked(settings.warehouse_url)}): "
            f"{_first_line(err)}"
        )
    for name in names:
        problems = found.setdefault(name, [])
        path = activations_dir(root) / name / "defs.yaml"
        spec = ActivationSpec.model_validate(yaml.safe_load(path.read_text())["attributes"])
        activation = Activation.from_spec(name, spec, root, dialect)
        params = dict(bound_parameters(_current(spec), spec.window_minutes))
        for pname, pspec in spec.audience.parameters.items():
            if pspec.default is not None:
                params[pname] = coerce_parameter(pspec.type, pspec.default)
        if reachable:
            try:
                frame = warehouse.query(
                    _limit_zero(activation.query, dialect), params, _empty_tables(activation)
                )
            except Exception as err:  # the warehouse's own error: one line of it
                problems.append(
                    f"{activation.query.path}: the audience of {name} fails in the warehouse "
                    f"({masked(settings.warehouse_url)}): {_first_line(err)}"
                )
                continue
            problems.extend(audience_problems(activation, frame))
            if activation.events_query is not None:
                try:
                    new_events(activation.events_query, warehouse, datetime.now(UTC))
                except Exception as err:
                    problems.append(
                        f"{activation.events_query.path}: the events SQL of {name} fails: "
                        f"{_first_line(err)}"
                    )
        try:
            connectors = {
                step.connector: connector_from_settings(step.connector, settings)
                for step in spec.channel_plan.steps
            }
            problems.extend(f"{path}: {p}" for p in template_problems(activation, connectors))
        except (ConnectorError, ValueError) as err:
            notes.append(f"{name}: templates not checked: {str(err).splitlines()[0]}")
    return {name: problems for name, problems in found.items() if problems}, notes


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _current(spec: ActivationSpec) -> str:
    """The activation's current partition: today, or the open window of an event-driven one."""
    now = datetime.now(UTC)
    if spec.window_minutes is None:
        return now.date().isoformat()
    return window_key(now, spec.window_minutes)


def _limit_zero(query: Any, dialect: str) -> Any:
    """The audience query wrapped to return its columns and no row."""
    from sqlglot import exp

    from cdp_activation.audience.sql import AudienceQuery

    tree = exp.select("*").from_(query.tree.subquery("audience")).limit(0)
    return AudienceQuery(
        path=query.path, text=tree.sql(dialect=dialect), parameters=query.parameters, tree=tree
    )


def _empty_tables(activation: Any) -> dict[str, Any] | None:
    """The framework tables the query reads, empty (their columns are what matters)."""
    from cdp_activation.activation.run import LEDGER_RECENT_SENDS
    from cdp_activation.ledger import Ledger

    if not activation.query.reads_table(LEDGER_RECENT_SENDS):
        return None
    from datetime import UTC, datetime

    ledger = Ledger(get_settings().ledger_url)
    try:
        recent = ledger.recent_sends(datetime.now(UTC), exclude=(activation.name, ""))
    finally:
        ledger.dispose()
    return {LEDGER_RECENT_SENDS: recent.head(0).to_arrow()}
