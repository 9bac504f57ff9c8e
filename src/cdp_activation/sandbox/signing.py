"""How the sandbox signs the webhooks it sends, written from the providers' documentation and
not shared with the receiver's checks (`webhooks/signatures.py`): were both the same code, a
wrong scheme would pass every round trip. tests/test_signature_vectors.py pins both to the
providers' published examples.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping

import jwt


def meta_header(app_secret: str, body: bytes) -> str:
    """`X-Hub-Signature-256`: "sha256=" and the hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()


def twilio_header(auth_token: str, url: str, form: Mapping[str, str]) -> str:
    """`X-Twilio-Signature`: base64 HMAC-SHA1 of the URL followed by each POST parameter's
    name and value, in the alphabetical order of the names."""
    signed = url + "".join(f"{name}{form[name]}" for name in sorted(form))
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def vonage_bearer(signature_secret: str, body: bytes, issued_at: int) -> str:
    """`Authorization: Bearer <JWT>`, HS256 with the signature secret; `payload_hash` is the
    SHA-256 hex of the raw body."""
    claims = {
        "iat": issued_at,
        "jti": hashlib.sha256(body + str(issued_at).encode()).hexdigest()[:32],
        "iss": "Vonage",
        "payload_hash": hashlib.sha256(body).hexdigest(),
    }
    return jwt.encode(claims, signature_secret, algorithm="HS256")


def sandbox_header(secret: str, body: bytes) -> str:
    """`X-Sandbox-Signature`: the hex HMAC-SHA256 of the raw body."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
