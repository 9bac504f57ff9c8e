"""Phone numbers: E.164, status and number type, exactly as `phonenumbers` decides them.

`phonenumbers` costs ~80 µs a number in Python: a 10,000,000-row audience validated one by one
takes over 13 minutes. So `normalise_frame` works in tiers, all giving the answer
`phonenumbers.parse` + `is_valid_number` + `format_number(E164)` + `number_type` would give:

1. Raw values already in E.164 form (`+` or `00`, then 7 to 15 digits; ~90 % of a CRM column)
   are judged in polars from phonenumbers' own metadata: the country code, each region's
   `national_number_pattern` and `possible_length` per number type, and for country codes
   shared by several regions (+1, +44, +7…) the same region choice phonenumbers makes
   (`leading_digits`, else the first region whose patterns match). This mirrors
   `region_code_for_number`, `_region_code_for_number_from_list`, `is_valid_number_for_region`
   and `_number_type_helper` rule for rule; `tests/test_phones.py` proves it on 250,000+ numbers.
   Numbers whose national prefix for parsing could alter them (e.g. `+44 0…`), an unknown
   calling code (parse() reads it again with the region's international prefix: "+990 44…"
   in Finland), and every country whose patterns use syntax the Rust regex engine lacks or
   reads otherwise, go to tier 3.
2. Raw values in a plain national format of their region (digits and the usual separators:
   "07400 123456", "(201) 555-0123") are rewritten to the E.164 form parse() reads in them
   (its national prefix stripped as `_maybe_strip_national_prefix_carrier_code` strips it,
   with the same viability and length checks) and judged as tier 1 judges it (`national_e164`).
   A number starting with the region's international prefix or calling code, or with a
   national prefix that is more than literal digits, goes to tier 3; so does whatever tier 1
   hands on. `tests/test_phones.py` proves it on national formats of every region.
   So are E.164 numbers written with separators ("+44 7400 123456", "0044 7400-123456"),
   which parse() reads as their compact form (`separated_e164`).
3. Everything else (text around the number, letters, a "+" then a letter, junk) goes through
   `phonenumbers`, once per distinct (raw, region) pair.
4. With a `PhoneCache`, tier-3 answers are kept beside the ledger, so a later run calls
   `phonenumbers` only for pairs it has never seen.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache
from typing import TYPE_CHECKING, Any

import polars as pl
from phonenumbers import PhoneMetadata
from phonenumbers.phonenumberutil import (  # type: ignore[attr-defined]  # stubs omit one
    COUNTRY_CODE_TO_REGION_CODE,
    REGION_CODE_FOR_NON_GEO_ENTITY,
    region_code_for_country_code,
)

from cdp_activation import phone_parsing
from cdp_activation.policy.codes import enum_from_codes

if TYPE_CHECKING:
    from cdp_activation.policy.phone_cache import PhoneCache

STATUS_OK, STATUS_MISSING, STATUS_INVALID = (
    phone_parsing.STATUS_OK,
    phone_parsing.STATUS_MISSING,
    phone_parsing.STATUS_INVALID,
)

# `PhoneNumberType` names in lower case, indexed by the small code the fast path computes.
PHONE_TYPES: tuple[str, ...] = (
    "fixed_line",
    "mobile",
    "fixed_line_or_mobile",
    "toll_free",
    "premium_rate",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
    "unknown",
)
_CODE = {name: code for code, name in enumerate(PHONE_TYPES)}
_UNKNOWN = _CODE["unknown"]
# Codes past the types: the row is not an ok number, or the fast path hands it on.
_INVALID = len(PHONE_TYPES)
_MISSING = _INVALID + 1
_SLOW = _INVALID + 2
_REFUSED_BY_POLARS: set[int] = set()  # calling codes whose patterns polars refused at use
_REFUSED_REGIONS: set[str] = set()  # regions whose national rules polars refused at use
_RARE = _INVALID + 3  # internal: one of the rarer types may match, run the full chain
_CODE_DTYPE = pl.UInt8

# Already E.164 after the preprocessing (leading "00" read as "+"), nothing to strip: the only
# raw values the fast path takes. `[0-9]`, not `\d`, which is Unicode-aware in both engines.
_E164_RAW = r"^(?:\+|00)[1-9][0-9]{6,14}$"
_MAX_CC_DIGITS = 3
_CHUNK = 1 << 20  # rows judged at a time, one chunk per core: bounds memory
_DESC_ORDER = (  # `_number_type_helper` tests the types in this order; the first match wins
    ("premium_rate", "premium_rate"),
    ("toll_free", "toll_free"),
    ("shared_cost", "shared_cost"),
    ("voip", "voip"),
    ("personal_number", "personal_number"),
    ("pager", "pager"),
    ("uan", "uan"),
    ("voicemail", "voicemail"),
)

# Counts real `phonenumbers.parse` calls, so tests and benchmarks can show a warm run makes none.
_parse_calls = 0


def phonenumbers_calls() -> int:
    """How many numbers this process has handed to `phonenumbers.parse` so far."""
    return _parse_calls


def classify(raw: str | None, region: str | None) -> tuple[str | None, str, str | None]:
    """(E.164, status, type) for one raw number, straight from `phonenumbers`
    (`phone_parsing.classify`, counted here).

    `region` is the default for national formats. This is the reference every faster path is
    measured against: strip, a leading "00" means "+", blank is missing.
    """
    global _parse_calls
    answer = phone_parsing.classify(raw, region)
    _parse_calls += answer[1] != STATUS_MISSING  # only a blank number is decided unparsed
    return answer


@lru_cache(maxsize=1_000_000)
def normalise(raw: str | None, region: str | None) -> tuple[str | None, str]:
    """(E.164, status) for one raw number; `region` is the default for national formats."""
    e164, status, _ = classify(raw, region)
    return e164, status


# --------------------------------------------------------------------------------------------
# Fast path: phonenumbers' metadata as polars expressions.


def _rust_regex_ok(pattern: str) -> bool:
    """Whether polars' regex engine (Rust `regex`) compiles it: it has no look-around and no
    back-references, and a size limit that a union of many patterns can pass."""
    try:
        pl.Series([""], dtype=pl.String).str.contains(pattern)
    except pl.exceptions.PolarsError:
        return False
    return True


# The syntax phonenumbers' metadata patterns use, which Python's `re` and Rust's `regex`
# (polars) read alike on ASCII digits: digits, `\d`, groups, alternation, classes, counted and
# optional repetition, anchors. Anything else (look-around, back-references, named or atomic
# groups, nested classes or class set operations, which Rust reads otherwise) is not taken,
# nor a possessive quantifier (`1++`: Python's possessive, Rust's nested repetition).
_RUST_ALIKE = re.compile(r"(?:\\d|\(\?:|[0-9()|\[\]^{},?*+$-])*")
_NESTED_CLASS = re.compile(r"\[[^\]]*\[")
_POSSESSIVE = re.compile(r"[*+?}]\+")


def _rust_syntax_ok(pattern: str) -> bool:
    """`_rust_regex_ok` without compiling: the pattern uses only syntax both engines read the
    same way (`_RUST_ALIKE`). Compiling each of a country's patterns to ask cost ~0.5 ms
    each, 0.27 s for the demo's 34 countries in every process; a refusal by polars left unseen
    here is caught where the pattern is used (`_fast_chunk`)."""
    return (
        _RUST_ALIKE.fullmatch(pattern) is not None
        and "--" not in pattern
        and _NESTED_CLASS.search(pattern) is None
        and _POSSESSIVE.search(pattern) is None
    )


def _full(pattern: str) -> str:
    """A pattern that must match the whole string, as phonenumbers' `fullmatch` requires."""
    return f"^(?:{pattern})$"


