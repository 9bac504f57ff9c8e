"""Is this webhook really from the provider? One check per provider, each as documented.

- Meta: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body, keyed by the app secret>`.
- Twilio: `X-Twilio-Signature: <base64 HMAC-SHA1, keyed by the auth token, of the full URL
  Twilio called followed by every POST parameter's name and value, sorted by name>`.
- Vonage: `Authorization: Bearer <JWT>` signed HS256 with the account's signature secret; its
  `payload_hash` claim is the SHA-256 hex of the raw body (so the body cannot be swapped).
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
from collections.abc import Iterable

import jwt


def _hmac(key: str, data: bytes, digest: str = "sha256") -> bytes:
    return hmac.new(key.encode(), data, digest).digest()


def meta_signature(app_secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` Meta sends with `body`."""
    return "sha256=" + _hmac(app_secret, body).hex()


def meta_valid(app_secret: str, body: bytes, header: str | None) -> bool:
    if not header or not header.startswith("sha256="):
        return False
    expected = _hmac(app_secret, body).hex()
    return hmac.compare_digest(header.removeprefix("sha256="), expected)


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """The `X-Twilio-Signature` Twilio computes for a form POST to `url`."""
    data = url + "".join(name + value for name, value in sorted(params, key=lambda p: p[0]))
    return base64.b64encode(_hmac(auth_token, data.encode(), "sha1")).decode()


def twilio_valid(
    auth_token: str, url: str, params: Iterable[tuple[str, str]], header: str | None
) -> bool:
    return bool(header) and hmac.compare_digest(
        str(header), twilio_signature(auth_token, url, params)
    )


def vonage_token(signature_secret: str, body: bytes, issued_at: int) -> str:
    """A Vonage-style signed webhook JWT (HS256) for `body`, as the sandbox sends it."""
    claims = {
        "iat": issued_at,
        "jti": hashlib.sha256(body + str(issued_at).encode()).hexdigest()[:32],
        "iss": "Vonage",
        "payload_hash": hashlib.sha256(body).hexdigest(),
    }
    return jwt.encode(claims, signature_secret, algorithm="HS256")


def vonage_valid(signature_secret: str, body: bytes, authorization: str | None) -> bool:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    try:
        claims = jwt.decode(
            token.strip(),
            signature_secret,
            algorithms=["HS256"],
            options={"require": ["iat"]},
        )
    except jwt.InvalidTokenError:
        return False
    payload_hash = claims.get("payload_hash")
    if payload_hash is None:
        return True  # older signed webhooks carry no body hash; the JWT itself is still signed
    return hmac.compare_digest(str(payload_hash), hashlib.sha256(body).hexdigest())


def line_signature(channel_secret: str, body: bytes) -> str:
    return base64.b64encode(_hmac(channel_secret, body)).decode()


def line_valid(channel_secret: str, body: bytes, header: str | None) -> bool:
    return bool(header) and hmac.compare_digest(str(header), line_signature(channel_secret, body))


def basic_valid(credentials: str, authorization: str | None) -> bool:
    """`credentials` is "user:password"; the header must carry exactly those."""
    scheme, _, encoded = (authorization or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    expected = base64.b64encode(credentials.encode()).decode()
    return hmac.compare_digest(encoded.strip(), expected)


def sandbox_signature(secret: str, body: bytes) -> str:
    return _hmac(secret, body).hex()


def sandbox_valid(secret: str, body: bytes, header: str | None) -> bool:
    return bool(header) and hmac.compare_digest(str(header), sandbox_signature(secret, body))
