"""The demo warehouse generator: deterministic, realistic, and shaped like the audience SQL needs.

Everything runs against real DuckDB files made by `generate_demo_warehouse`; phone checks use the
real `phonenumbers` library, the same one the policy engine normalises with.
"""

from __future__ import annotations

import re
import zoneinfo
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import phonenumbers
import pytest
from phonenumbers import PhoneNumberType

from cdp_activation.demo.data import DEMO_TABLES, fill_demo_warehouse, generate_demo_warehouse

N = 20_000
SEED = 42
AS_OF = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
COUNTRY_WEIGHTS = {
    "GB": 0.25, "DE": 0.15, "ES": 0.12, "BR": 0.15, "IN": 0.13, "MX": 0.10, "ZA": 0.05, "US": 0.05,
}  # fmt: skip
TIMEZONES = {
    "GB": "Europe/London",
    "DE": "Europe/Berlin",
    "ES": "Europe/Madrid",
    "BR": "America/Sao_Paulo",
    "IN": "Asia/Kolkata",
    "MX": "America/Mexico_City",
    "ZA": "Africa/Johannesburg",
    "US": "America/New_York",
}
MOBILE_TYPES = {PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE}
E164 = re.compile(r"\+[1-9]\d{7,14}")

LATEST_CONSENT = """
    SELECT customer_id, channel, purpose, opted_in
    FROM channel_consents
    QUALIFY row_number() OVER (
        PARTITION BY customer_id, channel, purpose ORDER BY recorded_at DESC, opted_in ASC
    ) = 1
"""


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("demo") / "warehouse.duckdb"
    counts = generate_demo_warehouse(path, customers=N, seed=SEED, as_of=AS_OF)
    return path, counts


@pytest.fixture
def con(warehouse: tuple[Path, dict[str, int]]) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(str(warehouse[0]), read_only=True)
    connection.execute("SET TimeZone = 'UTC'")
    yield connection
    connection.close()


def table_digests(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[int, str]]:
    """Row count and an order-independent content hash (md5 of the sorted rows) per table."""
    con.execute("SET TimeZone = 'UTC'")
    digests = {}
    for table in DEMO_TABLES:
        row = con.execute(
            f"SELECT count(*), md5(coalesce(string_agg(t::VARCHAR, '\n' ORDER BY t::VARCHAR), ''))"
            f" FROM {table} AS t"
        ).fetchone()
        assert row is not None
        digests[table] = (row[0], row[1])
    return digests


def digests_of(path: Path) -> dict[str, tuple[int, str]]:
    with duckdb.connect(str(path), read_only=True) as connection:
        return table_digests(connection)


def share(con: duckdb.DuckDBPyConnection, sql: str) -> float:
    row = con.execute(sql).fetchone()
    assert row is not None
    return float(row[0])


# --- determinism -------------------------------------------------------------------------------


