"""Personal data (issue 15, item 10): where numbers may be kept, for how long, and erasure.

- After a real run through Dagster (sends, status webhooks, the fallback, the send log
  export), no phone number of the audience is anywhere in the Dagster instance's storage, its
  logs or the send log, in any common format.
- `purge` takes numbers, message texts and provider payloads out of what is past the
  retention, and never touches a row still to send.
- `erase` does it at once for given customers, pseudonymises their id in the ledger and the
  send log, cancels what was still planned for them, and empties the phone cache.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest
import sqlalchemy as sa
from time_machine import TimeMachineFixture

from cdp_activation.delivery.engine import DeliveryOptions, DeliveryScope, deliver
from cdp_activation.feedback.receiver import WebhookServer
from cdp_activation.feedback.send_log import SEND_LOG_TABLE, export_send_log
from cdp_activation.ledger import Ledger, send_events, sends, status_events
from cdp_activation.pii import stored_outputs
from cdp_activation.policy.phone_cache import PhoneCache
from cdp_activation.policy.phones import normalise_frame
from cdp_activation.retention import ERASED, erase, purge
from cdp_activation.sandbox import SandboxServer
from conftest import settings_for_sandbox
from crash_worker import audience, sandbox_connectors

pytestmark = pytest.mark.integration

OPTIONS = DeliveryOptions(rate_per_second=5000, backoff_initial=0.01)
KEY = b"test-pii-hash-key"
# Not a plain national format ("tel. " before it): phonenumbers reads it, the cache keeps it.
SLOW_GB = "tel. 07400 123456"


def number_forms(e164: str) -> set[str]:
    """The ways a number may be written down: E.164, its digits, national with a 0."""
    digits = e164.removeprefix("+")
    national = digits[2:]  # every number here is +44 (two-digit country code)
    return {e164, digits, "0" + national}


def leaked(text: str, numbers: list[str]) -> list[str]:
    """The numbers of `numbers` written in `text` in any form (spaces, dashes, brackets
    between digits ignored)."""
    squeezed = re.sub(r"(?<=\d)[\s\-().]+(?=\d)", "", text)
    return [n for n in numbers if any(form in squeezed for form in number_forms(n))]


def sent_with_statuses(ledger: Ledger, sandbox: SandboxServer, n: int = 40) -> list[str]:
    """`n` sends through the sandbox, with its status webhooks stored; returns the numbers."""
    with WebhookServer(ledger, settings_for_sandbox(sandbox).webhook_secrets()) as receiver:
        sandbox.configure(status_webhooks_url=receiver.url, status_delay_ms=1)
        ledger.plan("pii", "p", audience(n))
        deliver(ledger, DeliveryScope("pii", "p"), sandbox_connectors(sandbox.url), OPTIONS)
        deadline = datetime.now(UTC) + timedelta(seconds=20)
        while datetime.now(UTC) < deadline:
            with ledger.engine.connect() as con:
                stored = con.execute(sa.select(sa.func.count()).select_from(status_events))
                if stored.scalar_one() >= n - 2:  # a sent and a delivered report each, at least
                    break
    return [m.to for m in sandbox.messages()]


def ledger_text(ledger: Ledger) -> str:
    """Every value the ledger's sends and status reports hold, as one text."""
    with ledger.engine.connect() as con:
        rows = [*con.execute(sa.select(sends)), *con.execute(sa.select(status_events))]
    return "\n".join(" ".join(str(v) for v in row) for row in rows)


