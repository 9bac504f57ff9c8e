"""Phone normalisation: the polars fast path and the cache give exactly phonenumbers' answers.

The reference is `classify` — `phonenumbers.parse` + `is_valid_number` + `format_number(E164)`
+ `number_type`, after the project's preprocessing. Nothing here is mocked: the fast path is
compared with the real library on every demo-warehouse phone and on 250,000+ generated E.164
strings, and the cache runs on a real SQLite file and a real PostgreSQL server.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import duckdb
import phonenumbers
import polars as pl
import psutil
import pytest
import sqlalchemy as sa
from phonenumbers import PhoneMetadata
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

from cdp_activation import phone_parsing
from cdp_activation.demo.data import generate_demo_warehouse
from cdp_activation.policy import phones
from cdp_activation.policy.phone_cache import TABLE, PhoneCache
from cdp_activation.policy.phones import (
    PHONE_TYPES,
    STATUS_INVALID,
    STATUS_MISSING,
    STATUS_OK,
    classify,
    fast_codes,
    normalise,
    normalise_frame,
    phonenumbers_calls,
)

_TYPE_ATTRS = (
    "fixed_line",
    "mobile",
    "toll_free",
    "premium_rate",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
)

# Hand-picked edges: shared country codes, leading zeros, national prefixes after "+CC",
# overseas departments, lengths around the limits, unknown codes, "00" prefixes.
EDGE_CASES = [
    "+12025550143",  # US
    "+16135550143",  # CA (Ottawa)
    "+14165550143",  # CA (Toronto)
    "+12425550143",  # BS
    "+12465550143",  # BB
    "+18095550143",  # DO (leading digits 8[024]9)
    "+18005550143",  # toll free, NANP
    "+19005550143",  # premium, NANP
    "+16495550143",  # TC
    "+17875550143",  # PR
    "+13405550143",  # VI
    "+16715550143",  # GU
    "+16845550143",  # AS
    "+12645550143",  # AI
    "+11235550143",  # not a NANP area
    "+447400123456",  # GB mobile
    "+442079460000",  # GB London
    "+447624123456",  # IM mobile
    "+441624123456",  # IM fixed
    "+447797123456",  # JE mobile
    "+441534123456",  # JE fixed
    "+447781123456",  # GG mobile
    "+441481123456",  # GG fixed
    "+4401234567890",  # national prefix after +44: parse strips it
    "+4407400123456",
    "+79123456789",  # RU mobile
    "+74951234567",  # RU Moscow
    "+77012345678",  # KZ mobile
    "+77172123456",  # KZ fixed
    "+70123456789",
    "+390612345678",  # IT Rome, leading zero kept
    "+39061234567",
    "+393123456789",  # IT mobile
    "+390669812345",  # VA (06698)
    "+3900012345",
    "+262262123456",  # RE
    "+262269612345",  # YT
    "+262692123456",  # RE mobile
    "+262639123456",  # YT mobile
    "+590590123456",  # GP
    "+590690123456",  # GP mobile
    "+590590271234",  # BL
    "+590590871234",  # MF
    "+5491112345678",  # AR mobile (the "9" the national prefix rule adds)
    "+541112345678",
    "+5401112345678",
    "+551123456789",  # BR
    "+5511912345678",
    "+55011912345678",
    "+819012345678",  # JP
    "+81012345678",
    "+261201234567",  # MG
    "+26120123456",
    "+3780549123456",  # SM
    "+378123456",
    "+672312345",  # NF
    "+67212345",
    "+80012345678",  # international freephone
    "+8823123456789",
    "+979123456789",
    "+1234567",  # shortest the fast path takes
    "+123456789012345",  # longest
    "+1234567890123456",  # too long for the fast path: phonenumbers says
    "+123456",
    "+999123456789",  # unknown country code
    "+0123456789",
    "+2912345678",  # ER
    "+42312345678",  # LI
    "+4231234567",
    "+3581812345",  # AX
    "+358401234567",  # FI
    "+4779123456",  # SJ
    "+4741234567",  # NO
    "+5999123456",  # CW
    "+5997123456",  # BQ
    "+2125212345678",  # MA
    "+212528123456",  # EH
    "+2902123",  # SH
    "+29082123",  # TA
    "+61212345678",  # AU
    "+61891621234",  # CC
    "+61891641234",  # CX
    "004471234567",
    "00447400123456",
    "0012025550143",
    " +447400123456",
    "+447400123456 ",
    "+44 7400 123456",
    "+44-7400-123456",
    "+4474001234\uff156",  # a full-width digit
    "++447400123456",
    "",
    "   ",
    "n/a",
]

KEY = b"test-pii-hash-key"  # the phone cache's keyed digests
# Not a plain national format ("tel. " before it): phonenumbers reads it, the cache keeps it.
SLOW_GB = "tel. 07400 123456"


def reference(raw: str | None, region: str | None = None) -> tuple[str | None, str, str | None]:
    """What phonenumbers says, called directly (not through any code under test)."""
    if raw is None or not raw.strip():
        return None, STATUS_MISSING, None
    text = raw.strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        number = phonenumbers.parse(text, (region or "").upper() or None)
    except phonenumbers.NumberParseException:
        return None, STATUS_INVALID, None
    if not phonenumbers.is_valid_number(number):
        return None, STATUS_INVALID, None
    kind = phonenumbers.number_type(number)
    name = next(n for n in PHONE_TYPES if getattr(phonenumbers.PhoneNumberType, n.upper()) == kind)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), STATUS_OK, name


def example_numbers() -> list[tuple[str, str]]:
    """(region, E.164) of every region's example number of every type, from the metadata
    (non-geographic entities under region "001")."""
    examples = []
    for code, regions in COUNTRY_CODE_TO_REGION_CODE.items():
        for region in regions:
            metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
            for attr in _TYPE_ATTRS:
                desc = getattr(metadata, attr, None) if metadata is not None else None
                example = getattr(desc, "example_number", None)
                if example:
                    examples.append((region, f"+{code}{example}"))
    return examples


def generated_numbers(count: int, seed: int = 7) -> list[str]:
    """E.164 strings over every country code: random digits of every plausible length, plus
    each region's example numbers (every type) with their last digits randomised, so the
    valid side and every number type are well covered too."""
    rng = random.Random(seed)
    codes = sorted(COUNTRY_CODE_TO_REGION_CODE)
    examples = [e164[1:] for _, e164 in example_numbers()]
    numbers: list[str] = []
    half = count // 2
    while len(numbers) < half:
        code = str(rng.choice(codes))
        total = rng.randint(len(code) + 2, 15)
        numbers.append("+" + code + "".join(rng.choices("0123456789", k=total - len(code))))
    while len(numbers) < count:
        digits = rng.choice(examples)
        keep = max(len(digits) - rng.randint(1, 6), 1)
        tail = "".join(rng.choices("0123456789", k=len(digits) - keep))
        extra = rng.choice(["", "", "", "", rng.choice("0123456789")])  # sometimes one too long
        cut = rng.choice([0, 0, 0, 0, 1])  # sometimes one too short
        body = (digits[:keep] + tail + extra)[: len(digits) + len(extra) - cut]
        numbers.append(("00" if rng.random() < 0.02 else "+") + body)
    return numbers


def assert_frame_matches_reference(
    raws: list[str | None], regions: list[str | None], chunk: int = 0
) -> int:
    """normalise_frame == phonenumbers on every row; returns how many rows were compared."""
    frame = pl.DataFrame(
        {"phone": raws, "country": regions}, schema={"phone": pl.String, "country": pl.String}
    )
    out = normalise_frame(frame)
    got = out.select("phone_e164", "phone_status", "phone_type").rows()
    mismatches = [
        (raw, region, want, have)
        for raw, region, have in zip(raws, regions, got, strict=True)
        if (want := reference(raw, region)) != have
    ]
    assert not mismatches, f"{len(mismatches)} mismatches, e.g. {mismatches[:5]}"
    return len(raws)


def test_fast_path_matches_phonenumbers_on_generated_numbers() -> None:
    numbers = generated_numbers(210_000) + EDGE_CASES
    codes = fast_codes(pl.Series(numbers)).to_list()
    taken = sum(code <= len(PHONE_TYPES) for code in codes)  # judged without phonenumbers
    assert taken > 0.8 * len(numbers)  # the rest: too short for E.164, or a national prefix
    regions = [None] * len(numbers)
    compared = assert_frame_matches_reference(numbers, regions)
    assert compared >= 210_000
    statuses = normalise_frame(pl.DataFrame({"phone": numbers, "country": regions}))
    counts = dict(statuses.group_by("phone_type").len().iter_rows())
    for kind in ("mobile", "fixed_line", "fixed_line_or_mobile", "toll_free", "premium_rate"):
        assert counts.get(kind, 0) > 100, counts  # the valid side is exercised too


def randomised_example(rng: random.Random, examples: list[tuple[str, str]]) -> tuple[str, str]:
    """(region, E.164) of one example number, its last digits randomised, sometimes one
    digit longer or shorter."""
    region, e164 = rng.choice(examples)
    cut = rng.randint(1, 5)
    body = e164[:-cut] + "".join(rng.choices("0123456789", k=cut))
    body += rng.choice(["", "", "", "", rng.choice("0123456789")])
    return region, body[:-1] if rng.random() < 0.1 else body


def other_region(rng: random.Random, region: str, others: Sequence[str | None]) -> str | None:
    """The number's own region, or sometimes another one of `others` (a suppression list's
    number read in each country), or its own in lower case."""
    if rng.random() < 0.2:
        return rng.choice(others)
    return region.lower() if rng.random() < 0.03 else region


Writer = Callable[[random.Random, str, str], str | None]  # (rng, region, E.164) -> raw


def written_numbers(
    count: int, seed: int, write: Writer, others: Sequence[str | None] = ()
) -> tuple[list[str], list[str | None]]:
    """`count` (raw, region) pairs: example numbers of every region, randomised
    (`randomised_example`), each written by `write` (None: drawn again), in its own region or
    sometimes another of the regions and `others` (`other_region`)."""
    rng = random.Random(seed)
    examples = example_numbers()
    regions = [*sorted({region for region, _ in examples}), *others]
    raws: list[str] = []
    regions_out: list[str | None] = []
    while len(raws) < count:
        region, body = randomised_example(rng, examples)
        text = write(rng, region, body)
        if text is not None:
            raws.append(text)
            regions_out.append(other_region(rng, region, regions))
    return raws, regions_out


def _national_text(rng: random.Random, region: str, body: str) -> str | None:
    try:
        number = phonenumbers.parse(body)
        text = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    except phonenumbers.NumberParseException:
        return None
    metadata = PhoneMetadata.metadata_for_region(region, None)
    prefix = (metadata.national_prefix if metadata is not None else None) or ""
    roll = rng.random()
    if roll < 0.08 and prefix and text.startswith(prefix):
        text = text[len(prefix) :]  # the national prefix left out
    elif roll < 0.12:
        text = prefix + text  # written twice
    elif roll < 0.17:
        text = f"{number.country_code} {text}"  # the calling code in front
    elif roll < 0.2:
        idd = (metadata.preferred_international_prefix if metadata is not None else "") or ""
        text = f"{idd or '00'} {number.country_code} {text}"
    elif roll < 0.3:
        digits = "".join(c for c in text if c.isdigit())
        text = rng.choice(["-", ".", " ", ""]).join(
            digits[i : i + rng.randint(2, 4)] for i in range(0, len(digits), 3)
        )
    elif roll < 0.35:
        text = "".join(rng.choices("0123456789", k=rng.randint(2, 16)))
    return text


def national_numbers(count: int, seed: int = 11) -> tuple[list[str], list[str | None]]:
    """(raw, region) pairs in national formats over every region: each region's example
    numbers written as phonenumbers writes them nationally ("07400 123456", "(201) 555-0123"),
    last digits randomised, separators changed, one digit more or less, the national prefix
    dropped or doubled, the calling code or the international prefix in front, other regions'
    numbers, lower-case regions, and plain runs of digits."""
    return written_numbers(count, seed, _national_text)


def test_national_formats_match_phonenumbers_and_most_skip_it() -> None:
    """A number written nationally is rewritten to its E.164 form where parse() would read it
    so, and judged as that; the rest go to phonenumbers. Either way the answer is its own."""
    raws, regions = national_numbers(25_000)
    rewritten = phones.national_e164(pl.Series(raws), pl.Series(regions)).is_not_null().sum()
    assert rewritten > 0.6 * len(raws), rewritten
    before = phonenumbers_calls()
    assert_frame_matches_reference(raws, regions)
    assert phonenumbers_calls() - before < 0.3 * len(raws)  # 0.22: the rest judged in polars


def _separated_text(rng: random.Random, region: str, body: str) -> str | None:
    del region  # "+" numbers are written the same everywhere
    if rng.random() < 0.4:
        try:
            number = phonenumbers.parse(body)
        except phonenumbers.NumberParseException:
            return None
        text = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    else:
        digits, groups, at = body[1:], [], 0
        while at < len(digits):
            step = rng.randint(1, 4)
            groups.append(digits[at : at + step])
            at += step
        if rng.random() < 0.3 and len(groups) > 1:
            groups[1] = f"({groups[1]})"  # an area code in brackets
        if rng.random() < 0.1:
            groups.insert(1, "(0)")  # the national prefix, bracketed after the code
        separators = [" ", " ", "-", ".", "  ", " - ", ""]
        text = "+" + "".join(g + rng.choice(separators) for g in groups[:-1]) + groups[-1]
    roll = rng.random()
    if roll < 0.15:
        text = "00" + text[1:]
    elif roll < 0.25:
        text = "+ " + text[1:]
    elif roll < 0.3:
        text = text + rng.choice([")", "-", " ", "."])  # a separator left at the end
    elif roll < 0.33:
        text = "+(" + text[1:].replace(" ", ")", 1)  # the calling code in brackets
    return text


def separated_numbers(count: int, seed: int = 13) -> tuple[list[str], list[str | None]]:
    """(raw, region) pairs of E.164 numbers written with separators over every region: each
    region's example numbers, last digits randomised, one digit more or less, as phonenumbers
    writes them internationally ("+44 7400 123456") or grouped at random with spaces, hyphens,
    dots and parentheses, "00" for "+", a space after the "+", "(0)" after the calling code,
    doubled or trailing separators; regions of any country, lower case or none."""
    return written_numbers(count, seed, _separated_text, others=[None, ""])


def test_e164_with_separators_matches_phonenumbers_and_most_skip_it() -> None:
    """A number such as "+44 7400 123456" is judged as "+447400123456", as parse() reads it;
    only what the fast path hands on ("+44 (0)7400…") goes to phonenumbers."""
    raws, regions = separated_numbers(20_000)
    rewritten = phones.separated_e164(pl.Series(raws)).is_not_null().sum()
    assert rewritten > 0.8 * len(raws), rewritten
    before = phonenumbers_calls()
    assert_frame_matches_reference(raws, regions)
    assert phonenumbers_calls() - before < 0.35 * len(raws)


def test_fast_path_ignores_the_region_like_phonenumbers_does() -> None:
    """A number in E.164 form means the same whatever the audience's country column says."""
    numbers = generated_numbers(2_000, seed=3) + EDGE_CASES
    rng = random.Random(5)
    regions = [rng.choice(["GB", "US", "DE", "IT", "gb", "", None, "XX", "001"]) for _ in numbers]
    assert_frame_matches_reference(numbers, regions)


