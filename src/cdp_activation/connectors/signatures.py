"""Is this webhook really from the provider? One check per provider, each as documented.

- Meta: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body, keyed by the app secret>`.
- Twilio: `X-Twilio-Signature: <base64 HMAC-SHA1, keyed by the auth token, of the full URL
  Twilio called followed by every POST parameter's name and value, sorted by name>`.
- Vonage: `Authorization: Bearer <JWT>` signed HS256 with the account's signature secret; its
  `payload_hash` claim (required) is the SHA-256 hex of the raw body (so the body cannot be
  swapped), and its `iat` must be within 5 minutes of now (so it cannot be replayed later).
- LINE: `X-Line-Signature: <base64 HMAC-SHA256 of the raw body, keyed by the channel secret>`.
- Infobip: notify URLs carry HTTP Basic credentials we choose (`Authorization: Basic …`);
  Infobip signs nothing else, so that shared secret is the check.
- Sandbox: `X-Sandbox-Signature: <hex HMAC-SHA256 of the raw body>`, like Meta without prefix.

Every comparison is constant-time; a missing header is simply invalid.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable

import jwt


def same(given: str | None, expected: str) -> bool:
    """Constant-time equality of a header or token against the expected value; any text at
    all (non-ASCII included) is simply unequal, never an error."""
    if given is None:
        return False
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def _hmac(key: str, data: bytes, digest: str = "sha256") -> bytes:
    return hmac.new(key.encode(), data, digest).digest()


def meta_signature(app_secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` Meta sends with `body`."""
    return "sha256=" + _hmac(app_secret, body).hex()


def meta_valid(app_secret: str, body: bytes, header: str | None) -> bool:
    if not header or not header.startswith("sha256="):
        return False
    expected = _hmac(app_secret, body).hex()
    return same(header.removeprefix("sha256="), expected)


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """The `X-Twilio-Signature` Twilio computes for a form POST to `url`."""
    data = url + "".join(name + value for name, value in sorted(params, key=lambda p: p[0]))
    return base64.b64encode(_hmac(auth_token, data.encode(), "sha1")).decode()


def twilio_valid(
    auth_token: str, url: str, params: Iterable[tuple[str, str]], header: str | None
) -> bool:
    return bool(header) and same(header, twilio_signature(auth_token, url, params))


VONAGE_MAX_SKEW_SECONDS = 300.0


def vonage_valid(
    signature_secret: str,
    body: bytes,
    authorization: str | None,
    max_skew: float = VONAGE_MAX_SKEW_SECONDS,
    now: float | None = None,
) -> bool:
    """The JWT is signed with the secret, carries the body's `payload_hash` (without it the
    same token would vouch for any body) and was issued within `max_skew` seconds of now
    (an old token replayed is refused)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    try:
        claims = jwt.decode(
            token.strip(),
            signature_secret,
            algorithms=["HS256"],
            options={"require": ["iat", "payload_hash"], "verify_iat": False},
        )
    except jwt.InvalidTokenError:
        return False
    issued = claims.get("iat")
    if not isinstance(issued, int | float):
        return False
    if abs((time.time() if now is None else now) - issued) > max_skew:
        return False
    return same(str(claims["payload_hash"]), hashlib.sha256(body).hexdigest())


def line_signature(channel_secret: str, body: bytes) -> str:
    return base64.b64encode(_hmac(channel_secret, body)).decode()


def line_valid(channel_secret: str, body: bytes, header: str | None) -> bool:
    return bool(header) and same(header, line_signature(channel_secret, body))


def basic_valid(credentials: str, authorization: str | None) -> bool:
    """`credentials` is "user:password"; the header must carry exactly those."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    expected = base64.b64encode(credentials.encode()).decode()
    return same(encoded.strip(), expected)


def sandbox_signature(secret: str, body: bytes) -> str:
    return _hmac(secret, body).hex()


def sandbox_valid(secret: str, body: bytes, header: str | None) -> bool:
    return bool(header) and same(header, sandbox_signature(secret, body))