def test_purge_takes_personal_data_out_of_what_is_past_the_retention_only(
    ledger: Ledger, sandbox: SandboxServer
) -> None:
    numbers = sent_with_statuses(ledger, sandbox)
    assert leaked(ledger_text(ledger), numbers)  # the ledger needs them while it sends
    waiting = audience(3).with_columns(pl.Series("customer_id", [901, 902, 903]))
    ledger.plan("pii", "later", waiting.with_columns(pl.lit("+447911000999").alias("phone_e164")))
    # A refused fallback: written `excluded` with no number, but with the message's variables.
    refused = audience(1).with_columns(
        pl.lit(None, dtype=pl.String).alias("phone_e164"),
        pl.lit("exclude").alias("decision"),
        pl.lit("sms_no_consent").alias("reason"),
    )
    ledger.plan("pii", "refused", refused)
    cache = PhoneCache(ledger.engine, key=KEY)
    normalise_frame(pl.DataFrame({"phone": [SLOW_GB], "country": ["GB"]}), cache=cache)
    assert cache.count() == 1

    assert purge(ledger, days=90).sends == 0  # nothing is 90 days old yet
    done = purge(ledger, days=90, now=datetime.now(UTC) + timedelta(days=91))
    assert done.sends == 41 and done.status_reports > 0 and done.phone_cache == 1
    text = ledger_text(ledger)
    assert leaked(text, numbers) == []
    with ledger.engine.connect() as con:
        finished = con.execute(
            sa.select(sends.c.recipient, sends.c.message, sends.c.error_message).where(
                sends.c.partition_key.in_(["p", "refused"])
            )
        ).all()
        payloads = con.execute(sa.select(status_events.c.payload)).scalars().all()
        planned = con.execute(
            sa.select(sends.c.recipient, sends.c.message).where(sends.c.partition_key == "later")
        ).all()
    assert {r.recipient for r in finished} == {ERASED}
    assert {r.error_message for r in finished} == {None}
    assert all(set(json.loads(r.message)) <= {"template", "language"} for r in finished)
    assert set(payloads) == {None}
    # Rows still to send keep what they need to be sent.
    assert {r.recipient for r in planned} == {"+447911000999"}
    assert all(
        "parameters" in json.loads(r.message) or "body" in json.loads(r.message) for r in planned
    )
    # Counts, states and codes stay for reporting; purging again finds nothing to do.
    assert sum(ledger.counts("pii", "p").values()) == 40
    again = purge(ledger, days=90, now=datetime.now(UTC) + timedelta(days=91))
    assert (again.sends, again.status_reports) == (0, 0)


def test_erase_removes_a_customer_everywhere_and_cancels_what_was_still_planned(
    ledger: Ledger, sandbox: SandboxServer, tmp_path: Path
) -> None:
    numbers = sent_with_statuses(ledger, sandbox, n=10)
    ledger.plan("pii", "tomorrow", audience(2))  # customers 1 and 2, not sent yet
    send_log = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    export_send_log(ledger, send_log)
    cache = PhoneCache(ledger.engine, key=KEY)
    normalise_frame(pl.DataFrame({"phone": [SLOW_GB], "country": ["GB"]}), cache=cache)

    done = erase(ledger, ["1", "2"], send_log)
    assert done.sends == 4 and done.phone_cache == 1 and done.send_log >= 4
    erased_numbers = [n for n in numbers if n.endswith(("00000001", "00000002"))]
    assert len(erased_numbers) == 2
    text = ledger_text(ledger)
    assert leaked(text, erased_numbers) == []
    assert leaked(text, [n for n in numbers if n not in erased_numbers])  # the others stay
    with ledger.engine.connect() as con:
        rows = con.execute(
            sa.select(
                sends.c.customer_id, sends.c.partition_key, sends.c.state, sends.c.error_code
            ).where(sends.c.customer_id.like("erased-%"))
        ).all()
        ids = set(con.execute(sa.select(sends.c.customer_id)).scalars())
        history = con.execute(sa.select(sa.func.count()).select_from(send_events)).scalar_one()
    assert len(rows) == 4 and not {"1", "2"} & ids
    assert len({r.customer_id for r in rows}) == 2  # one pseudonym per customer
    tomorrow = {(r.state, r.error_code) for r in rows if r.partition_key == "tomorrow"}
    assert tomorrow == {("cancelled", "erased")}
    assert history > 0  # the state history stays (it holds no personal data)
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as con:
        logged = {r[0] for r in con.execute(f"SELECT customer_id FROM {SEND_LOG_TABLE}").fetchall()}
    assert not {"1", "2"} & logged and len([c for c in logged if c.startswith("erased-")]) == 2
    assert PhoneCache(ledger.engine, key=KEY).count() == 0