@dataclass(frozen=True)
class _Desc:
    """One `PhoneNumberDesc`: its pattern and the lengths checked before the pattern."""

    pattern: str
    lengths: tuple[int, ...]

    def matches(self, nsn: pl.Expr, length: pl.Expr) -> pl.Expr:
        """`_is_number_matching_desc`: length in `possible_length` (if any), then fullmatch."""
        hit = nsn.str.contains(_full(self.pattern))
        return length.is_in(list(self.lengths)) & hit if self.lengths else hit


def _desc(desc: object) -> _Desc | None:
    """A `_Desc`, or None where phonenumbers would answer "no match" without looking."""
    pattern = getattr(desc, "national_number_pattern", None) if desc is not None else None
    if not pattern:
        return None
    return _Desc(pattern, tuple(getattr(desc, "possible_length", None) or ()))


@dataclass(frozen=True)
class _Region:
    """What `_number_type_helper` needs of one region's metadata."""

    code: str
    leading_digits: str | None
    general: _Desc | None
    others: tuple[tuple[int, _Desc], ...]  # (type code, desc) in the helper's order
    fixed_line: _Desc | None
    mobile: _Desc | None
    same_mobile_and_fixed_line: bool
    valid_for_cc: bool  # is_valid_number_for_region's country-code check

    def patterns(self) -> list[str]:
        descs = [self.general, self.fixed_line, self.mobile, *(d for _, d in self.others)]
        found = [_full(d.pattern) for d in descs if d is not None]
        return found + ([f"^(?:{self.leading_digits})"] if self.leading_digits else [])

    @cached_property
    def rare_union(self) -> str | None:
        """One pattern matching whatever any of the rarer types' patterns match."""
        if not self.others:
            return None
        union = _full("|".join(f"(?:{desc.pattern})" for _, desc in self.others))
        return union if _rust_regex_ok(union) else None

    def type_code(self, frame: pl.DataFrame, rare: str | None = None) -> pl.Series:
        """The `PhoneNumberType` code `_number_type_helper` gives each `nsn` of `frame`,
        `_UNKNOWN` if none.

        With `rare` (a pattern matching a superset of the rarer types' matches), those rows
        get `_RARE` instead of their type, for the caller to settle with the full chain.
        Each pattern runs once, into a column of its own, before the chain reads them: in
        one expression polars ran the fixed-line and mobile patterns once for each place
        the chain names them.
        """
        nsn, length = pl.col("nsn"), pl.col("nsn_len")
        unknown = pl.lit(_UNKNOWN, dtype=_CODE_DTYPE)
        if self.general is None:
            return pl.repeat(_UNKNOWN, frame.height, dtype=_CODE_DTYPE, eager=True).alias("code")
        tests = {"general": self.general.matches(nsn, length)}
        others = [] if rare is not None else list(self.others)
        if rare is not None:
            tests["rare"] = nsn.str.contains(rare)
        for code, desc in others:
            tests[f"type{code}"] = desc.matches(nsn, length)
        if self.fixed_line:
            tests["fixed"] = self.fixed_line.matches(nsn, length)
        if self.mobile:
            tests["mobile"] = self.mobile.matches(nsn, length)
        matched = frame.select(**tests)
        chain: Any = pl.when(~pl.col("general")).then(unknown)
        if rare is not None:
            chain = chain.when(pl.col("rare")).then(pl.lit(_RARE, dtype=_CODE_DTYPE))
        for code, _ in others:
            chain = chain.when(pl.col(f"type{code}")).then(pl.lit(code, dtype=_CODE_DTYPE))
        fixed = pl.col("fixed") if self.fixed_line else pl.lit(False)
        mobile = pl.col("mobile") if self.mobile else pl.lit(False)
        both = fixed if self.same_mobile_and_fixed_line else fixed & mobile
        chain = (
            chain.when(both)
            .then(pl.lit(_CODE["fixed_line_or_mobile"], dtype=_CODE_DTYPE))
            .when(fixed)
            .then(pl.lit(_CODE["fixed_line"], dtype=_CODE_DTYPE))
        )
        if not self.same_mobile_and_fixed_line:
            chain = chain.when(mobile).then(pl.lit(_CODE["mobile"], dtype=_CODE_DTYPE))
        return matched.select(chain.otherwise(unknown).alias("code")).to_series()