@pytest.mark.parametrize("region", ["FI", "AX", "fi", "KP", "GB", None])
def test_an_unknown_calling_code_is_read_with_the_region_s_international_prefix(
    region: str | None,
) -> None:
    """Where the region does count: parse() reads a "+" number whose calling code is unknown
    again without the "+", with the region's international prefix, so "+990 44 7400 123456"
    is a UK mobile in Finland (whose prefixes are 990, 994, 999…) and invalid elsewhere."""
    raws = [
        "+990447400123456",
        "+990 44 7400 123456",
        "00990 44 7400 123456",
        "+999 44 7400 123456",
        "+997 912 345 6789",
        "+99 79123456789",
        "+2147483648",
    ]
    assert_frame_matches_reference(raws, [region] * len(raws))
    if region in ("FI", "AX", "fi"):
        found = normalise_frame(pl.DataFrame({"phone": raws[:2], "country": [region] * 2}))
        assert found["phone_e164"].to_list() == ["+447400123456"] * 2


@pytest.mark.parametrize(
    "pattern",
    ["(?=1)1", "(?!0)1", "(?<=1)2", "(?<!1)2", "(1)\\1", "(?P<a>1)(?P=a)", "(?>12)"],
)
def test_the_syntax_check_refuses_what_polars_regex_engine_refuses(pattern: str) -> None:
    """The fast path asks whether polars (Rust `regex`) takes a metadata pattern by reading it,
    not compiling it: what the engine refuses, the check refuses."""
    assert not phones._rust_regex_ok(pattern)
    assert not phones._rust_syntax_ok(pattern)


