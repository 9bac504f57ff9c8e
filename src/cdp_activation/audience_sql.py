"""The analyst's audience SQL: load it, check it is one read-only query, find its parameters.

Parameters are written `:name` in the SQL file and always bound by the warehouse driver, never
formatted into the string.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError

READ_ONLY_ROOTS = (exp.Select, exp.SetOperation)


class AudienceSQLError(ValueError):
    """The audience SQL file cannot be used as it is; the message names file and line."""


@dataclass(frozen=True)
class AudienceQuery:
    """A validated audience query: its file, its text and the parameters it expects."""

    path: Path
    text: str
    parameters: frozenset[str]
    tree: exp.Expression

    def for_dialect(self, dialect: str) -> str:
        """The query as the named sqlglot dialect writes it (placeholders in its own style)."""
        return self.tree.sql(dialect=dialect)


def load_audience_sql(path: Path, dialect: str = "duckdb") -> AudienceQuery:
    """Read and validate one audience file: exactly one SELECT / WITH … SELECT statement."""
    if not path.is_file():
        raise AudienceSQLError(f"{path}: audience SQL file not found")
    text = path.read_text(encoding="utf-8")
    return parse_audience_sql(text, path, dialect)


def parse_audience_sql(text: str, path: Path, dialect: str = "duckdb") -> AudienceQuery:
    try:
        statements = [s for s in sqlglot.parse(text, read=dialect) if s is not None]
    except ParseError as err:
        first = err.errors[0] if err.errors else {}
        line = first.get("line", "?")
        col = first.get("col", "?")
        desc = first.get("description", str(err))
        raise AudienceSQLError(f"{path}:{line}:{col}: SQL does not parse: {desc}") from None
    if not statements:
        raise AudienceSQLError(f"{path}: the file holds no SQL statement")
    if len(statements) > 1:
        raise AudienceSQLError(
            f"{path}: holds {len(statements)} statements; an audience is exactly one SELECT"
        )
    tree = statements[0]
    if not isinstance(tree, READ_ONLY_ROOTS):
        kind = type(tree).__name__.upper()
        raise AudienceSQLError(
            f"{path}:{_first_line(text)}: a {kind} statement is not allowed; an audience is one "
            "read-only SELECT (or WITH … SELECT)"
        )
    for node in tree.find_all(exp.Insert, exp.Update, exp.Delete, exp.Create, exp.Drop):
        raise AudienceSQLError(
            f"{path}: contains a {type(node).__name__.upper()}; an audience is read-only"
        )
    params = frozenset(p.name for p in tree.find_all(exp.Placeholder) if p.name)
    return AudienceQuery(path=path, text=text, parameters=params, tree=tree)


def _first_line(text: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("--"):
            return number
    return 1
