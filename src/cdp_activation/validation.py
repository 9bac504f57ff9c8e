"""`cdp-activation validate`: check every activation and audience SQL file, report all problems.

Unlike loading the Dagster definitions, which stops at the first broken activation, this walks
every `defs.yaml`, every `sql/audiences/*.sql` and `sql/statuses/*.sql`, and collects each
problem with its file, line and field, so an analyst fixes them in one pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cdp_activation.activation_run import Activation
from cdp_activation.audience_sql import AudienceSQLError, load_audience_sql, sql_dialect
from cdp_activation.connectors import CONNECTORS
from cdp_activation.settings import get_settings
from cdp_activation.specs import ActivationSpec
from cdp_activation.status_sources import STATUS_SQL_DIR

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
    for path in sorted([*(root / "sql" / "audiences").glob("*.sql"), *statuses_sql(root)]):
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
