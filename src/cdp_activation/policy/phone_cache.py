"""A durable cache of phonenumbers' answers, beside the ledger, keyed on (raw, region).

Numbers already in E.164 form are judged in polars (`phones.fast_codes`) and never reach
phonenumbers, so only the others — national formats, spaces, junk — are worth keeping: each
costs ~80 µs of `phonenumbers.parse`, and a CRM column holds the same strings run after run.

Same database as the ledger (SQLite by default, PostgreSQL in production): one more table,
created if absent. Every row carries the `phonenumbers` version that produced it; a lookup sees
only rows of the running version, and a store overwrites rows of any other, so upgrading
phonenumbers (new ranges, new regions) silently re-validates instead of serving stale answers.

Both directions are one set-based statement per chunk — the keys travel as a JSON document
(SQLite, `json_each`) or as arrays (PostgreSQL, `unnest`) — never a round trip per row.
"""

from __future__ import annotations

from typing import Any

import phonenumbers
import polars as pl
import sqlalchemy as sa

from cdp_activation.db import open_engine, read_frame

METADATA_VERSION: str = phonenumbers.__version__
_CHUNK = 200_000  # keys per statement: large enough to amortise, small enough for memory
_SCAN_RATIO = 4  # read the whole table when asked for at least a quarter of its rows

metadata = sa.MetaData()

