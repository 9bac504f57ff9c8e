"""Each provider's webhook signature, checked against known answers published outside this
project (issue 16, item 2). The sandbox signs its status webhooks with the receiver's own
signing code, so without these a wrong scheme would pass every other test.

Sources of the vectors (inputs and expected outputs copied as published):
- Twilio: the example of Twilio's webhook security documentation (auth token 12345, the
  myapp.php URL, five POST parameters) -> RSOYDt4T1cUTdK1PDd93/VVr8B8=, also in Twilio's SDKs.
- Meta `X-Hub-Signature-256` is `sha256=` + hex HMAC-SHA256 of the raw body with the app
  secret; Meta publishes no vector, so GitHub's, for the same header and scheme ("It's a Secret
  to Everybody", "Hello, World!"), from GitHub's "Validating webhook deliveries" docs.
- LINE `X-Line-Signature`: the vector of LINE's official Python SDK tests (channel_secret,
  bodybodybodybody).
- Vonage signs with an HS256 JWT: RFC 7515 Appendix A.1 (the HS256 JWS example) for the
  signature, checked through the same library the receiver uses; the token carries no
  `payload_hash`, so the receiver must refuse it as a Vonage webhook.
"""

from __future__ import annotations

import base64
import hashlib

import jwt

from cdp_activation.connectors import signatures as sig
from cdp_activation.sandbox import signing

TWILIO_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
TWILIO_PARAMS = {
    "CallSid": "CA1234567890ABCDE",
    "Caller": "+14158675309",
    "Digits": "1234",
    "From": "+14158675309",
    "To": "+18005551212",
}


def test_twilio_documented_example() -> None:
    expected = "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert sig.twilio_signature("12345", TWILIO_URL, TWILIO_PARAMS.items()) == expected
    assert signing.twilio_header("12345", TWILIO_URL, TWILIO_PARAMS) == expected  # the sandbox
    assert sig.twilio_valid("12345", TWILIO_URL, TWILIO_PARAMS.items(), expected)
    tampered = {**TWILIO_PARAMS, "Digits": "9999"}
    assert not sig.twilio_valid("12345", TWILIO_URL, tampered.items(), expected)
    assert not sig.twilio_valid("54321", TWILIO_URL, TWILIO_PARAMS.items(), expected)


def test_x_hub_signature_256_published_example() -> None:
    secret, body = "It's a Secret to Everybody", b"Hello, World!"
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert sig.meta_signature(secret, body) == expected
    assert signing.meta_header(secret, body) == expected  # the sandbox's own
    assert sig.meta_valid(secret, body, expected)
    assert not sig.meta_valid(secret, b"Hello, World?", expected)


def test_line_sdk_example() -> None:
    expected = "/gg9a+LvFevTH1sd7XCQycD7tsWclCsInj7MhBHxN7k="
    assert sig.line_signature("channel_secret", b"bodybodybodybody") == expected
    assert sig.line_valid("channel_secret", b"bodybodybodybody", expected)
    assert not sig.line_valid("channel_secret", b"bodybodybodybody", "invalid_signature")


RFC7515_KEY = (
    "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow"
)
RFC7515_JWS = (
    "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
)


def test_vonage_hs256_against_rfc_7515_and_its_own_claims() -> None:
    key = base64.urlsafe_b64decode(RFC7515_KEY + "=" * (-len(RFC7515_KEY) % 4))
    claims = jwt.decode(RFC7515_JWS, key, algorithms=["HS256"], options={"verify_exp": False})
    assert claims["iss"] == "joe"
    # A well-signed JWT without Vonage's payload_hash vouches for no body: refused.
    assert not sig.vonage_valid(key.decode("latin-1"), b"{}", f"Bearer {RFC7515_JWS}")
    # What the sandbox signs verifies with the same library and secret, and binds the body.
    body = b'{"status": "delivered"}'
    token = signing.vonage_bearer("a-signature-secret-of-32-bytes-or-more", body, 1_700_000_000)
    decoded = jwt.decode(token, "a-signature-secret-of-32-bytes-or-more", algorithms=["HS256"])
    assert decoded["payload_hash"] == hashlib.sha256(body).hexdigest()