@dataclass(frozen=True)
class _Country:
    """A country calling code: how parse may rewrite its numbers, and its regions in order."""

    cc: int
    prefix_for_parsing: str | None  # national_prefix_for_parsing of the main region
    empty_prefix_is_harmless: bool  # an empty match of it leaves the number unchanged
    prefix_never_empty: bool  # it cannot match the empty string
    regions: tuple[_Region, ...]  # empty: no metadata, every number is invalid


def _min_width(pattern: str) -> int:
    """The fewest characters `pattern` can match (the stdlib's parser measures it)."""
    from re import _parser  # type: ignore[attr-defined]

    return int(_parser.parse(pattern).getwidth()[0])


def _groups_can_be_empty(pattern: str) -> bool:
    """Whether any capture group of `pattern` can match the empty string.

    An empty match of the national prefix with no group taking part is a no-op in
    `_maybe_strip_national_prefix_carrier_code`; a group that can match nothing might still
    take part and trigger the transform rule, which only phonenumbers can then apply.
    """
    from re import _parser  # type: ignore[attr-defined]  # the stdlib's own parser, to measure each group's minimum width

    def walk(items: _parser.SubPattern) -> bool:
        for op, arg in items:
            if op is _parser.SUBPATTERN:
                group, _, _, sub = arg
                if group is not None and sub.getwidth()[0] == 0:
                    return True
                if walk(sub):
                    return True
            elif op in (_parser.MAX_REPEAT, _parser.MIN_REPEAT, _parser.POSSESSIVE_REPEAT):
                if walk(arg[2]):
                    return True
            elif op is _parser.BRANCH:
                if any(walk(branch) for branch in arg[1]):
                    return True
            elif op in (_parser.ASSERT, _parser.ASSERT_NOT):
                if walk(arg[1]):
                    return True
            elif op is _parser.ATOMIC_GROUP and walk(arg):
                return True
        return False

    return walk(_parser.parse(pattern))


def _region(cc: int, region_code: str, metadata: object) -> _Region:
    own_cc = metadata.country_code  # type: ignore[attr-defined]
    others = tuple(
        (_CODE[name], desc)
        for attr, name in _DESC_ORDER
        if (desc := _desc(getattr(metadata, attr))) is not None
    )
    return _Region(
        code=region_code,
        leading_digits=getattr(metadata, "leading_digits", None),
        general=_desc(metadata.general_desc),  # type: ignore[attr-defined]
        others=others,
        fixed_line=_desc(metadata.fixed_line),  # type: ignore[attr-defined]
        mobile=_desc(metadata.mobile),  # type: ignore[attr-defined]
        same_mobile_and_fixed_line=bool(
            metadata.same_mobile_and_fixed_line_pattern  # type: ignore[attr-defined]
        ),
        valid_for_cc=region_code == REGION_CODE_FOR_NON_GEO_ENTITY or own_cc == cc,
    )