phone_numbers = sa.Table(
    "phone_numbers",
    metadata,
    sa.Column("raw", sa.Text, primary_key=True),
    sa.Column("region", sa.Text, primary_key=True),  # '' when the audience gave none
    sa.Column("e164", sa.Text, nullable=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("number_type", sa.Text, nullable=True),
    sa.Column("metadata_version", sa.Text, nullable=False),
)

RESULT_SCHEMA: dict[str, pl.DataType] = {
    "raw": pl.String(),
    "region": pl.String(),
    "e164": pl.String(),
    "status": pl.String(),
    "number_type": pl.String(),
}
_VALUES = ("e164", "status", "number_type", "metadata_version")

_SQLITE_LOOKUP = sa.text(
    "SELECT p.raw, p.region, p.e164, p.status, p.number_type"
    " FROM json_each(:keys) AS k"
    " JOIN phone_numbers AS p"
    "   ON p.raw = json_extract(k.value, '$.raw') AND p.region = json_extract(k.value, '$.region')"
    " WHERE p.metadata_version = :version"
)
_POSTGRES_LOOKUP = sa.text(
    "SELECT p.raw, p.region, p.e164, p.status, p.number_type"
    " FROM unnest(CAST(:raws AS text[]), CAST(:regions AS text[])) AS k(raw, region)"
    " JOIN phone_numbers AS p ON p.raw = k.raw AND p.region = k.region"
    " WHERE p.metadata_version = :version"
)
_UPSERT_TAIL = (
    " ON CONFLICT (raw, region) DO UPDATE SET"
    " e164 = excluded.e164, status = excluded.status, number_type = excluded.number_type,"
    " metadata_version = excluded.metadata_version"
    " WHERE phone_numbers.metadata_version <> excluded.metadata_version"
)
_SQLITE_STORE = sa.text(
    "INSERT INTO phone_numbers (raw, region, e164, status, number_type, metadata_version)"
    " SELECT json_extract(value, '$.raw'), json_extract(value, '$.region'),"
    "  json_extract(value, '$.e164'), json_extract(value, '$.status'),"
    "  json_extract(value, '$.number_type'), :version"
    " FROM json_each(:rows) WHERE true"  # `WHERE true`: SQLite's upsert-after-SELECT rule
    + _UPSERT_TAIL
)
_POSTGRES_STORE = sa.text(
    "INSERT INTO phone_numbers (raw, region, e164, status, number_type, metadata_version)"
    " SELECT k.raw, k.region, k.e164, k.status, k.number_type, :version"
    " FROM unnest(CAST(:raws AS text[]), CAST(:regions AS text[]), CAST(:e164s AS text[]),"
    "  CAST(:statuses AS text[]), CAST(:types AS text[]))"
    "  AS k(raw, region, e164, status, number_type)" + _UPSERT_TAIL
)


class PhoneCache:
    """(raw, region) → (E.164, status, type), as phonenumbers `METADATA_VERSION` answered it.

    Give it the ledger's URL (or its engine, to share the connection pool).
    """

    def __init__(self, url_or_engine: str | sa.Engine, *, version: str = METADATA_VERSION):
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
        self.version = version
        self._every: pl.DataFrame | None = None  # the whole table, once read (see lookup)
        metadata.create_all(self.engine)

    def _every_row(self) -> pl.DataFrame:
        """Every cached answer of this version, read once per `PhoneCache` and kept: a run
        looks up its suppression list and its audience, and reads the table a single time."""
        if self._every is None:
            self._every = read_frame(
                self.engine,
                f"SELECT {', '.join(RESULT_SCHEMA)} FROM phone_numbers WHERE metadata_version = $1",
                (self.version,),
                schema=RESULT_SCHEMA,
            )
        return self._every

    def dispose(self) -> None:
        """Close the pool, if this cache opened it (a shared ledger engine is left alone)."""
        if self._owns_engine:
            self.engine.dispose()

    def lookup(self, pairs: pl.DataFrame) -> pl.DataFrame:
        """Cached answers for the (raw, region) rows of `pairs`; pairs never seen are absent.

        Returns `raw, region, e164, status, number_type` (see `RESULT_SCHEMA`).
        """
        keys = _storable(pairs.select("raw", "region").unique())
        if keys.is_empty():
            return pl.DataFrame(schema=RESULT_SCHEMA)
        if self._every is None:
            with self.engine.connect() as con:
                cached = int(
                    con.execute(sa.select(sa.func.count()).select_from(phone_numbers)).scalar_one()
                )
            if len(keys) * _SCAN_RATIO < cached:
                return self._lookup_keys(keys)
        # Asked for a good share of the table (the usual warm run), or read already: one
        # sequential read as Arrow and a hash join here beat a JSON decode and a seek per key.
        return self._every_row().join(keys, on=["raw", "region"], how="semi")

    def _lookup_keys(self, keys: pl.DataFrame) -> pl.DataFrame:
        """The cached answers for `keys`, looked up by index, a chunk of keys a statement."""
        found: list[pl.DataFrame] = []
        with self.engine.connect() as con:
            for start in range(0, len(keys), _CHUNK):
                chunk = keys.slice(start, _CHUNK)
                if self.dialect == "sqlite":
                    params: dict[str, Any] = {"keys": chunk.write_json()}
                    statement = _SQLITE_LOOKUP
                else:
                    params = {"raws": chunk["raw"].to_list(), "regions": chunk["region"].to_list()}
                    statement = _POSTGRES_LOOKUP
                rows = con.execute(statement, {**params, "version": self.version}).all()
                if rows:
                    found.append(pl.DataFrame(rows, schema=RESULT_SCHEMA, orient="row"))
        return pl.concat(found) if found else pl.DataFrame(schema=RESULT_SCHEMA)

    def store(self, results: pl.DataFrame) -> None:
        """Keep answers (`raw, region, e164, status, number_type`) for later runs.

        Rows already cached for this version are left as they are; rows of another version
        are replaced.
        """
        rows = _storable(results.select(list(RESULT_SCHEMA)).unique(subset=["raw", "region"]))
        if self._every is not None:
            kept = self._every.join(rows, on=["raw", "region"], how="anti")
            self._every = pl.concat([kept, rows.cast(RESULT_SCHEMA)])  # type: ignore[arg-type]
        with self.engine.begin() as con:
            for start in range(0, len(rows), _CHUNK):
                chunk = rows.slice(start, _CHUNK)
                if self.dialect == "sqlite":
                    con.execute(
                        _SQLITE_STORE, {"rows": chunk.write_json(), "version": self.version}
                    )
                else:
                    con.execute(
                        _POSTGRES_STORE,
                        {
                            "raws": chunk["raw"].to_list(),
                            "regions": chunk["region"].to_list(),
                            "e164s": chunk["e164"].to_list(),
                            "statuses": chunk["status"].to_list(),
                            "types": chunk["number_type"].to_list(),
                            "version": self.version,
                        },
                    )

    def count(self) -> int:
        """Rows cached for this version (for tests and benchmarks)."""
        query = sa.select(sa.func.count()).where(phone_numbers.c.metadata_version == self.version)
        with self.engine.connect() as con:
            return int(con.execute(query).scalar_one())


def _storable(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows a database can key on: a raw value, no NUL (PostgreSQL text cannot hold one)."""
    return frame.filter(
        pl.col("raw").is_not_null() & ~pl.col("raw").str.contains("\x00", literal=True)
    ).with_columns(pl.col("region").fill_null(""))