@pytest.mark.parametrize("pattern", ["1++", "1{2}+", "[1[2]]", "[0-9--5]"])
def test_the_syntax_check_refuses_what_rust_reads_otherwise(
    pattern: str,
) -> None:
    """Python reads `1++` as possessive, Rust as `(1+)+`; Rust reads `[1[2]]` as a nested
    class and `--` in a class as a difference: not the same pattern, so not fast."""
    assert phones._rust_regex_ok(pattern)
    assert not phones._rust_syntax_ok(pattern)


@pytest.mark.parametrize("pattern", ["\\d{3}", "(?:12|3)[0-9]?", "^(?:0|(\\d{3}))$", "[2-9]\\d{7}"])
def test_the_syntax_check_takes_what_metadata_patterns_use(pattern: str) -> None:
    assert phones._rust_regex_ok(pattern)
    assert phones._rust_syntax_ok(pattern)


def test_every_metadata_pattern_the_syntax_check_takes_compiles_in_polars() -> None:
    taken = [
        pattern
        for cc in COUNTRY_CODE_TO_REGION_CODE
        if (country := phones._country(cc)) is not None
        for pattern in [
            *(f"^(?:{country.prefix_for_parsing})" for _ in [0] if country.prefix_for_parsing),
            *(pattern for region in country.regions for pattern in region.patterns()),
        ]
    ]
    assert len(taken) > 1_000
    assert all(phones._rust_regex_ok(pattern) for pattern in taken)


