"""Mask phone numbers before they reach a log, an exception or UI metadata.

Numbers are personal data (DESIGN §5 "Secrets and PII stay put"), yet an operator reading an
error still needs a hint of *which* recipient it was: the country code says where, the last two
digits let a person match it against a row they already hold. Everything between is starred.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, urlsplit, urlunsplit

from phonenumbers import COUNTRY_CODE_TO_REGION_CODE

# E.164 numbers inside free text (provider error bodies echo the number we sent).
_PHONE_IN_TEXT = re.compile(r"(?<![\w*])\+?\d{8,15}(?!\w)")
# International numbers written for people: "+52 55 1440 3693", "+1 (415) 555-0100",
# "+44.7911.123456" (a leading + keeps dates and amounts out).
# Each group is atomic: a run of digits is cut into groups one way only, so a long run that
# ends in a letter is given up on in a few steps instead of every way of cutting it (~50 ms a
# run of 40 digits before); whole groups may still be given back to end before a word. Any
# number of groups: a run that is more than one number is taken whole and split (or starred)
# by `_mask_spaced`, so no number written in pairs after it is left showing.
_SPACED_PHONE = re.compile(r"(?<![\w*+])\+\d{1,4}(?:(?>[ .\-]?\(?\d{1,6}\)?))+(?![\w*])")


def _country_code(digits: str) -> str:
    """The E.164 country code at the start of `digits` (codes are prefix-free, 1-3 digits)."""
    for size in (1, 2, 3):
        if int(digits[:size] or 0) in COUNTRY_CODE_TO_REGION_CODE:
            return digits[:size]
    return digits[:1]


def mask_phone(e164: str) -> str:
    """`+447911123456` → `+44********56`: keep the country code and the last two digits.

    Anything that is not a plausible number (too short, letters) is starred except its last two
    characters, so a mistyped value never leaks whole either.
    """
    text = e164.strip()
    digits = text.removeprefix("+")
    if not digits.isdigit() or len(digits) < 6:
        return "*" * max(len(text) - 2, 0) + text[-2:]
    code = _country_code(digits)
    hidden = len(digits) - len(code) - 2
    return f"+{code}{'*' * hidden}{digits[-2:]}"


def mask_phones_in(text: str) -> str:
    """Mask every phone-number-looking run of 8-15 digits (optionally after '+') in `text`,
    and every '+'-led number written with spaces, dots, dashes or brackets."""
    text = _SPACED_PHONE.sub(_mask_spaced, text)
    return _PHONE_IN_TEXT.sub(lambda m: mask_phone(m.group(0)), text)


def _mask_spaced(match: re.Match[str]) -> str:
    text = match.group(0)
    digits = re.sub(r"\D", "", text)
    if 8 <= len(digits) <= 15:
        return mask_phone("+" + digits)
    # More digits than a number has: numbers written side by side ("+44 7911 123456
    # (447911123456)"). Split where the first ends and the rest, read again, is masked as
    # well (at most a country code and two digits of it left); else every digit is starred.
    cuts = []  # where a first number of 8-15 digits could end: a handful, however long the run
    for found in _GROUP_BREAK.finditer(text):
        head = re.sub(r"\D", "", text[: found.start()])
        if len(head) > 15:
            break
        if len(head) >= 8:
            cuts.append((found.start(), head))
    for cut, head in reversed(cuts):
        rest = mask_phones_in(text[cut:])
        if rest != text[cut:] and len(re.sub(r"\D", "", rest)) <= 5:
            return mask_phone("+" + head) + rest
    return re.sub(r"\d", "*", text[:-2]) + text[-2:]


_GROUP_BREAK = re.compile(r"(?<=[\d)])(?:[ .\-]\(?|\()(?=\d)")  # where a group of digits ends


def masked(url: str) -> str:
    """A URL with its password replaced, for messages (a broker's, Redis's)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def secret_forms(secret: str) -> set[str]:
    """Every form a credential travels in and an upstream may echo back: as it is,
    URL-encoded (both ways), and base64 (standard and URL-safe, with and without padding;
    a "user:password" pair is what an HTTP Basic header carries)."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret)}
    raw = secret.encode()
    for encoded in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
        forms |= {encoded, encoded.rstrip("="), quote(encoded, safe="")}
    return {f for f in forms if f}


def redact_secrets(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every form of every secret (`secret_forms`) replaced by `***`; pass a
    Basic-auth pair as "user:password" to cover its header too."""
    forms = set()
    for secret in secrets:
        if secret:
            forms |= secret_forms(secret)
    for form in sorted(forms, key=len, reverse=True):  # the longest first: no half-replaced
        text = text.replace(form, "***")
    return text