@cache
def _country(cc: int) -> _Country | None:
    """The fast-path rules of one calling code, None if it must take the slow path.

    Built on first use only, so a run pays for the metadata of the countries it meets.
    """
    region_codes = COUNTRY_CODE_TO_REGION_CODE[cc]
    main = PhoneMetadata.metadata_for_region_or_calling_code(cc, region_code_for_country_code(cc))
    prefix = main.national_prefix_for_parsing if main is not None else None
    harmless = True
    patterns: list[str] = []
    if prefix:
        patterns.append(f"^(?:{prefix})")
        if main is not None and main.national_prefix_transform_rule:
            harmless = not _groups_can_be_empty(prefix)
    regions: list[_Region] = []
    if len(region_codes) == 1:
        metadata = PhoneMetadata.metadata_for_region_or_calling_code(cc, region_codes[0])
        if metadata is not None:
            regions.append(_region(cc, region_codes[0], metadata))
    else:
        for region_code in region_codes:
            metadata = PhoneMetadata.metadata_for_region(region_code.upper(), None)
            if metadata is not None:  # `_region_code_for_number_from_list` skips it too
                regions.append(_region(cc, region_code, metadata))
    for region in regions:
        patterns.extend(region.patterns())
    if not all(_rust_syntax_ok(p) for p in patterns):
        return None
    never_empty = _min_width(prefix) > 0 if prefix else False
    return _Country(cc, prefix or None, harmless, never_empty, tuple(regions))


def _type_codes(frame: pl.DataFrame, region: _Region) -> pl.Series:
    """The type code of each `nsn` of `frame` in `region`, `_UNKNOWN` where none matches.

    Most numbers are fixed or mobile, yet `_number_type_helper` tests eight rarer types first.
    One pass with the union of the rare patterns (a superset of their matches: the length
    checks only narrow them) finds the few rows that need the full chain; the others skip it.
    """
    rare = region.rare_union
    if rare is None:
        return region.type_code(frame)
    codes = region.type_code(frame, rare=rare)
    flagged = (codes == _RARE).arg_true()
    if flagged.is_empty():
        return codes
    return codes.scatter(flagged, region.type_code(frame[flagged]))


def _judge_fast(frame: pl.DataFrame, country: _Country | None) -> pl.DataFrame | None:
    """`_judge_country`, or None where the country takes the slow path: no fast rules, or a
    pattern polars' regex engine refused after all (remembered for every later chunk)."""
    if country is None or country.cc in _REFUSED_BY_POLARS:
        return None
    try:
        return _judge_country(frame, country)
    except pl.exceptions.ComputeError as err:
        if "regex" not in str(err):
            raise
        _REFUSED_BY_POLARS.add(country.cc)
        return None


def _judge_country(frame: pl.DataFrame, country: _Country) -> pl.DataFrame:
    """(idx, code) for the numbers of one calling code; code `_SLOW` hands a number on."""
    parts: list[pl.DataFrame] = []
    if country.prefix_for_parsing:
        # parse() strips a national prefix even after "+CC" when it matches at the start, so
        # such numbers may come out different from their raw text: let phonenumbers say.
        prefix = f"^(?:{country.prefix_for_parsing})"
        if country.prefix_never_empty:  # any match rewrites: no need to see what it took
            rewritable = pl.col("nsn").str.contains(prefix)
        else:
            taken = pl.col("nsn").str.extract(prefix, 0)
            rewritable = taken.is_not_null() & (
                (taken.str.len_bytes() > 0) | pl.lit(not country.empty_prefix_is_harmless)
            )
        mask = frame.select(rewritable.fill_null(False)).to_series()
        if mask.any():  # rare after "+CC": most chunks copy nothing
            parts.append(
                frame.filter(mask).select("idx", pl.lit(_SLOW, dtype=_CODE_DTYPE).alias("code"))
            )
            frame = frame.filter(~mask)
    if len(country.regions) == 1:
        region = country.regions[0]
        codes = _type_codes(frame, region)
        parts.append(_valid_codes(frame, codes, region))
    else:
        # `_region_code_for_number_from_list`: the first region whose leading digits match,
        # or, for a region without them, whose patterns give a type; no region: invalid.
        remaining = frame
        for region in country.regions:
            if remaining.is_empty():
                break
            if region.leading_digits is not None:
                mask = remaining["nsn"].str.contains(f"^(?:{region.leading_digits})")
                hits = remaining.filter(mask)
                codes = _type_codes(hits, region)
            else:
                all_codes = _type_codes(remaining, region)
                mask = all_codes != _UNKNOWN
                hits = remaining.filter(mask)
                codes = all_codes.filter(mask)
            parts.append(_valid_codes(hits, codes, region))
            remaining = remaining.filter(~mask)
        parts.append(_invalid(remaining))
    return pl.concat(parts)