def test_a_country_pattern_polars_refuses_at_use_sends_its_numbers_to_phonenumbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pattern the syntax check missed but polars refuses (here: a look-ahead forced into
    the UK's rules) costs those numbers a parse, never a failure or a wrong answer."""
    uk = phones._country(44)
    assert uk is not None
    region = uk.regions[0]
    broken = dataclasses.replace(
        region,
        general=dataclasses.replace(region.general, pattern="(?=7)" + region.general.pattern),
    )
    original = phones._country
    monkeypatch.setattr(
        phones,
        "_country",
        lambda cc: dataclasses.replace(uk, regions=(broken,)) if cc == 44 else original(cc),
    )
    monkeypatch.setattr(phones, "_REFUSED_BY_POLARS", set())
    numbers = ["+447400123456", "+442079460000", "+12025550143", "+4474001"]
    codes = fast_codes(pl.Series(numbers)).to_list()
    assert {44} == phones._REFUSED_BY_POLARS  # later chunks and calls do not ask again
    assert fast_codes(pl.Series(numbers)).to_list() == codes

    slow = phones._SLOW
    assert [code == slow for code in codes] == [True, True, False, True]
    assert_frame_matches_reference(numbers, [None] * len(numbers))


def test_a_region_pattern_polars_refuses_at_use_sends_its_national_numbers_to_phonenumbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same for the national formats: a region whose rules polars refuses (a look-ahead
    forced into the UK's general pattern) has its numbers parsed, and is not asked again."""
    uk = phones._national("GB")
    assert uk is not None and uk.general is not None
    broken = dataclasses.replace(uk, general="(?=7)" + uk.general)
    original = phones._national
    monkeypatch.setattr(phones, "_national", lambda r: broken if r == "GB" else original(r))
    monkeypatch.setattr(phones, "_REFUSED_REGIONS", set())
    raws, regions = ["07400 123456", "030 1234567", "020 7946 0000"], ["GB", "DE", "gb"]
    rewritten = phones.national_e164(pl.Series(raws), pl.Series(regions)).to_list()
    assert rewritten == [None, "+49301234567", None]
    assert {"GB"} == phones._REFUSED_REGIONS
    assert_frame_matches_reference(raws, regions)


@pytest.fixture(scope="module")
def demo_phones(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    path = tmp_path_factory.mktemp("demo") / "demo.duckdb"
    generate_demo_warehouse(path, customers=50_000)
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute("SELECT phone, country FROM customers").fetchall()
    return pl.DataFrame(rows, schema={"phone": pl.String, "country": pl.String}, orient="row")


def test_every_demo_warehouse_phone_matches_phonenumbers(demo_phones: pl.DataFrame) -> None:
    compared = assert_frame_matches_reference(
        demo_phones["phone"].to_list(), demo_phones["country"].to_list()
    )
    assert compared == 50_000
    statuses = dict(normalise_frame(demo_phones).group_by("phone_status").len().iter_rows())
    assert set(statuses) == {STATUS_OK, STATUS_MISSING, STATUS_INVALID}


def test_normalise_frame_keeps_rows_columns_and_order() -> None:
    frame = pl.DataFrame(
        {
            "customer_id": [3, 1, 2, 4, 5],
            "phone": ["07400 123456", "+447400123456", None, "0044 7400 123457", "+447400123456"],
            "country": ["GB", "GB", "GB", None, "DE"],
        }
    )
    out = normalise_frame(frame)
    assert out.columns == [*frame.columns, "phone_e164", "phone_status", "phone_type"]
    assert out["customer_id"].to_list() == [3, 1, 2, 4, 5]
    assert out.select("phone_e164", "phone_status", "phone_type").rows() == [
        ("+447400123456", "ok", "mobile"),
        ("+447400123456", "ok", "mobile"),
        (None, "missing", None),
        ("+447400123457", "ok", "mobile"),
        ("+447400123456", "ok", "mobile"),
    ]
    no_region = normalise_frame(frame, region_col=None)
    assert no_region["phone_status"].to_list() == ["invalid", "ok", "missing", "ok", "ok"]
    empty = normalise_frame(frame.clear())
    assert empty.columns == out.columns and empty.is_empty()


def test_normalise_keeps_its_contract() -> None:
    assert normalise("07400 123456", "gb") == ("+447400123456", STATUS_OK)
    assert normalise(None, "GB") == (None, STATUS_MISSING)
    assert normalise("12345", "GB") == (None, STATUS_INVALID)
    assert classify("+447400123456", None) == ("+447400123456", STATUS_OK, "mobile")


@pytest.fixture
def cache(ledger_url: str) -> Iterator[PhoneCache]:
    phone_cache = PhoneCache(ledger_url, key=KEY)
    yield phone_cache
    phone_cache.dispose()


def test_warm_run_calls_phonenumbers_zero_times(
    cache: PhoneCache, demo_phones: pl.DataFrame
) -> None:
    frame = demo_phones.head(20_000)
    expected = normalise_frame(frame)  # no cache: the reference for both runs below

    before = phonenumbers_calls()
    cold = normalise_frame(frame, cache=cache)
    cold_calls = phonenumbers_calls() - before
    assert cold.equals(expected)
    # Only values neither in E.164 form (with or without separators) nor in a plain national
    # format (junk, text around a number) reach phonenumbers, once a pair.
    national = fast_codes(phones.national_e164(frame["phone"], frame["country"]))
    separated = fast_codes(phones.separated_e164(frame["phone"]))
    slow = frame.filter(
        pl.col("phone").is_not_null()
        & (fast_codes(frame["phone"]) > len(PHONE_TYPES))
        & (national > len(PHONE_TYPES))
        & (separated > len(PHONE_TYPES))
    )
    assert cache.count() == len(slow.unique())
    blank = pl.col("phone").str.strip_chars() == ""  # missing: decided without a parse
    assert cold_calls == len(slow.filter(~blank).unique())
    assert 0 < cold_calls < 0.01 * len(frame)

    before = phonenumbers_calls()
    warm = normalise_frame(frame, cache=cache)
    assert phonenumbers_calls() - before == 0
    assert warm.equals(expected)

    # New pairs cost a call each; the ones already seen still cost nothing.
    extra = pl.DataFrame({"phone": ["tel. 07400 123999", "0151/12345678"], "country": ["GB", "DE"]})
    before = phonenumbers_calls()
    normalise_frame(pl.concat([frame, extra]), cache=cache)
    assert phonenumbers_calls() - before == 2


def test_many_numbers_are_parsed_on_every_core_with_the_same_answers(
    cache: PhoneCache, demo_phones: pl.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past `PARALLEL_MIN` pairs, helper processes (`python -m cdp_activation.phone_parsing`)
    parse them a chunk at a time: the answers, their order and the call count are those of
    this process alone."""
    # Written after a word, the national formats are for phonenumbers to read.
    frame = demo_phones.head(20_000).with_columns(
        pl.when(pl.col("phone").str.contains("^[0-9(]"))
        .then(pl.lit("tel. ") + pl.col("phone"))
        .otherwise(pl.col("phone"))
        .alias("phone")
    )
    expected = normalise_frame(frame)  # below the threshold: this process alone
    here: list[int] = []  # pairs parsed in this process: none, the helpers parse them all
    parse_here = phone_parsing.classify

    def counted(raw: str | None, region: str | None) -> phone_parsing.Answer:
        here.append(1)
        return parse_here(raw, region)

    monkeypatch.setattr(phone_parsing, "PARALLEL_MIN", 100)
    monkeypatch.setattr(phone_parsing, "_CHUNK", 50)
    monkeypatch.setattr(phone_parsing, "classify", counted)
    monkeypatch.setattr(phone_parsing, "cores", lambda: 2)
    before = phonenumbers_calls()
    cold = normalise_frame(frame, cache=cache)
    asked = phonenumbers_calls() - before
    assert cold.equals(expected)
    assert asked > 1_000  # the slow path had work to share
    assert here == [], "numbers were parsed in this process, not by the helpers"
    blank = frame.filter(pl.col("phone").str.strip_chars() == "").unique()  # no parse needed
    assert asked == cache.count() - blank.height


def _running_children(
    also: Callable[[str, str], bool] = lambda name, command: False,
) -> list[psutil.Process]:
    """This process's children still running that are phone helpers (or `also` matches their
    name and command line): one that has exited is gone, reaped or not."""
    running = []
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())
            if "phone_parsing" in command or also(child.name(), command):
                running.append(child)
        except psutil.Error:  # exited meanwhile, or a zombie until its parent reaps it
            continue
    return running


def test_a_helper_that_fails_leaves_its_share_to_this_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever a helper does wrong (cannot start, exits, echoes something else, never
    answers), its chunks are parsed here, it is said in one line of the log, nothing waits on
    it for good and no process is left behind."""
    pairs = [(f"07400 {n:06d}", "GB") for n in range(300)] + [("030 1234567", "de"), ("", "GB")]
    expected = [phone_parsing.classify(raw, region) for raw, region in pairs]
    assert expected[0] == ("+447400000000", STATUS_OK, "mobile")
    monkeypatch.setattr(phone_parsing, "PARALLEL_MIN", 10)
    monkeypatch.setattr(phone_parsing, "_CHUNK", 20)
    monkeypatch.setattr(phone_parsing, "ANSWER_WITHIN", 1.0)
    silent, echo = tmp_path / "silent", tmp_path / "echo"
    silent.write_text("#!/bin/sh\nexec sleep 600\n")  # takes the numbers, never answers
    echo.write_text("#!/bin/sh\nexec cat\n")  # answers with the question
    for script in (silent, echo):
        script.chmod(0o755)
    for helper, workers in (
        ("/nonexistent/python", 2),  # cannot start
        ("/bin/false", 3),  # exits at once
        (str(echo), 2),
        (str(silent), 2),
    ):
        monkeypatch.setattr(phone_parsing.sys, "executable", helper)
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger=phone_parsing.__name__):
            caplog.clear()
            assert phone_parsing.classify_all(pairs, workers=workers) == expected, helper
        assert time.monotonic() - began < 15, helper
        said = [r.getMessage() for r in caplog.records]
        assert len(said) == 1 and "helper processes failed" in said[0], (helper, said)
        assert "07400" not in said[0]  # no number in the log
        left = _running_children(lambda name, command: name in ("sleep", "cat", "false"))
        assert not left, f"helper processes left behind: {left}"


def test_interrupted_the_helpers_get_no_more_numbers_and_exit() -> None:
    """A step stopped or a task's time limit reached while the helpers parse: the exception
    goes on at once, and the helpers, given no more chunks, are gone within a chunk's time."""

    class Stopped(Exception):
        pass

    def stop_now(signum: int, frame: object) -> None:
        raise Stopped

    pairs = [(f"07{n:09d}", "GB") for n in range(400_000)]  # ~7 s of parsing on 2 cores
    # SIGUSR1, not SIGALRM: pytest-timeout keeps the alarm for itself.
    previous = signal.signal(signal.SIGUSR1, stop_now)
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(0.5, signal.pthread_kill, args=(main, signal.SIGUSR1))
    began = time.monotonic()
    try:
        timer.start()
        with pytest.raises(Stopped):
            phone_parsing.classify_all(pairs, workers=2)
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert time.monotonic() - began < 3

    deadline = time.monotonic() + 2  # a chunk takes ~0.15 s; the rest would take seconds
    while _running_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running_children(), "helper processes went on after the interruption"


def test_helpers_are_one_per_core_the_cpu_quota_allows(tmp_path: Path) -> None:
    assert phone_parsing._cgroup_quota(tmp_path) is None  # no cgroup files: no quota
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert phone_parsing._cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus=1.5
    assert phone_parsing._cgroup_quota(tmp_path) == 2
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")  # cgroup v1, half a CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert phone_parsing._cgroup_quota(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert phone_parsing._cgroup_quota(tmp_path) is None
    assert 1 <= phone_parsing.cores() <= (os.cpu_count() or 1)


def test_cache_lookup_and_store_in_bulk(cache: PhoneCache) -> None:
    pairs = pl.DataFrame(
        {
            "raw": ["07400 123456", "07400 123456", "n/a", "it's\x00odd", "0'; DROP TABLE x;--"],
            "region": ["GB", "", "GB", "GB", "GB"],
        }
    )
    assert cache.lookup(pairs).is_empty()
    results = pairs.with_columns(
        pl.Series("e164", ["+447400123456", None, None, None, None], dtype=pl.String),
        pl.Series("status", ["ok", "invalid", "invalid", "invalid", "invalid"]),
        pl.Series("number_type", ["mobile", None, None, None, None], dtype=pl.String),
    )
    cache.store(results)
    cache.store(results)  # storing again is harmless
    found = cache.lookup(pairs).sort("raw", "region")
    assert found.rows() == sorted(
        row for row in results.rows() if "\x00" not in row[0]
    )  # a NUL cannot be stored in PostgreSQL text: such values are simply never cached
    assert cache.count() == 4


def test_a_new_phonenumbers_version_invalidates_cached_answers(ledger_url: str) -> None:
    pairs = pl.DataFrame({"raw": [SLOW_GB], "region": ["GB"]})
    stale = PhoneCache(ledger_url, key=KEY, version="0.0.1")
    stale.store(
        pairs.with_columns(
            pl.lit(None, dtype=pl.String).alias("e164"),
            pl.lit("invalid").alias("status"),
            pl.lit(None, dtype=pl.String).alias("number_type"),
        )
    )
    stale.dispose()
    current = PhoneCache(ledger_url, key=KEY)
    try:
        assert current.lookup(pairs).is_empty()  # the old answer is not served
        before = phonenumbers_calls()
        out = normalise_frame(pl.DataFrame({"phone": [SLOW_GB], "country": ["GB"]}), cache=current)
        assert phonenumbers_calls() - before == 1
        assert out["phone_status"].to_list() == ["ok"]
        assert current.lookup(pairs)["status"].to_list() == ["ok"]  # replaced, not duplicated
        with current.engine.connect() as con:
            rows = con.execute(sa.text(f"SELECT count(*) FROM {TABLE}")).scalar_one()
        assert rows == 1
    finally:
        current.dispose()


def test_a_cache_entry_is_found_by_the_keyed_digest_anyone_with_the_key_can_recompute(
    ledger_url: str,
) -> None:
    """The digest is HMAC-SHA256 of "raw\\x1fregion" under the key, its first 16 bytes in hex;
    the cache that kept BLAKE2b digests (`phone_lookups`) is dropped, not read."""
    import hashlib
    import hmac

    with sa.create_engine(ledger_url).begin() as con:
        con.exec_driver_sql("CREATE TABLE phone_lookups (digest TEXT PRIMARY KEY)")
        con.exec_driver_sql("INSERT INTO phone_lookups VALUES ('0123456789abcdef')")
    cache = PhoneCache(ledger_url, key=KEY)
    try:
        normalise_frame(pl.DataFrame({"phone": [SLOW_GB], "country": ["GB"]}), cache=cache)
        with cache.engine.connect() as con:
            stored = con.execute(sa.text(f"SELECT digest, country_code, digits FROM {TABLE}")).all()
            assert not sa.inspect(con).has_table("phone_lookups")
        expected = hmac.new(KEY, f"{SLOW_GB}\x1fGB".encode(), hashlib.sha256).hexdigest()[:32]
        assert [tuple(row) for row in stored] == [(expected, 44, 10)]
    finally:
        cache.dispose()


_OPEN_CACHE_AT = """
import sys, time
from cdp_activation.policy.phone_cache import PhoneCache
url, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
PhoneCache(url, key=b"k").dispose()
"""


def test_processes_opening_the_cache_together_on_a_new_database_all_get_it(
    ledger_url: str, tmp_path: Path
) -> None:
    """Runs and workers starting at once on a new database (or the first run after the
    upgrade that moved the cache to its table) all open it: the table is made once, under the
    ledger's schema lock. Without it, PostgreSQL refused the second CREATE in most rounds. A
    new SQLite file (each round's) is also switched to WAL by one of them while the others
    wait, where SQLite itself refused some at once ("database is locked", 2 rounds in 8)."""
    for round_ in range(3):
        url = ledger_url
        if ledger_url.startswith("sqlite"):
            url = f"sqlite:///{tmp_path / f'new-{round_}.sqlite'}"
        engine = sa.create_engine(url)  # a plain connection: a file not yet in WAL
        try:
            with engine.begin() as con:
                con.exec_driver_sql(f"DROP TABLE IF EXISTS {TABLE}")
                if url != ledger_url:
                    con.exec_driver_sql("CREATE TABLE other (id INTEGER)")  # a file, not empty
            start = time.time() + 2.0  # past every process's imports
            processes = [
                subprocess.Popen(
                    [sys.executable, "-c", _OPEN_CACHE_AT, url, str(start)],
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(6)
            ]
            errors = [p.communicate(timeout=120)[1] for p in processes]
            failed = [
                e.strip()[-400:] for p, e in zip(processes, errors, strict=True) if p.returncode
            ]
            assert not failed, failed
            assert sa.inspect(engine).has_table(TABLE)
        finally:
            engine.dispose()


def test_cache_shares_the_ledger_engine(ledger_url: str, tmp_path: Path) -> None:
    from cdp_activation.ledger import Ledger

    ledger = Ledger(ledger_url)
    try:
        cache = PhoneCache(ledger.engine, key=KEY)
        normalise_frame(pl.DataFrame({"phone": [SLOW_GB], "country": ["GB"]}), cache=cache)
        assert cache.count() == 1
        cache.dispose()  # leaves the ledger's engine usable
        with ledger.engine.connect() as con:
            assert con.execute(sa.text("SELECT count(*) FROM sends")).scalar_one() == 0
    finally:
        ledger.dispose()


def test_the_cache_keeps_no_phone_number_and_is_useless_without_its_key(ledger_url: str) -> None:
    """What is stored per number: a keyed digest, a country code and a digit count. The E.164
    form comes back from the raw value; a form that cannot (letters) is not cached."""
    frame = pl.DataFrame(
        {
            "phone": [SLOW_GB, "+44 (0)20 7946 0958", "1-800-FLOWERS", "tel. 030 1234567"],
            "country": ["GB", "GB", "US", "DE"],
        }
    )
    cache = PhoneCache(ledger_url, key=KEY)
    try:
        expected = normalise_frame(frame)
        assert normalise_frame(frame, cache=cache).equals(expected)
        assert cache.count() == 3  # the vanity number is parsed every time instead
        with cache.engine.connect() as con:
            stored = " ".join(
                str(value)
                for row in con.execute(sa.text(f"SELECT * FROM {TABLE}"))
                for value in row
            )
        for number in expected["phone_e164"].drop_nulls().to_list():
            national = number[3:]
            assert national not in stored and number not in stored
        before = phonenumbers_calls()
        assert normalise_frame(frame, cache=cache).equals(expected)
        assert phonenumbers_calls() - before == 1  # only the vanity number
    finally:
        cache.dispose()
    other = PhoneCache(ledger_url, key=b"another key")
    try:
        assert other.lookup(
            frame.select(pl.col("phone").alias("raw"), pl.col("country").alias("region"))
        ).is_empty()
    finally:
        other.dispose()