def test_erasing_a_customer_of_a_kept_request_gives_the_request_up(ledger_url: str) -> None:
    """Customers 1 and 2 are in one LINE request the provider may hold (its answer was lost):
    it goes out again whole or not at all. Erasing customer 1 cancels their row; sent without
    them, the request would carry another key and could reach customer 2 twice, so it is
    given up (customer 2 `unknown`)."""
    from crash_worker import line_audience

    ledger = Ledger(ledger_url)
    ledger.plan("winback", "p", line_audience(3))
    with ledger.engine.begin() as con:
        kept = sends.c.customer_id.in_(["1", "2"])
        con.execute(sends.update().where(kept).values(request_id=9))
    erase(ledger, ["1"])
    rows = ledger.rows("winback", "p").sort("id")
    assert rows.select("state", "error_code").rows() == [
        ("cancelled", "erased"),
        ("unknown", None),
        ("planned", None),  # not in the request: it goes as planned
    ]
    assert "erased" in rows["error_message"][1]
    ledger.dispose()


def test_no_number_in_dagster_storage_logs_or_the_send_log_after_a_run(
    tmp_path: Path,
    sandbox: SandboxServer,
    monkeypatch: pytest.MonkeyPatch,
    time_machine: TimeMachineFixture,
) -> None:
    """The whole path a marketer triggers: preview, send, statuses back, fallback, send log;
    then every file of the Dagster instance (run and event storage, compute logs), the
    captured log lines and the send log are searched for the numbers that were messaged."""
    import logging

    from cdp_activation.cli.main import DEMO_STATUSES
    from cdp_activation.cli.runner import run_activation, run_fallback, today_partition
    from cdp_activation.demo.data import generate_demo_warehouse

    today = datetime.now(UTC).date()
    time_machine.move_to(datetime.combine(today, time(14, 0), tzinfo=UTC), tick=True)  # awake
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    warehouse = tmp_path / "demo.duckdb"
    as_of = datetime.combine(today, time.min, tzinfo=UTC)
    generate_demo_warehouse(warehouse, customers=1_500, seed=11, as_of=as_of)
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    for name, value in {
        "DAGSTER_HOME": str(home),
        "CDP_WAREHOUSE_URL": f"duckdb:///{warehouse}",
        "CDP_LEDGER_URL": ledger_url,
        "CDP_META_BASE_URL": f"{sandbox.url}/meta",
        "CDP_TWILIO_BASE_URL": f"{sandbox.url}/twilio",
        "CDP_TWILIO_CONTENT_BASE_URL": f"{sandbox.url}/twilio",
        "CDP_META_RATE_PER_SECOND": "5000",
        "CDP_TWILIO_RATE_PER_SECOND": "5000",
    }.items():
        monkeypatch.setenv(name, value)
    captured: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(self.format(record))

    handler = Keep()
    logging.getLogger().addHandler(handler)
    ledger = Ledger(ledger_url)
    try:
        with WebhookServer(ledger, settings_for_sandbox(sandbox).webhook_secrets()) as receiver:
            sandbox.configure(status_webhooks_url=receiver.url, **DEMO_STATUSES)
            partition = today_partition()
            assert run_activation("winback_whatsapp", partition, dry_run=True).success
            summary = run_activation("winback_whatsapp", partition, dry_run=False)
            assert summary.success and summary.sent > 50, summary.error
            run_fallback("winback_whatsapp", partition, not_delivered_within_minutes=0)
        export_send_log(ledger, f"duckdb:///{warehouse}")
    finally:
        logging.getLogger().removeHandler(handler)
        ledger.dispose()
    numbers = sorted({m.to for m in sandbox.messages()})
    assert len(numbers) > 50

    files = [p for p in home.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in files)  # the instance's SQLite storage was written
    stored = "\n".join(p.read_bytes().decode("utf-8", "replace") for p in files)
    with duckdb.connect(str(warehouse), read_only=True) as con:
        log_rows = con.execute(f"SELECT * FROM {SEND_LOG_TABLE}").fetchall()
    send_log_text = "\n".join(" ".join(str(v) for v in row) for row in log_rows)
    assert len(log_rows) >= summary.sent
    all_numbers = [n for n in numbers if n.startswith("+44")] or numbers
    assert leaked(stored, all_numbers) == []
    kept = stored_outputs(home / "storage")
    assert kept  # the audience and decisions were kept, sealed
    assert leaked("\n".join(captured), all_numbers) == []
    assert leaked(send_log_text, all_numbers) == []
    # Past the retention, the sealed outputs go too.
    ledger = Ledger(ledger_url)
    try:
        later = datetime.now(UTC) + timedelta(days=91)
        assert purge(ledger, 90, now=later, storage_dir=home / "storage").outputs == len(kept)
    finally:
        ledger.dispose()
    assert stored_outputs(home / "storage") == []