def _valid_codes(frame: pl.DataFrame, codes: pl.Series, region: _Region) -> pl.DataFrame:
    """`is_valid_number_for_region`: a type other than unknown, country code permitting."""
    if not region.valid_for_cc:
        return _invalid(frame)
    invalid = pl.lit(_INVALID, dtype=_CODE_DTYPE)
    code = pl.when(codes == _UNKNOWN).then(invalid).otherwise(codes)
    return pl.DataFrame({"idx": frame["idx"]}).select("idx", code.alias("code"))


def _invalid(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select("idx", pl.lit(_INVALID, dtype=_CODE_DTYPE).alias("code"))


def _e164_text(raw: pl.Expr) -> pl.Expr:
    """The preprocessed text of a fast-path raw value: a leading "00" becomes "+"."""
    return pl.when(raw.str.starts_with("00")).then(pl.lit("+") + raw.str.slice(2)).otherwise(raw)


def fast_codes(raws: pl.Series) -> pl.Series:
    """Per raw value, its code: a type index (ok), `_INVALID`, or `_SLOW` (not judged here).

    Exposed for the exactness test and the benchmark; `normalise_frame` is the real API.
    Works in chunks so the intermediate columns of a 10M-row audience never coexist.
    """
    raws = raws.cast(pl.String)
    starts = range(0, len(raws), _CHUNK)
    if len(starts) <= 1:
        chunks = [_fast_chunk(raws.slice(start, _CHUNK)) for start in starts]
    else:
        # Each chunk is many small polars calls (one per region pattern), each on one core:
        # chunks side by side keep every core busy. polars releases the GIL while it works.
        with ThreadPoolExecutor(max_workers=phone_parsing.cores()) as pool:
            chunks = list(pool.map(lambda start: _fast_chunk(raws.slice(start, _CHUNK)), starts))
    if not chunks:
        return pl.Series("code", [], dtype=_CODE_DTYPE)
    return pl.concat(chunks).alias("code")


@cache
def _country_code_table() -> pl.Series:
    """Indexed by a number's first three digits (100-999): the country code
    `_extract_country_code` reads there, null below 100 or where there is none.

    It takes the first of the 1-, 2- and 3-digit prefixes that is a known code (none: the
    number is rejected). A lookup on the first three digits does the same in one pass.
    """
    ccs: list[int | None] = [None] * 100
    for head in range(100, 1000):
        text = str(head)
        found = next(
            (int(text[:w]) for w in (1, 2, 3) if int(text[:w]) in COUNTRY_CODE_TO_REGION_CODE),
            None,
        )
        ccs.append(found)
    return pl.Series("cc", ccs, dtype=pl.UInt16)


def _fast_chunk(raws: pl.Series) -> pl.Series:
    frame = pl.DataFrame({"raw": raws}).with_row_index("idx")
    frame = frame.filter(pl.col("raw").str.contains(_E164_RAW))
    parts = []
    # The pattern guarantees "+" or "00", then a non-zero digit: the digits start at a known
    # offset, and within a country code at a known offset again, so every slice has a fixed
    # start (slices that start row by row cost polars twice as much).
    for prefix in ("+", "00"):
        rows = frame.filter(pl.col("raw").str.starts_with(prefix))
        if rows.is_empty():
            continue
        head = pl.col("raw").str.slice(len(prefix), 3).cast(pl.UInt16)
        rows = rows.with_columns(pl.lit(_country_code_table()).gather(head).alias("cc"))
        # An unknown calling code: parse() tries again without the "+", reading the digits
        # with the region's international prefix (Finland's 990…, North Korea's 99), so
        # "+990 44 7400 123456" is a UK number in FI. The region decides: phonenumbers says.
        unknown = rows.filter(pl.col("cc").is_null())
        parts.append(unknown.select("idx", pl.lit(_SLOW, dtype=_CODE_DTYPE).alias("code")))
        groups = rows.filter(pl.col("cc").is_not_null()).partition_by("cc", as_dict=True)
        for (cc_value,), group in groups.items():
            nsn = pl.col("raw").str.slice(len(prefix) + len(str(cc_value)))
            group = group.select("idx", nsn.alias("nsn")).with_columns(
                pl.col("nsn").str.len_bytes().alias("nsn_len")
            )
            judged_here = _judge_fast(group, _country(int(cc_value)))
            if judged_here is None:  # phonenumbers judges them
                judged_here = group.select("idx", pl.lit(_SLOW, dtype=_CODE_DTYPE).alias("code"))
            parts.append(judged_here)
    if not parts:
        return pl.repeat(_SLOW, len(raws), dtype=_CODE_DTYPE, eager=True)
    judged = pl.concat(parts)
    return pl.repeat(_SLOW, len(raws), dtype=_CODE_DTYPE, eager=True).scatter(
        judged["idx"], judged["code"]
    )


# --------------------------------------------------------------------------------------------
# National formats ("07400 123456" in GB): rewritten to E.164 where parse() would read them so.

# Digits and the separators people type between them, a digit at each end (an opening
# parenthesis before the first): the text parse() reduces to its digits, with no letters,
# extension, second number or "+". A leading "00" is read as "+" (`classify`): not taken.
_NATIONAL_RAW = r"^\(?[0-9][0-9 ().-]{0,40}[0-9]$"
_LITERALS = re.compile(r"[0-9]+(?:\|[0-9]+)*")


@dataclass(frozen=True)
class _National:
    """How parse() reads a national number of one region (`_maybe_extract_country_code`,
    `_maybe_strip_national_prefix_carrier_code`, `_test_number_length`), for the numbers it
    reads without surprises; the others are handed on to phonenumbers."""

    cc: str  # the region's calling code
    idd: str | None  # its international prefix: a number starting so is handed on
    prefixes: tuple[str, ...]  # national prefixes for parsing, literal, in the pattern's order
    other_prefix: str | None  # a prefix pattern that is more than literals: a match hands on
    general: str | None  # the general pattern, whole (`_match_national_number`)
    kept_lengths: tuple[int, ...]  # lengths `_test_number_length` lets a stripped number keep

    def e164(self, digits: pl.Expr) -> pl.Expr:
        """The E.164 text parse() gives `digits` (all the number's digits), or null to hand
        the number on: an international prefix, the region's own calling code or a national
        prefix only phonenumbers can apply at its start."""
        hand_on = digits.str.starts_with(self.cc)
        if self.idd is not None:
            hand_on = hand_on | digits.str.contains(f"^(?:{self.idd})")
        if self.other_prefix is not None:
            hand_on = hand_on | digits.str.contains(f"^(?:{self.other_prefix})")
        national = digits
        if self.prefixes:
            # The regex takes the first alternative that matches: the prefix stripped.
            taken: pl.Expr = pl.lit(0)
            for prefix in reversed(self.prefixes):
                taken = pl.when(digits.str.starts_with(prefix)).then(len(prefix)).otherwise(taken)
            stripped = digits.str.slice(taken)
            keep = stripped.str.len_bytes().is_in(list(self.kept_lengths))
            if self.general is not None:  # a number the pattern takes whole stays whole...
                viable = digits.str.contains(self.general)  # ...unless stripped it does too
                keep = keep & ~(viable & ~stripped.str.contains(self.general))
            national = pl.when((taken > 0) & keep).then(stripped).otherwise(digits)
        # A leading zero left is kept (`_set_italian_leading_zeros_for_phone_number`): the
        # number's national significant number is `national` as written, zeros and all.
        return pl.when(~hand_on).then(pl.lit("+" + self.cc) + national)


@cache
def _national(region: str) -> _National | None:
    """The national rules of a region (upper case), None where phonenumbers reads them all."""
    from phonenumbers import phonenumberutil as util

    metadata = PhoneMetadata.metadata_for_region(region, None)
    if metadata is None:
        return None
    prefix = metadata.national_prefix_for_parsing or None
    literal = prefix is not None and not metadata.national_prefix_transform_rule
    literal = literal and _LITERALS.fullmatch(prefix or "") is not None
    general = getattr(metadata.general_desc, "national_number_pattern", None) or None
    patterns = [p for p in (metadata.international_prefix, prefix, general) if p]
    if not all(_rust_syntax_ok(p) for p in patterns):
        return None
    refused = {
        util.ValidationResult.TOO_SHORT,
        util.ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
        util.ValidationResult.INVALID_LENGTH,
    }
    kept = tuple(
        length
        for length in range(1, 18)
        if util._test_number_length("5" * length, metadata) not in refused
    )
    return _National(
        cc=str(metadata.country_code),
        idd=metadata.international_prefix or None,
        prefixes=tuple(prefix.split("|")) if prefix and literal else (),
        other_prefix=prefix if prefix and not literal else None,
        general=_full(general) if general else None,
        kept_lengths=kept,
    )


def national_e164(raws: pl.Series, regions: pl.Series) -> pl.Series:
    """Per raw value written in a national format of its region, the E.164 text parse()
    reads in it; null where phonenumbers must read it (see `_National`). Its validity and
    type are then the E.164 form's (`fast_codes`): parse() keeps nothing else of it."""
    frame = pl.DataFrame(
        {"raw": raws.cast(pl.String), "region": regions.cast(pl.String).str.to_uppercase()}
    ).with_row_index("idx")
    frame = frame.filter(
        pl.col("raw").str.contains(_NATIONAL_RAW)
        & ~pl.col("raw").str.starts_with("00")
        & pl.col("region").is_not_null()
    ).select("idx", "region", pl.col("raw").str.replace_all("[^0-9]", "").alias("digits"))
    parts = []
    for (region,), group in frame.partition_by("region", as_dict=True).items():
        rules = _national(str(region))
        if rules is None or region in _REFUSED_REGIONS:
            continue
        try:
            parts.append(group.select("idx", rules.e164(pl.col("digits")).alias("e164")))
        except pl.exceptions.ComputeError as err:  # a pattern polars refused after all
            if "regex" not in str(err):
                raise
            _REFUSED_REGIONS.add(str(region))  # its numbers go to phonenumbers from now on
    found = pl.concat(parts).filter(pl.col("e164").is_not_null()) if parts else None
    return _rewritten(len(raws), found)


def _rewritten(length: int, found: pl.DataFrame | None) -> pl.Series:
    """`length` nulls with `found`'s (idx, e164) rows in place: a rewriter's answer."""
    rewritten = pl.repeat(None, length, dtype=pl.String, eager=True)
    if found is None or found.is_empty():
        return rewritten
    return rewritten.scatter(found["idx"], found["e164"])


# --------------------------------------------------------------------------------------------
# International formats with separators ("+44 7400 123456", "0044 (0)7400-123456").

# A "+" (or "00", read as "+" by `classify`), then digits and the separators people type
# between them, a digit at the end: no letters, extension, second number or other sign.
_SEPARATED_RAW = r"^(?:\+|00)[0-9 ().-]{0,40}[0-9]$"
_SEPARATORS = r"[ ().-]"


def separated_e164(raws: pl.Series) -> pl.Series:
    """Per raw value written in E.164 form with separators ("+44 7400 123456"), that form
    without them ("+447400123456"); null for any other value.

    parse() reads such a number as its compact form: after the "+" it keeps only the digits
    (`_maybe_strip_i18n_prefix_and_normalize`), and nothing before it is more than
    punctuation to `_extract_possible_number` and the viability check. Its validity, type
    and E.164 are therefore the compact form's (`fast_codes`, which hands on what it does
    not judge, e.g. "+44 (0)7400…", whose national prefix only phonenumbers strips).
    """
    frame = pl.DataFrame({"raw": raws.cast(pl.String)}).with_row_index("idx")
    found = frame.filter(
        pl.col("raw").str.contains(_SEPARATED_RAW) & pl.col("raw").str.contains(_SEPARATORS)
    ).select("idx", _e164_text(pl.col("raw").str.replace_all(_SEPARATORS, "")).alias("e164"))
    return _rewritten(len(raws), found)


# --------------------------------------------------------------------------------------------
# The frame API.


def _classify_pairs(pairs: pl.DataFrame) -> pl.DataFrame:
    """phonenumbers on each (raw, region) pair: the slow path, ~50 µs a pair on one core, on
    every core for many pairs (`phone_parsing.classify_all`)."""
    global _parse_calls
    rows = phone_parsing.classify_all([(raw, region or None) for raw, region in pairs.iter_rows()])
    _parse_calls += sum(row[1] != STATUS_MISSING for row in rows)  # blank: decided unparsed
    return pairs.with_columns(
        pl.Series("e164", [r[0] for r in rows], dtype=pl.String),
        pl.Series("status", [r[1] for r in rows], dtype=pl.String),
        pl.Series("number_type", [r[2] for r in rows], dtype=pl.String),
    )


def resolve_pairs(pairs: pl.DataFrame, cache: PhoneCache | None = None) -> pl.DataFrame:
    """(raw, region, e164, status, number_type) for distinct (raw, region) pairs.

    `region` is '' for none. Answers come from `cache` where it has them; the rest are
    computed by phonenumbers and stored there, so no pair costs a parse twice.
    """
    if pairs.is_empty():
        return pairs.with_columns(
            pl.lit(None, dtype=pl.String).alias(c) for c in ("e164", "status", "number_type")
        )
    if cache is None:
        return _classify_pairs(pairs)
    found = cache.lookup(pairs)
    missing = pairs.join(found.select("raw", "region"), on=["raw", "region"], how="anti")
    computed = _classify_pairs(missing)
    if not computed.is_empty():
        cache.store(computed)
    return pl.concat([found.select(computed.columns), computed])


STATUSES: tuple[str, ...] = (STATUS_OK, STATUS_INVALID, STATUS_MISSING)
STATUS_DTYPE = pl.Enum(STATUSES)
TYPE_DTYPE = pl.Enum(PHONE_TYPES)
INVALID_CODE, MISSING_CODE = _INVALID, _MISSING  # codes past the types (see `phone_codes`)


def phone_codes(
    raw: pl.Series, regions: pl.Series | None = None, *, cache: PhoneCache | None = None
) -> pl.DataFrame:
    """Per raw number, in order: `phone_e164` (String) and `code` (UInt8).

    `code` is an index into `PHONE_TYPES` for a valid number, else `INVALID_CODE` or
    `MISSING_CODE`: one byte a row, which the policy engine works on directly.
    Raw values in E.164 form (with or without separators), or in a plain national format of
    their region, are judged in polars; the rest once per distinct (raw, region) through
    phonenumbers, or through `cache` when given (see the module's tiers).
    """
    raw = raw.cast(pl.String)
    codes = fast_codes(raw)
    fast = codes < _INVALID  # judged valid in polars: the number is its raw text (or "00"…)
    e164 = raw.clone()  # `scatter` writes in place: the caller's column stays as it is
    # Only the rows the fast path handed on are gathered: a frame of the whole columns, chunked
    # unlike each other, was copied whole by its first filter (10,000,000 numbers: 0.3 s).
    slow_rows = (codes == _SLOW).arg_true()
    if len(slow_rows):
        # E.164 with separators, and national formats parse() reads plainly: judged as the
        # E.164 form parse() reads in them, here.
        slow_raw = raw.gather(slow_rows)
        rewritten = separated_e164(slow_raw)
        if regions is not None:
            national = national_e164(slow_raw, regions.gather(slow_rows))
            rewritten = rewritten.zip_with(rewritten.is_not_null(), national)
        judged = fast_codes(rewritten)
        taken = judged != _SLOW
        codes = codes.scatter(slow_rows.filter(taken), judged.filter(taken))
        e164 = e164.scatter(slow_rows.filter(taken), rewritten.filter(taken))
        slow_rows = slow_rows.filter(~taken)
    slow = pl.DataFrame(
        {
            "idx": slow_rows,
            "raw": raw.gather(slow_rows),
            "region": (
                regions.cast(pl.String).gather(slow_rows).fill_null("")
                if regions is not None
                else pl.repeat("", len(slow_rows), dtype=pl.String, eager=True)
            ),
        }
    )
    if not slow.is_empty():
        nulls = slow.filter(pl.col("raw").is_null())
        asked = slow.filter(pl.col("raw").is_not_null())
        answers = resolve_pairs(asked.select("raw", "region").unique(), cache)
        answered = asked.join(answers, on=["raw", "region"], how="left").select(
            "idx",
            "e164",
            pl.when(pl.col("status") == STATUS_OK)
            .then(pl.col("number_type").replace_strict(_CODE, return_dtype=_CODE_DTYPE))
            .when(pl.col("status") == STATUS_MISSING)
            .then(pl.lit(_MISSING, dtype=_CODE_DTYPE))
            .otherwise(pl.lit(_INVALID, dtype=_CODE_DTYPE))
            .alias("code"),
        )
        codes = codes.scatter(
            nulls["idx"], pl.repeat(_MISSING, len(nulls), dtype=_CODE_DTYPE, eager=True)
        )
        codes = codes.scatter(answered["idx"], answered["code"])
        e164 = e164.scatter(answered["idx"], answered["e164"])
    # A fast-path number is its own E.164 unless written with "00": those few are spelled out
    # here, so the common case shares the raw column's strings instead of building new ones.
    double_zero = (fast & raw.str.starts_with("00")).arg_true()
    if not double_zero.is_empty():
        spelled = pl.select(_e164_text(pl.lit(raw.gather(double_zero)))).to_series()
        e164 = e164.scatter(double_zero, spelled)
    code = pl.lit(codes)
    return pl.select(
        pl.when(code < _INVALID).then(pl.lit(e164)).alias("phone_e164"), code.alias("code")
    )


def e164_number(e164: pl.Expr) -> pl.Expr:
    """An E.164 number as an unsigned integer: its digits (at most 15, no leading zero), so
    the same number is the same integer. Compared and hashed as 8 bytes, not as text."""
    return e164.str.to_integer(strict=False).cast(pl.UInt64, strict=False)  # "+": a sign


def status_of(code: pl.Expr) -> pl.Expr:
    """ "ok" | "invalid" | "missing" (`STATUS_DTYPE`) of a `phone_codes` code."""
    index = pl.when(code < _INVALID).then(0).when(code == _MISSING).then(2).otherwise(1)
    return enum_from_codes(index, STATUSES)


def type_of(code: pl.Expr) -> pl.Expr:
    """The `PhoneNumberType` name (`TYPE_DTYPE`) of a `phone_codes` code, null unless ok."""
    return enum_from_codes(pl.when(code < _INVALID).then(code), PHONE_TYPES)


def normalise_frame(
    frame: pl.DataFrame,
    phone_col: str = "phone",
    region_col: str | None = "country",
    *,
    cache: PhoneCache | None = None,
) -> pl.DataFrame:
    """Add `phone_e164`, `phone_status` ("ok" | "missing" | "invalid") and `phone_type`.

    `phone_type` is the `PhoneNumberType` name in lower case, null unless the status is ok;
    both are enums (`STATUS_DTYPE`, `TYPE_DTYPE`). Row order is kept. See `phone_codes`.
    """
    found = phone_codes(
        frame.get_column(phone_col),
        frame.get_column(region_col) if region_col else None,
        cache=cache,
    )
    code = pl.lit(found["code"])
    return frame.with_columns(
        found["phone_e164"],
        status_of(code).alias("phone_status"),
        type_of(code).alias("phone_type"),
    )


__all__ = [
    "INVALID_CODE",
    "MISSING_CODE",
    "PHONE_TYPES",
    "STATUSES",
    "STATUS_DTYPE",
    "STATUS_INVALID",
    "STATUS_MISSING",
    "STATUS_OK",
    "TYPE_DTYPE",
    "classify",
    "e164_number",
    "fast_codes",
    "normalise",
    "normalise_frame",
    "phone_codes",
    "phonenumbers_calls",
    "resolve_pairs",
    "separated_e164",
    "status_of",
    "type_of",
]
