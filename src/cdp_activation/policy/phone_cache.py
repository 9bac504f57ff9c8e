"""A durable cache of phonenumbers' answers, beside the ledger, that holds no phone number.

Numbers in E.164 form or a plain national format are judged in polars (`phones.fast_codes`,
`phones.national_e164`) and never reach phonenumbers, so only the others — text around the
number, letters, junk — are worth keeping: each costs ~80 µs of `phonenumbers.parse`, and a
CRM column holds the same strings run after run.

What is kept per (raw, region) is not the number but:
- `digest`: a keyed digest of the raw value and region (HMAC-SHA256-128, `pii.keyed_digest`,
  key CDP_PII_HASH_KEY): it finds the entry again from the same raw value, and without the
  key it cannot be matched against candidate numbers;
- a recipe for the E.164 form instead of the form itself: its country calling code and how
  many trailing digits of the raw value follow it (`+44` and the last 10 digits of
  "07400 123456"). The E.164 form is rebuilt from the raw value the audience brings again;
  a number whose E.164 form is not such a suffix (vanity letters, "(0)" inside) is not cached
  and simply parsed each run;
- status, number type, the phonenumbers version, and when it was stored (for `purge`).

Same database as the ledger (SQLite by default, PostgreSQL in production): one table, created
if absent. Earlier tables are dropped on sight: `phone_numbers`, which held raw numbers, and
`phone_lookups`, keyed by BLAKE2b digests computed one by one in Python (0.5 s for 600,000
numbers; the digests are now computed in polars, and its entries could not be found again).
A lookup sees only rows of the running phonenumbers version, and a store overwrites rows of
any other, so upgrading phonenumbers silently re-validates instead of serving stale answers.

Both directions are one set-based statement per chunk — keys travel as a JSON document
(SQLite, `json_each`) or as arrays (PostgreSQL, `unnest`) — never a round trip per row.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import phonenumbers
import polars as pl
import sqlalchemy as sa

from cdp_activation.db import lock_schema, open_engine, read_frame

METADATA_VERSION: str = phonenumbers.__version__
_CHUNK = 200_000  # keys per statement: large enough to amortise, small enough for memory
_SCAN_RATIO = 4  # read the whole table when asked for at least a quarter of its rows
TABLE = "phone_digests"
# Earlier caches, dropped on sight: keyed on raw numbers; on BLAKE2b digests.
_EARLIER_TABLES = ("phone_numbers", "phone_lookups")

metadata = sa.MetaData()

phone_digests = sa.Table(
    TABLE,
    metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("country_code", sa.Integer, nullable=True),  # null: not a valid number
    sa.Column("digits", sa.Integer, nullable=True),  # trailing digits of the raw value kept
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("number_type", sa.Text, nullable=True),
    sa.Column("metadata_version", sa.Text, nullable=False),
    sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
    sqlite_with_rowid=False,  # stored once, in the key's order: a read of every entry is one scan
)

RESULT_SCHEMA: dict[str, pl.DataType] = {
    "raw": pl.String(),
    "region": pl.String(),
    "e164": pl.String(),
    "status": pl.String(),
    "number_type": pl.String(),
}
_STORED_SCHEMA: dict[str, pl.DataType] = {
    "digest": pl.String(),
    "country_code": pl.Int64(),
    "digits": pl.Int64(),
    "status": pl.String(),
    "number_type": pl.String(),
}
_COLUMNS = ", ".join(_STORED_SCHEMA)

_SQLITE_LOOKUP = sa.text(
    f"SELECT {', '.join('p.' + c for c in _STORED_SCHEMA)} FROM json_each(:keys) AS k"
    f" JOIN {TABLE} AS p ON p.digest = k.value WHERE p.metadata_version = :version"
)
_POSTGRES_LOOKUP = sa.text(
    f"SELECT {', '.join('p.' + c for c in _STORED_SCHEMA)}"
    " FROM unnest(CAST(:digests AS text[])) AS k(digest)"
    f" JOIN {TABLE} AS p ON p.digest = k.digest WHERE p.metadata_version = :version"
)
_UPSERT_TAIL = (
    " ON CONFLICT (digest) DO UPDATE SET"
    " country_code = excluded.country_code, digits = excluded.digits,"
    " status = excluded.status, number_type = excluded.number_type,"
    " metadata_version = excluded.metadata_version, stored_at = excluded.stored_at"
    f" WHERE {TABLE}.metadata_version <> excluded.metadata_version"
)
_INSERT = f"INSERT INTO {TABLE} ({_COLUMNS}, metadata_version, stored_at)"
_SQLITE_STORE = sa.text(
    _INSERT + " SELECT json_extract(value, '$.digest'), json_extract(value, '$.country_code'),"
    "  json_extract(value, '$.digits'), json_extract(value, '$.status'),"
    "  json_extract(value, '$.number_type'), :version, :stored_at"
    " FROM json_each(:rows) WHERE true"  # `WHERE true`: SQLite's upsert-after-SELECT rule
     + _UPSERT_TAIL
)
_POSTGRES_STORE = sa.text(
    _INSERT + " SELECT k.digest, k.country_code, k.digits, k.status, k.number_type, :version,"
    "  :stored_at"
    " FROM unnest(CAST(:digests AS text[]), CAST(:codes AS integer[]),"
    "  CAST(:digit_counts AS integer[]), CAST(:statuses AS text[]), CAST(:types AS text[]))"
    "  AS k(digest, country_code, digits, status, number_type)" + _UPSERT_TAIL
)


class PhoneCache:
    """(raw, region) → (E.164, status, type), as phonenumbers `METADATA_VERSION` answered it,
    kept under keyed digests (`key`: see `pii.pii_key`).

    Give it the ledger's URL (or its engine, to share the connection pool).
    """

    def __init__(
        self, url_or_engine: str | sa.Engine, *, key: bytes, version: str = METADATA_VERSION
    ):
        if isinstance(url_or_engine, sa.Engine):
            self.engine = url_or_engine
            self._owns_engine = False
        else:
            self.engine = open_engine(url_or_engine)
            self._owns_engine = True
        self.dialect = self.engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise RuntimeError(
                f"phone cache dialect {self.dialect!r} is not supported (use SQLite or PostgreSQL)"
            )
        self.key = key
        self.version = version
        self._every: pl.DataFrame | None = None  # the whole table, once read (see lookup)
        ensure_table(self.engine)

    def _every_row(self) -> pl.DataFrame:
        """Every cached answer of this version, read once per `PhoneCache` and kept: a run
        looks up its suppression list and its audience, and reads the table a single time."""
        if self._every is None:
            self._every = read_frame(
                self.engine,
                f"SELECT {_COLUMNS} FROM {TABLE} WHERE metadata_version = $1",
                (self.version,),
                schema=_STORED_SCHEMA,
            )
        return self._every

    def dispose(self) -> None:
        """Close the pool, if this cache opened it (a shared ledger engine is left alone)."""
        if self._owns_engine:
            self.engine.dispose()

    def _keyed(self, pairs: pl.DataFrame) -> pl.DataFrame:
        """`pairs` (raw, region) with their `digest`."""
        from cdp_activation.pii import keyed_digest

        text = pl.concat_str(pl.col("raw"), pl.lit("\x1f"), pl.col("region").fill_null(""))
        return pairs.with_columns(keyed_digest(text, self.key).alias("digest"))

    def lookup(self, pairs: pl.DataFrame) -> pl.DataFrame:
        """Cached answers for the (raw, region) rows of `pairs`; pairs never seen are absent.

        Returns `raw, region, e164, status, number_type` (see `RESULT_SCHEMA`).
        """
        keys = _storable(pairs.select("raw", "region").unique())
        if keys.is_empty():
            return pl.DataFrame(schema=RESULT_SCHEMA)
        keys = self._keyed(keys)
        if self._every is None:
            with self.engine.connect() as con:
                cached = int(
                    con.execute(sa.select(sa.func.count()).select_from(phone_digests)).scalar_one()
                )
            stored = (
                self._lookup_keys(keys["digest"])
                if len(keys) * _SCAN_RATIO < cached
                else self._every_row()
            )
        else:
            stored = self._every_row()
        # Asked for a good share of the table (the usual warm run), or read already: one
        # sequential read as Arrow and a hash join here beat a JSON decode and a seek per key.
        found = keys.join(stored, on="digest", how="inner")
        digits = pl.col("raw").str.replace_all("[^0-9]", "")  # ASCII digits, as `_recipe`
        e164 = pl.when(pl.col("country_code").is_not_null()).then(
            pl.concat_str(
                pl.lit("+"),
                pl.col("country_code").cast(pl.String),
                digits.str.tail(pl.col("digits")),
            )
        )
        return found.select("raw", "region", e164.alias("e164"), "status", "number_type").cast(
            RESULT_SCHEMA  # type: ignore[arg-type]
        )

    def _lookup_keys(self, digests: pl.Series) -> pl.DataFrame:
        """The cached rows for `digests`, looked up by index, a chunk of keys a statement."""
        found: list[pl.DataFrame] = []
        with self.engine.connect() as con:
            for start in range(0, len(digests), _CHUNK):
                chunk = digests.slice(start, _CHUNK).to_list()
                if self.dialect == "sqlite":
                    params: dict[str, Any] = {"keys": json.dumps(chunk)}
                    statement = _SQLITE_LOOKUP
                else:
                    params = {"digests": chunk}
                    statement = _POSTGRES_LOOKUP
                rows = con.execute(statement, {**params, "version": self.version}).all()
                if rows:
                    found.append(pl.DataFrame(rows, schema=_STORED_SCHEMA, orient="row"))
        return pl.concat(found) if found else pl.DataFrame(schema=_STORED_SCHEMA)

    def store(self, results: pl.DataFrame) -> None:
        """Keep answers (`raw, region, e164, status, number_type`) for later runs.

        Rows already cached for this version are left as they are; rows of another version
        are replaced. A valid number whose E.164 form cannot be rebuilt from its raw value's
        trailing digits is not kept.
        """
        rows = _storable(results.select(list(RESULT_SCHEMA)).unique(subset=["raw", "region"]))
        recipes = [_recipe(raw, e164) for raw, e164 in rows.select("raw", "e164").rows()]
        rows = rows.with_columns(
            pl.Series("country_code", [r[0] for r in recipes], dtype=pl.Int64),
            pl.Series("digits", [r[1] for r in recipes], dtype=pl.Int64),
            pl.Series("keep", [r[2] for r in recipes], dtype=pl.Boolean),
        ).filter("keep")
        stored = self._keyed(rows).select(list(_STORED_SCHEMA)).sort("digest")
        if self._every is not None:
            kept = self._every.join(stored, on="digest", how="anti")
            self._every = pl.concat([kept, stored.cast(_STORED_SCHEMA)])  # type: ignore[arg-type]
        now = datetime.now(UTC)
        stamp: Any = now.strftime("%Y-%m-%d %H:%M:%S.%f") if self.dialect == "sqlite" else now
        with self.engine.begin() as con:
            for start in range(0, len(stored), _CHUNK):
                chunk = stored.slice(start, _CHUNK)
                common = {"version": self.version, "stored_at": stamp}
                if self.dialect == "sqlite":
                    con.execute(_SQLITE_STORE, {"rows": chunk.write_json(), **common})
                else:
                    con.execute(
                        _POSTGRES_STORE,
                        {
                            "digests": chunk["digest"].to_list(),
                            "codes": chunk["country_code"].to_list(),
                            "digit_counts": chunk["digits"].to_list(),
                            "statuses": chunk["status"].to_list(),
                            "types": chunk["number_type"].to_list(),
                            **common,
                        },
                    )

    def count(self) -> int:
        """Rows cached for this version (for tests and benchmarks)."""
        query = sa.select(sa.func.count()).where(phone_digests.c.metadata_version == self.version)
        with self.engine.connect() as con:
            return int(con.execute(query).scalar_one())


_READY: set[str] = set()  # database URLs whose table this process made sure of


def ensure_table(engine: sa.Engine) -> None:
    """Create the table if absent and drop the earlier ones (`_EARLIER_TABLES`): once per
    database and process (a run builds a cache per decision step; no DDL each time)."""
    url = engine.url.render_as_string(hide_password=False)
    if url in _READY and sa.inspect(engine).has_table(TABLE):
        return
    with engine.begin() as con:
        # Runs and workers starting together on a new database (or the first run after an
        # upgrade) would race to create the table: PostgreSQL refuses the second CREATE.
        lock_schema(con)
        for earlier in _EARLIER_TABLES:
            con.exec_driver_sql(f"DROP TABLE IF EXISTS {earlier}")
        metadata.create_all(con)
    _READY.add(url)


def remove_entries(engine: sa.Engine, before: datetime | None) -> int:
    """Delete the cache's entries stored before `before` (all of them when None); returns how
    many. No key is needed: an entry is found by its age, not by its number."""
    ensure_table(engine)
    statement = sa.delete(phone_digests)
    if before is not None:
        statement = statement.where(phone_digests.c.stored_at < before)
    with engine.begin() as con:
        return max(con.execute(statement).rowcount or 0, 0)


def _recipe(raw: str, e164: str | None) -> tuple[int | None, int | None, bool]:
    """(country code, trailing digits of `raw`, keep?) that rebuild `e164` from `raw`."""
    if e164 is None:
        return None, None, True  # invalid or missing: nothing to rebuild
    number = e164.removeprefix("+")
    digits = "".join(c for c in raw if c in "0123456789")
    for code_length in (1, 2, 3):
        code, national = number[:code_length], number[code_length:]
        if national and code[0] != "0" and digits.endswith(national):
            return int(code), len(national), True
    return None, None, False


def _storable(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows a database can key on: a raw value, no NUL."""
    return frame.filter(
        pl.col("raw").is_not_null() & ~pl.col("raw").str.contains("\x00", literal=True)
    ).with_columns(pl.col("region").fill_null(""))