def _segments(sealed: bytes) -> tuple[bytes, list[bytes]]:
    """A `SealingWriter` file's header (MAGIC and its file id) and its sealed segments, each
    with its own header."""
    from cdp_activation.storage import MAGIC

    head, rest, found = sealed[: len(MAGIC) + 16], sealed[len(MAGIC) + 16 :], []
    while rest:
        size = 5 + 12 + int.from_bytes(rest[1:5], "big")
        found.append(rest[:size])
        rest = rest[size:]
    return head, found


def _sealed(obj: object, segment_bytes: int) -> bytes:
    import io
    import pickle

    from cdp_activation.storage import SealingWriter, storage_cipher

    out = io.BytesIO()
    writer = SealingWriter(storage_cipher(), out, segment_bytes=segment_bytes)
    pickle.dump(obj, writer, protocol=pickle.HIGHEST_PROTOCOL)
    writer.close()
    return out.getvalue()


def test_a_stored_output_larger_than_a_segment_is_sealed_in_segments_none_can_be_moved() -> None:
    """Outputs past AES-GCM's 2 GiB a message (a 10M-customer decisions frame) are sealed a
    segment at a time; a segment changed, dropped, moved, added or taken from another file
    sealed with the same key is refused like a changed file, and a file of the earlier
    single-message kind is still read."""
    import io
    import pickle

    from cdp_activation.settings import SettingsError
    from cdp_activation.storage import (
        MAGIC,
        SealingWriter,
        load_sealed,
        seal,
        storage_cipher,
    )

    cipher = storage_cipher()
    frame = pl.DataFrame({"phone": [f"+4479111{i:05d}" for i in range(5_000)]})
    sealed = _sealed(frame, 4096)
    assert b"447911100042" not in sealed
    head, segments = _segments(sealed)
    assert len(segments) > 5 and sealed.startswith(MAGIC)
    assert load_sealed(cipher, io.BytesIO(sealed), "x").equals(frame)

    def refused(data: bytes) -> None:
        with pytest.raises(SettingsError, match="cannot be read with this CDP_PII_HASH_KEY"):
            load_sealed(cipher, io.BytesIO(data), "x")

    middle = bytearray(sealed)
    middle[len(sealed) // 2] ^= 1
    refused(bytes(middle))
    refused(head + b"".join(segments[:-1]))  # the last segment cut off
    refused(head + b"".join([segments[1], segments[0], *segments[2:]]))  # two swapped
    refused(sealed + segments[-1])  # one added after the last
    # Another output sealed with the same key: none of its segments fits this file, even at
    # the same position (another customer's frame spliced in).
    other_head, other = _segments(_sealed(frame.reverse(), 4096))
    refused(head + b"".join([*segments[:2], other[2], *segments[3:]]))
    refused(other_head + b"".join(segments))
    # A pickle that fills its segments exactly still ends in a last segment (never an empty
    # one that could be dropped unnoticed), and whatever follows the pickle in a file is
    # refused: the file is read to its last segment.
    whole = len(pickle.dumps(b"x" * 1000, protocol=pickle.HIGHEST_PROTOCOL))
    exact_head, exact = _segments(_sealed(b"x" * 1000, whole))
    assert len(exact) == 1 and exact[0][0] == 1  # one segment, marked last
    assert load_sealed(cipher, io.BytesIO(exact_head + exact[0]), "x") == b"x" * 1000
    out = io.BytesIO()
    writer = SealingWriter(cipher, out, segment_bytes=4096)
    pickle.dump(frame, writer, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(b"trailing bytes inside the sealed stream")
    writer.close()
    refused(out.getvalue())
    # Written before segments: one sealed pickle, no header.
    earlier = seal(cipher, pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL))
    assert load_sealed(cipher, io.BytesIO(earlier), "x").equals(frame)


def test_a_large_frame_is_stored_and_read_back_without_a_second_copy_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DataFrame larger than a segment is pickled in parts: storing it and reading it back
    never holds its whole serialized copy (that doubled the audience and decisions steps'
    memory at 10,000,000 customers). Python's own allocations (the pickled bytes) are traced;
    the frame's columns live in polars' memory, outside the trace."""
    import io
    import pickle
    import tracemalloc

    from cdp_activation import storage

    monkeypatch.setattr(storage, "SEGMENT_BYTES", 2**20)
    monkeypatch.setattr(storage, "FRAME_PART_BYTES", 2**20)
    rows = 300_000
    ids = pl.int_range(rows, eager=True)
    frame = pl.DataFrame(
        {
            "customer_id": ids,
            "phone_e164": [f"+4479111{i:06d}" for i in range(rows)],
            "decision": pl.Series(["send", "exclude", "defer"] * (rows // 3)).cast(
                pl.Enum(["send", "defer", "holdout", "exclude"])
            ),
            # Values that do not compress, so the frame stored whole is large.
            "variables": pl.select(
                pl.concat_list(ids.hash(1).cast(pl.String), ids.hash(2).cast(pl.String))
            ).to_series(),
        }
    )
    # What storing it whole would write (LZ4 Arrow IPC, `_FramePickler`).
    buffer = io.BytesIO()
    storage._FramePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(frame)
    whole = len(buffer.getvalue())
    assert whole > 15 * 2**20
    del buffer
    cipher = storage.storage_cipher()
    path = tmp_path / "output.sealed"
    tracemalloc.start()
    try:
        with path.open("wb") as out:
            storage.dump_sealed(cipher, frame, out)
        stored_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        with path.open("rb") as source:
            loaded = storage.load_sealed(cipher, source, str(path))
        loaded_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert loaded.schema == frame.schema and loaded.equals(frame)
    assert b"447911100042" not in path.read_bytes()
    # Parts of about 1 MiB and a segment (read buffer, plain and sealed) at a time: a few
    # MiB, never the 15+ MiB stored frame whole.
    assert stored_peak < whole / 2, (stored_peak, whole)
    assert loaded_peak < whole / 2, (loaded_peak, whole)


def test_a_frame_s_nested_strings_are_stored_at_their_own_size_not_their_source_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A struct of strings built from the audience (the decisions' `variables`) shares the
    audience's string buffers, and a slice or filter of it keeps them all. Stored in parts,
    each part used to be written with every buffer of the column (a 2.5 GB decisions file
    for a 437 MB frame at 10,000,000 customers) and read back as a copy of them each. Each
    part, and a small filtered frame stored whole, now takes about its own strings' size."""
    import pickle

    from cdp_activation import storage

    monkeypatch.setattr(storage, "SEGMENT_BYTES", 2**20)
    monkeypatch.setattr(storage, "FRAME_PART_BYTES", 2**18)
    rows = 200_000
    audience = pl.DataFrame(
        {
            "customer_id": range(rows),
            "first_name": [f"a customer's first name, number {i}" for i in range(rows)],
            "offer_code": [f"WINBACK-{i % 997:04d}-SPRING-OFFER" for i in range(rows)],
            "tags": [[f"tag number {i}", f"segment {i % 13}"] for i in range(rows)],
        }
    )
    decided = audience.select(
        "customer_id",
        pl.struct(pl.col("first_name").alias("1"), pl.col("offer_code").alias("2")).alias(
            "variables"
        ),
        "tags",
    )

    def stored_size(frame: pl.DataFrame) -> int:
        path = tmp_path / "output.sealed"
        with path.open("wb") as out:
            storage.dump_sealed(storage.storage_cipher(), frame, out)
        with path.open("rb") as source:
            loaded = storage.load_sealed(storage.storage_cipher(), source, str(path))
        assert loaded.schema == frame.schema and loaded.equals(frame)
        return path.stat().st_size

    def own_size(frame: pl.DataFrame) -> int:  # built afresh from its values: no shared buffer
        fresh = pl.DataFrame(frame.rows(), schema=frame.schema, orient="row")
        return len(pickle.dumps(fresh, protocol=pickle.HIGHEST_PROTOCOL))

    chosen = decided.filter(pl.col("customer_id") % 2 == 0)  # in parts
    assert chosen.estimated_size() > 10 * storage.FRAME_PART_BYTES
    assert stored_size(chosen) < 1.5 * own_size(chosen)
    few = decided.filter(pl.col("customer_id") % 100 == 0)  # whole
    assert few.estimated_size() < storage.FRAME_PART_BYTES
    assert stored_size(few) < 1.5 * own_size(few)
    # Inside another object (the fallback step's decisions, in its `Prepared`) as well.
    path = tmp_path / "inside.sealed"
    with path.open("wb") as out:
        storage.dump_sealed(storage.storage_cipher(), {"decisions": few, "again": [few]}, out)
    with path.open("rb") as source:
        inside = storage.load_sealed(storage.storage_cipher(), source, str(path))
    assert inside["decisions"].equals(few) and inside["again"][0] is inside["decisions"]
    assert path.stat().st_size < 1.5 * own_size(few)
    # A nested type plain Arrow has not (Int128 in a struct) is stored and read back too.
    wide = few.with_columns(pl.struct(big=pl.col("customer_id").cast(pl.Int128)).alias("big"))
    stored_size(wide)
    # Stored the earlier way (polars' own pickle), it is read as it was.
    with path.open("wb") as out:
        writer = storage.SealingWriter(storage.storage_cipher(), out)
        pickle.dump(few, writer, protocol=pickle.HIGHEST_PROTOCOL)
        writer.close()
    with path.open("rb") as source:
        assert storage.load_sealed(storage.storage_cipher(), source, str(path)).equals(few)


def test_stored_outputs_are_sealed_and_need_a_key_outside_the_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cdp_activation.settings import SettingsError
    from cdp_activation.storage import seal, storage_cipher, unseal

    cipher = storage_cipher()  # sandbox mode: the published key
    sealed = seal(cipher, b"+447911123456")
    assert b"447911123456" not in sealed and unseal(cipher, sealed, "x") == b"+447911123456"
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SettingsError, match="cannot be read with this CDP_PII_HASH_KEY"):
        unseal(cipher, tampered, "x")
    monkeypatch.setenv("CDP_SANDBOX", "")
    monkeypatch.delenv("CDP_PII_HASH_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    with pytest.raises(SettingsError) as refused:
        storage_cipher()
    assert "CDP_PII_HASH_KEY is not set" in str(refused.value)
    assert "\n" not in str(refused.value)
    monkeypatch.setenv("CDP_PII_HASH_KEY", "a-long-random-production-key")
    other = storage_cipher()
    with pytest.raises(SettingsError):
        unseal(other, sealed, "x")  # another key cannot read what the sandbox's sealed
