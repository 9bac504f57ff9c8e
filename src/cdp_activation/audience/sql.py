"""The analyst's audience SQL: load it, check it is one read-only query, find its parameters.

Parameters are written `:name` in the SQL file and always bound by the warehouse driver, never
formatted into the string.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlglot
from sqlglot import exp
from sqlglot.dialects import Dialect
from sqlglot.errors import ParseError
from sqlglot.tokens import TokenType

from cdp_activation.errors import CdpError

READ_ONLY_ROOTS = (exp.Select, exp.SetOperation)
WRITE_NODES = (exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter)

# URL scheme (before any "+driver") -> the sqlglot dialect that parses that warehouse's SQL.
_DIALECTS = {
    "duckdb": "duckdb",
    "postgresql": "postgres",
    "postgres": "postgres",
    "snowflake": "snowflake",
    "bigquery": "bigquery",
    "trino": "trino",
    "sqlite": "sqlite",
    "mysql": "mysql",
    "mariadb": "mysql",
}


def sql_dialect(url: str) -> str:
    """The sqlglot dialect of a warehouse URL (`postgresql+psycopg://…` -> `postgres`)."""
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in _DIALECTS:
        known = ", ".join(sorted(_DIALECTS))
        raise ValueError(f"unsupported warehouse URL scheme {scheme!r}; supported: {known}")
    return _DIALECTS[scheme]


class AudienceSQLError(CdpError, ValueError):
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

    def reads_table(self, name: str) -> bool:
        """Does the query read a table called `name` (not a CTE of that name)?"""
        ctes = {cte.alias_or_name.lower() for cte in self.tree.find_all(exp.CTE)}
        return name.lower() not in ctes and any(
            table.name.lower() == name.lower() for table in self.tree.find_all(exp.Table)
        )

    def sqlalchemy_text(self, dialect: str) -> str:
        """The analyst's SQL, verbatim, made safe for `sqlalchemy.text()`.

        `text()` finds `:name` anywhere, even inside comments and string literals, so comments
        are dropped and a colon inside a string literal is escaped; the `:name` placeholders
        themselves stay for the driver to bind.
        """
        tokens = Dialect.get_or_raise(dialect).tokenize(self.text)
        parts: list[str] = []
        previous_end = -1
        for token in tokens:
            gap = self.text[previous_end + 1 : token.start]
            # Whitespace between tokens is kept; a gap holding a comment becomes one space.
            parts.append(gap if gap.isspace() or not gap else " ")
            piece = self.text[token.start : token.end + 1]
            if token.token_type in (TokenType.STRING, TokenType.NATIONAL_STRING):
                piece = piece.replace(":", "\\:")
            parts.append(piece)
            previous_end = token.end
        return "".join(parts).strip()


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
        # sqlglot's words name its parser's state ("alias does not support CTE"): the line
        # it stopped at, and a look at the lines before it, is what helps.
        source = text.splitlines()
        shown = (
            source[line - 1].strip()[:60]
            if isinstance(line, int) and 0 < line <= len(source)
            else ""
        )
        at = f" at `{shown}` (a typo may be on a line just before)" if shown else ""
        raise AudienceSQLError(f"{path}:{line}:{col}: SQL does not parse{at}: {desc}") from None
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
    for node in tree.find_all(*WRITE_NODES):
        raise AudienceSQLError(
            f"{path}:{_first_line(text)}: contains a {type(node).__name__.upper()}; an audience "
            "is read-only"
        )
    if any(select.args.get("into") for select in tree.find_all(exp.Select)):
        raise AudienceSQLError(
            f"{path}:{_first_line(text)}: SELECT … INTO creates a table; an audience is read-only"
        )
    params = frozenset(p.name for p in tree.find_all(exp.Placeholder) if p.name)
    return AudienceQuery(path=path, text=text, parameters=params, tree=tree)


def _first_line(text: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped and not stripped.startswith("--"):
            return number
    return 1