def test_same_arguments_give_identical_tables(
    warehouse: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    again = tmp_path / "again.duckdb"
    generate_demo_warehouse(again, customers=N, seed=SEED, as_of=AS_OF)
    assert digests_of(again) == digests_of(warehouse[0])


def test_thread_count_does_not_change_contents(
    warehouse: tuple[Path, dict[str, int]],
) -> None:
    with duckdb.connect(":memory:", config={"threads": 1}) as single:
        fill_demo_warehouse(single, customers=N, seed=SEED, as_of=AS_OF)
        assert table_digests(single) == digests_of(warehouse[0])


def test_other_seed_or_as_of_gives_other_data(
    warehouse: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    base = digests_of(warehouse[0])
    other_seed = tmp_path / "seed.duckdb"
    generate_demo_warehouse(other_seed, customers=N, seed=SEED + 1, as_of=AS_OF)
    changed = digests_of(other_seed)
    for table in DEMO_TABLES:
        assert changed[table][1] != base[table][1], table

    other_day = tmp_path / "day.duckdb"
    generate_demo_warehouse(other_day, customers=N, seed=SEED, as_of=AS_OF + timedelta(days=1))
    assert digests_of(other_day)["orders"][1] != base["orders"][1]


def test_replaces_existing_file_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    path.write_bytes(b"not a duckdb file")
    counts = generate_demo_warehouse(path, customers=500, seed=1, as_of=AS_OF)
    assert counts["customers"] == 500
    with duckdb.connect(str(path), read_only=True) as connection:
        assert connection.execute("SELECT count(*) FROM customers").fetchone() == (500,)
        temp_tables = connection.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE 'demo_%'"
        ).fetchone()
        assert temp_tables == (0,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.duckdb"]


def test_default_as_of_is_the_current_utc_hour(tmp_path: Path) -> None:
    path = tmp_path / "now.duckdb"
    before = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    generate_demo_warehouse(path, customers=200)
    after = datetime.now(UTC)
    with duckdb.connect(str(path), read_only=True) as connection:
        row = connection.execute("SELECT max(scored_at) FROM lapse_scores").fetchone()
    assert row is not None
    assert before - timedelta(hours=8) <= row[0] <= after


# --- row counts and distributions --------------------------------------------------------------


def test_row_counts(warehouse: tuple[Path, dict[str, int]], con: duckdb.DuckDBPyConnection) -> None:
    counts = warehouse[1]
    assert set(counts) == set(DEMO_TABLES)
    for table, count in counts.items():
        assert con.execute(f"SELECT count(*) FROM {table}").fetchone() == (count,)
    assert counts["customers"] == N
    assert counts["lapse_scores"] == N
    assert con.execute("SELECT count(DISTINCT customer_id) FROM lapse_scores").fetchone() == (N,)
    assert con.execute("SELECT min(customer_id), max(customer_id) FROM customers").fetchone() == (
        1,
        N,
    )
    assert 2.7 * N < counts["orders"] < 3.3 * N  # 0..6 orders, mean 3
    assert 4.5 * N < counts["channel_consents"] < 6.0 * N
    assert con.execute("SELECT count(DISTINCT order_id) FROM orders").fetchone() == (
        counts["orders"],
    )


def test_countries_timezones_languages(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.execute("SELECT country, timezone, language FROM customers").fetchall()
    countries = Counter(country for country, _, _ in rows)
    assert set(countries) == set(COUNTRY_WEIGHTS)
    for country, weight in COUNTRY_WEIGHTS.items():
        assert abs(countries[country] / N - weight) < 0.015, country

    bad_timezones = 0
    for country, timezone, language in rows:
        assert language == {"DE": "de", "ES": "es", "MX": "es", "BR": "pt_BR"}.get(country, "en")
        if timezone == TIMEZONES[country]:
            continue
        bad_timezones += 1
        if timezone is not None:  # anything else must be a string that is not a real zone
            with pytest.raises((zoneinfo.ZoneInfoNotFoundError, ValueError)):
                zoneinfo.ZoneInfo(timezone)
    assert 0.005 < bad_timezones / N < 0.015
    assert any(tz == "Mars/Olympus" for _, tz, _ in rows)
    assert any(tz is None for _, tz, _ in rows)


def test_lapse_scores(con: duckdb.DuckDBPyConnection) -> None:
    low, high = con.execute("SELECT min(lapse_risk), max(lapse_risk) FROM lapse_scores").fetchone()
    assert low >= 0
    assert high < 1
    above = share(con, "SELECT avg((lapse_risk > 0.7)::INT) FROM lapse_scores")
    assert 0.28 < above < 0.32


def test_high_lapse_risk_means_older_last_order(con: duckdb.DuckDBPyConnection) -> None:
    rows = con.execute(
        """
        SELECT s.lapse_risk > 0.7 AS high,
               avg((max_ordered_at < TIMESTAMPTZ '2025-06-01 12:00:00+00' - INTERVAL 60 DAY)::INT)
        FROM lapse_scores AS s
        JOIN (SELECT customer_id, max(ordered_at) AS max_ordered_at FROM orders GROUP BY 1)
            USING (customer_id)
        GROUP BY 1
        """
    ).fetchall()
    stale = dict(rows)
    assert stale[True] > 0.95
    assert stale[False] < 0.6
    per_customer = con.execute(
        "SELECT count(*) FROM orders GROUP BY customer_id ORDER BY 1"
    ).fetchall()
    assert per_customer[0][0] >= 1
    assert per_customer[-1][0] <= 6
    buyers = con.execute("SELECT count(DISTINCT customer_id) FROM orders").fetchone()[0]
    assert 0.8 * N < buyers < 0.9 * N  # one in seven never ordered
    assert con.execute(
        "SELECT count(*) FROM orders JOIN customers USING (customer_id)"
        " WHERE ordered_at <= created_at OR ordered_at >= TIMESTAMPTZ '2025-06-01 12:00:00+00'"
    ).fetchone() == (0,)


def test_inbound_messages(con: duckdb.DuckDBPyConnection) -> None:
    def whatsapp_share(condition: str) -> float:
        return share(
            con,
            f"SELECT count(*) / {N} FROM last_inbound_messages"
            f" WHERE channel = 'whatsapp' AND {condition}",
        )

    as_of = "TIMESTAMPTZ '2025-06-01 12:00:00+00'"
    open_window = whatsapp_share(f"last_inbound_at BETWEEN {as_of} - INTERVAL 24 HOUR AND {as_of}")
    assert 0.04 < open_window < 0.06
    assert 0.18 < whatsapp_share(f"last_inbound_at < {as_of} - INTERVAL 24 HOUR") < 0.22
    future = whatsapp_share(f"last_inbound_at > {as_of}")
    assert 0 < future < 0.003  # bad data the window rule must not trust
    assert (
        con.execute(
            "SELECT count(*) FROM last_inbound_messages GROUP BY customer_id, channel"
            " HAVING count(*) > 1"
        ).fetchall()
        == []
    )
    assert {
        c for (c,) in con.execute("SELECT DISTINCT channel FROM last_inbound_messages").fetchall()
    } == {
        "whatsapp",
        "sms",
    }


# --- phones ------------------------------------------------------------------------------------


def parse_or_none(text: str, region: str) -> phonenumbers.PhoneNumber | None:
    try:
        return phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None


def to_e164(text: str, region: str) -> str | None:
    """What the policy engine does: '00' means '+', then parse with the customer's region."""
    if text.startswith("00"):
        text = "+" + text[2:]
    number = parse_or_none(text, region)
    if number is None or not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def test_phones_parse_as_intended(con: duckdb.DuckDBPyConnection) -> None:
    kinds: Counter[str] = Counter()
    for phone, country in con.execute("SELECT phone, country FROM customers").fetchall():
        if phone is None:
            kinds["null"] += 1
        elif E164.fullmatch(phone):
            number = phonenumbers.parse(phone)
            assert phonenumbers.is_valid_number(number), phone
            assert phonenumbers.number_type(number) in MOBILE_TYPES, phone
            assert phonenumbers.region_code_for_number(number) == country, phone
            kinds["e164"] += 1
        elif sum(ch.isdigit() for ch in phone) >= 9:
            assert not phone.startswith("+"), phone
            number = parse_or_none(phone, country)
            assert number is not None and phonenumbers.is_valid_number(number), (phone, country)
            assert phonenumbers.number_type(number) in MOBILE_TYPES, phone
            kinds["national"] += 1
        else:
            number = parse_or_none(phone, country)
            assert number is None or not phonenumbers.is_valid_number(number), (phone, country)
            kinds["invalid"] += 1
    assert 0.88 < kinds["e164"] / N < 0.92
    assert 0.05 < kinds["national"] / N < 0.07
    assert 0.02 < kinds["invalid"] / N < 0.04
    assert 0.005 < kinds["null"] / N < 0.015
    national = {
        p
        for (p,) in con.execute(
            "SELECT phone FROM customers WHERE phone LIKE '(%' LIMIT 50"
        ).fetchall()
    }
    assert any(re.fullmatch(r"\(\d\d\) 9\d{4}-\d{4}", p) for p in national)  # BR notation
    assert con.execute("SELECT count(*) FROM customers WHERE phone = ''").fetchone()[0] > 0


def test_households_share_one_e164_number(con: duckdb.DuckDBPyConnection) -> None:
    groups = con.execute(
        """
        SELECT phone, count(*), count(DISTINCT country), list(customer_id ORDER BY customer_id)
        FROM customers
        WHERE phone IS NOT NULL AND phone LIKE '+%' AND length(phone) > 8
        GROUP BY phone HAVING count(*) > 1
        """
    ).fetchall()
    shared = sum(size for _, size, _, _ in groups)
    assert 0.003 < shared / N < 0.008
    for phone, size, countries, ids in groups:
        assert E164.fullmatch(phone)
        assert size == 2 and countries == 1
        assert ids[1] == ids[0] + 1  # household members are neighbours by construction


# --- consents ----------------------------------------------------------------------------------


def test_consent_history_shape(con: duckdb.DuckDBPyConnection) -> None:
    per_group = dict(
        con.execute(
            "SELECT n, count(*) FROM (SELECT count(*) AS n FROM channel_consents"
            " GROUP BY customer_id, channel, purpose) GROUP BY n"
        ).fetchall()
    )
    assert set(per_group) == {1, 2, 3}
    assert {
        (c, p)
        for c, p in con.execute("SELECT DISTINCT channel, purpose FROM channel_consents").fetchall()
    } == {(c, p) for c in ("whatsapp", "sms") for p in ("marketing", "transactional")}
    without_any = share(
        con,
        f"SELECT 1 - count(DISTINCT customer_id) / {N} FROM channel_consents",
    )
    assert 0.06 < without_any < 0.10


def test_latest_consent_wins_data_exists(con: duckdb.DuckDBPyConnection) -> None:
    changed = share(
        con,
        """
        SELECT avg(changed::INT) FROM (
            SELECT arg_max(opted_in, recorded_at) <> arg_min(opted_in, recorded_at) AS changed
            FROM channel_consents GROUP BY customer_id, channel, purpose
        )
        """,
    )
    assert 0.08 < changed < 0.18
    # both directions: opted in then out, and out then back in
    directions = con.execute(
        """
        SELECT DISTINCT arg_min(opted_in, recorded_at), arg_max(opted_in, recorded_at)
        FROM channel_consents GROUP BY customer_id, channel, purpose
        HAVING count(DISTINCT recorded_at) = count(*)
           AND arg_min(opted_in, recorded_at) <> arg_max(opted_in, recorded_at)
        """
    ).fetchall()
    assert set(directions) == {(True, False), (False, True)}
    assert con.execute(
        "SELECT count(*) FROM channel_consents JOIN customers USING (customer_id)"
        " WHERE recorded_at < created_at OR recorded_at > TIMESTAMPTZ '2025-06-01 12:00:00+00'"
    ).fetchone() == (0,)


def test_exact_ties_pair_an_opt_in_with_an_opt_out(con: duckdb.DuckDBPyConnection) -> None:
    ties = con.execute(
        """
        SELECT count(*), bool_or(opted_in), bool_and(opted_in)
        FROM channel_consents
        GROUP BY customer_id, channel, purpose, recorded_at HAVING count(*) > 1
        """
    ).fetchall()
    assert len(ties) >= 5
    for size, any_in, all_in in ties:
        assert size == 2 and any_in and not all_in
    # the tie is on the latest time, so the opt-out must decide it
    latest_tied = con.execute(
        """
        SELECT count(*) FROM (
            SELECT customer_id, channel, purpose, max(recorded_at) AS latest
            FROM channel_consents GROUP BY ALL
        ) AS g
        JOIN channel_consents AS c USING (customer_id, channel, purpose)
        WHERE c.recorded_at = g.latest
        GROUP BY customer_id, channel, purpose HAVING count(*) = 2
        """
    ).fetchall()
    assert len(latest_tied) == len(ties)


def test_final_marketing_opt_in_rates(con: duckdb.DuckDBPyConnection) -> None:
    def opted_in(channel: str) -> float:
        return share(
            con,
            f"SELECT count(*) / {N} FROM ({LATEST_CONSENT})"
            f" WHERE channel = '{channel}' AND purpose = 'marketing' AND opted_in",
        )

    assert 0.57 < opted_in("whatsapp") < 0.63
    assert 0.67 < opted_in("sms") < 0.73


# --- suppressions ------------------------------------------------------------------------------


def test_suppressions_use_another_notation_of_the_same_number(
    con: duckdb.DuckDBPyConnection,
) -> None:
    customers = con.execute(
        "SELECT phone, country FROM customers WHERE phone IS NOT NULL"
    ).fetchall()
    by_e164: dict[str, list[tuple[str, str]]] = {}
    for phone, country in customers:
        e164 = to_e164(phone, country)
        if e164 is not None:
            by_e164.setdefault(e164, []).append((phone, country))

    suppressions = con.execute("SELECT phone, channel, reason FROM suppressions").fetchall()
    assert 0.008 < len(suppressions) / N < 0.015
    raw_customer_phones = {phone for phone, _ in customers}
    # Normalise each suppression with the region of the customer it was made from: candidates
    # are the customers whose E.164 ends with the same last 7 digits.
    by_tail: dict[str, list[tuple[str, str, str]]] = {}
    for e164, owners in by_e164.items():
        for customer_phone, country in owners:
            by_tail.setdefault(e164[-7:], []).append((e164, customer_phone, country))
    notations: Counter[str] = Counter()
    for phone, _channel, _reason in suppressions:
        digits = re.sub(r"\D", "", phone)
        candidates = by_tail.get(digits[-7:], [])
        hits = [
            (e164, customer_phone)
            for e164, customer_phone, country in candidates
            if to_e164(phone, country) == e164
        ]
        assert hits, phone  # the same number as some customer's, once normalised
        assert phone not in raw_customer_phones, phone  # but an exact text join finds nothing
        for _e164, customer_phone in hits:
            assert customer_phone != phone
        if phone.startswith("00"):
            notations["idd"] += 1
        elif E164.fullmatch(phone):
            notations["e164"] += 1
        elif phone.startswith("+"):
            notations["spaced"] += 1
        else:
            notations["national"] += 1
    assert set(notations) == {"idd", "e164", "spaced", "national"}

    channels = Counter(channel for _, channel, _ in suppressions)
    assert channels[None] > 0.7 * len(suppressions)
    assert channels["sms"] > 0 and channels["whatsapp"] > 0
