"""The status receiver against what an attacker or a broken upstream sends (issue 15).

Over real HTTP to the real receiver and a real SQLite ledger: oversized bodies are refused
before they are read whole (413), a signed body of any shape is never a 500, a header or
token of any text is never a 500, a Vonage token without its body hash or issued long ago is
refused, and no query string (a verify token) reaches the access log. Nothing is written for
anything refused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_activation.connectors import signatures as sig
from cdp_activation.feedback.receiver import WebhookServer
from cdp_activation.ledger import Ledger
from test_webhooks import REPORTS, SECRETS, post, signed

pytestmark = pytest.mark.integration

JSON_PROVIDERS = ("meta", "infobip", "vonage", "line", "sandbox")


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    ledger = Ledger(f"sqlite:///{tmp_path_factory.mktemp('edges') / 'ledger.sqlite'}")
    yield ledger
    ledger.dispose()


@pytest.fixture(scope="module")
def receiver(ledger: Ledger) -> Iterator[WebhookServer]:
    with WebhookServer(ledger, SECRETS) as server:
        yield server


def stored(ledger: Ledger) -> int:
    with ledger.engine.connect() as con:
        return int(con.execute(sa.text("SELECT count(*) FROM status_events")).scalar_one())


def test_an_oversized_body_is_413_declared_or_streamed(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    before = stored(ledger)
    big = b"x" * (2 << 20)
    declared = httpx.post(f"{receiver.url}/webhooks/meta", content=big, timeout=30)
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for _ in range(64):
            yield b"y" * 65536

    streamed = httpx.post(f"{receiver.url}/webhooks/sandbox", content=chunks(), timeout=30)
    assert streamed.status_code == 413
    # A normal report still goes through afterwards.
    ok = post(f"{receiver.url}/webhooks/meta", signed("meta", SECRETS, REPORTS["meta"]()))
    assert ok.status_code == 200
    assert stored(ledger) == before + 1  # the report only: the refused bodies wrote nothing


def test_the_cap_is_a_setting(ledger: Ledger) -> None:
    body = REPORTS["meta"]()
    with WebhookServer(ledger, SECRETS, max_body_bytes=len(body) - 1) as small:
        assert post(f"{small.url}/webhooks/meta", signed("meta", SECRETS, body)).status_code == 413
    with WebhookServer(ledger, SECRETS, max_body_bytes=len(body)) as exact:
        assert post(f"{exact.url}/webhooks/meta", signed("meta", SECRETS, body)).status_code == 200


SHAPES = [
    b"[]",
    b"5",
    b'"text"',
    b"null",
    b'{"entry": 5}',
    b'{"entry": [{"changes": [{"value": {"statuses": [{"id": "x", "status": "delivered", '
    b'"timestamp": "1e400"}]}}]}]}',
    b'{"entry": [{"changes": [{"value": {"statuses": [{"id": "x", "status": "delivered", '
    b'"timestamp": 99999999999999999999}]}}]}]}',
    b'{"results": [{"messageId": 5, "status": []}]}',
    b'{"results": "x"}',
    b'{"message_uuid": [], "status": {}, "timestamp": 12}',
    b'{"statuses": [{"id": {}, "status": 3, "timestamp": []}]}',
    b'{"events": 7}',
    b"\xff\xfe",
]


@pytest.mark.parametrize("provider", JSON_PROVIDERS)
def test_a_signed_body_of_the_wrong_shape_is_400_never_500(
    ledger: Ledger, receiver: WebhookServer, provider: str
) -> None:
    before = stored(ledger)
    for body in SHAPES:
        answer = post(f"{receiver.url}/webhooks/{provider}", signed(provider, SECRETS, body))
        assert answer.status_code in (200, 400), (provider, body, answer.text)
    assert stored(ledger) == before


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "entry",
                    "changes",
                    "value",
                    "statuses",
                    "id",
                    "status",
                    "timestamp",
                    "errors",
                    "code",
                    "results",
                    "messageId",
                    "doneAt",
                    "seenAt",
                    "error",
                    "groupName",
                    "name",
                    "message_uuid",
                    "client_ref",
                    "events",
                    "error_code",
                    "callbackData",
                    "biz_opaque_callback_data",
                    "recipient_id",
                    "field",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(provider=st.sampled_from(JSON_PROVIDERS), value=json_values)
def test_no_signed_body_makes_the_receiver_fail(
    receiver: WebhookServer, provider: str, value: object
) -> None:
    body = json.dumps(value).encode()
    answer = post(f"{receiver.url}/webhooks/{provider}", signed(provider, SECRETS, body))
    assert answer.status_code in (200, 400), (provider, body, answer.text)


@settings(max_examples=100, deadline=None)
@given(
    provider=st.sampled_from(("meta", "twilio", "infobip", "vonage", "line", "sandbox")),
    # Any printable text, non-ASCII included (control characters never reach the app: the
    # HTTP layer refuses them with 400).
    header=st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=40
    )
    .map(str.strip)
    .filter(bool),
)
def test_no_signature_header_makes_the_receiver_fail(
    receiver: WebhookServer, provider: str, header: str
) -> None:
    name = {
        "meta": "X-Hub-Signature-256",
        "twilio": "X-Twilio-Signature",
        "infobip": "Authorization",
        "vonage": "Authorization",
        "line": "X-Line-Signature",
        "sandbox": "X-Sandbox-Signature",
    }[provider]
    value = header.encode("utf-8")  # sent as raw header bytes
    answer = httpx.post(
        f"{receiver.url}/webhooks/{provider}",
        content=b"{}",
        headers=[(name.encode(), value)],
        timeout=10,
    )
    assert answer.status_code == 401, (provider, header, answer.text)


def test_a_non_ascii_verify_token_is_refused_not_a_500(receiver: WebhookServer) -> None:
    answer = httpx.get(
        f"{receiver.url}/webhooks/meta",
        params={"hub.mode": "subscribe", "hub.verify_token": "vérifié", "hub.challenge": "1"},
        timeout=10,
    )
    assert answer.status_code == 403


def vonage_post(claims: dict, body: bytes) -> tuple[bytes, dict[str, str]]:
    token = jwt.encode(claims, SECRETS.secret_for("vonage"), algorithm="HS256")
    return body, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def test_a_vonage_token_without_the_body_hash_or_issued_long_ago_is_refused(
    ledger: Ledger, receiver: WebhookServer
) -> None:
    body = REPORTS["vonage"]()
    url = f"{receiver.url}/webhooks/vonage"
    no_hash = vonage_post({"iat": int(time.time()), "iss": "Vonage"}, body)
    assert httpx.post(url, content=no_hash[0], headers=no_hash[1]).status_code == 401
    other = body.replace(b"delivered", b"rejected")
    assert httpx.post(url, content=other, headers=no_hash[1]).status_code == 401
    stale = vonage_post(
        {"iat": 1577836800, "payload_hash": sig.hashlib.sha256(body).hexdigest()}, body
    )
    assert httpx.post(url, content=stale[0], headers=stale[1]).status_code == 401
    fresh = signed("vonage", SECRETS, body)
    assert post(url, fresh).status_code == 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("flag", [None, "--no-access-log"])
def test_the_access_log_keeps_no_query_string(tmp_path: Path, flag: str | None) -> None:
    """The access log names each request without its query string; `--no-access-log` (the
    demo's receiver: nobody reads its lines, which cost CPU its sends share) leaves it out."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDP_", "DAGSTER_"))}
    env |= {
        "CDP_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.sqlite'}",
        "CDP_META_VERIFY_TOKEN": "the-verify-token-123",
        "DAGSTER_HOME": str(tmp_path),
    }
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "cdp-activation"),
            "webhooks",
            "serve",
            "--port",
            str(port),
            *([flag] if flag else []),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        answer = httpx.get(
            f"http://127.0.0.1:{port}/webhooks/meta",
            params={
                "hub.mode": "subscribe",
                "hub.verify_token": "the-verify-token-123",
                "hub.challenge": "42",
            },
        )
        assert answer.text == "42"
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=30)
    assert ("GET /webhooks/meta" in output) is (flag is None), output
    assert "status webhooks on" in output  # the server spoke: the log was read
    assert "the-verify-token-123" not in output
    assert "hub." not in output


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    params=st.dictionaries(
        st.sampled_from(
            ["MessageSid", "MessageStatus", "ErrorCode", "To", "From", "SmsSid", "Price", "x"]
        ),
        st.text(max_size=30),
        max_size=6,
    ),
    ref=st.one_of(st.none(), st.text(max_size=20)),
)
def test_no_signed_twilio_form_makes_the_receiver_fail(
    receiver: WebhookServer, params: dict[str, str], ref: str | None
) -> None:
    from urllib.parse import urlencode

    url = f"{receiver.url}/webhooks/twilio"
    if ref is not None:
        url += "?" + urlencode({"ref": ref})
    body = urlencode(params).encode()
    request = signed("twilio", SECRETS, body, url=url)
    answer = httpx.post(url, content=request.body, headers=request.headers, timeout=10)
    assert answer.status_code in (200, 400), (params, ref, answer.text)


@pytest.mark.parametrize("provider", ["meta", "twilio", "infobip", "vonage"])
def test_a_stored_report_keeps_no_phone_number(ledger: Ledger, provider: str) -> None:
    """Reports are kept for audits (status_events.payload); who the customer is, the
    ledger's row already says: the number is not stored again."""
    with WebhookServer(ledger, SECRETS) as server:
        url = f"{server.url}/webhooks/{provider}"
        body = REPORTS[provider]().replace(b"m-" + provider.encode(), b"pii-" + provider.encode())
        assert post(url, signed(provider, SECRETS, body, url=url)).status_code == 200
    with ledger.engine.connect() as con:
        payloads = [
            row[0]
            for row in con.exec_driver_sql(
                "SELECT payload FROM status_events WHERE provider_message_id = ?",
                (f"pii-{provider}",),
            )
        ]
    assert payloads, "the report was stored"
    for payload in payloads:
        assert "7911123456" not in payload, payload
        assert "7700900001" not in payload, payload


def stored_meta_report(ledger: Ledger, status: dict[str, Any]) -> str:
    """Post one Meta status webhook carrying `status`, signed, to a receiver on `ledger`;
    return the copy of the report the ledger stored (`status_events.payload`)."""
    value = {"messaging_product": "whatsapp", "metadata": {}, "statuses": [status]}
    body = json.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}],
        },
        ensure_ascii=False,
    ).encode()
    with WebhookServer(ledger, SECRETS) as server:
        url = f"{server.url}/webhooks/meta"
        assert post(url, signed("meta", SECRETS, body, url=url)).status_code == 200
    with ledger.engine.connect() as con:
        (payload,) = con.exec_driver_sql(
            "SELECT payload FROM status_events WHERE provider_message_id = ?", (status["id"],)
        ).one()
    return str(payload)


def test_a_stored_meta_report_keeps_its_time_and_masks_a_number_in_its_text(
    ledger: Ledger,
) -> None:
    """Meta's `timestamp` is ten digits of Unix time: the audit copy kept it masked as if it
    were a phone number ("+1*******35"). A number written in an error's text still is."""
    status = {
        "id": "wamid.time-kept",
        "status": "failed",
        "timestamp": "1796546835",
        "recipient_id": "447911123456",
        "errors": [{"code": 131026, "title": "Undeliverable to +44 7911 123456 (447911123456)"}],
    }
    payload = stored_meta_report(ledger, status)
    stored = json.loads(payload)
    assert stored["timestamp"] == "1796546835"
    assert "recipient_id" not in stored
    assert "7911123456" not in payload and "7911 123456" not in payload, payload
    assert stored["errors"][0]["code"] == 131026


def test_a_report_with_numbers_beyond_64_bits_is_stored_whole(ledger: Ledger) -> None:
    """The receiver reads and stores reports with orjson, which takes no integer beyond 64
    bits: such a report (a provider's own big id, say) is read and kept as the standard
    library reads it, not refused as malformed."""
    status = {
        "id": "wamid.big-number",
        "status": "delivered",
        "timestamp": "1796546835",
        "conversation": {"id": "c1", "sequence": 2**70 + 1, "non_ascii": "Zoë ✓", "rate": 0.5},
    }
    assert json.loads(stored_meta_report(ledger, status))["conversation"] == status["conversation"]


def test_refusals_the_ledger_could_not_take_are_counted_once_it_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Forged webhooks keep being refused (401) while the ledger cannot count them, and the
    counts it could not take are added by the next write that succeeds: none is lost for the
    refusals alert."""
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(f"sqlite:///{path}")
    began = datetime.now(UTC)
    try:
        with WebhookServer(ledger, SECRETS) as server:
            with ledger.engine.begin() as con:  # the count's table is gone: writes fail
                con.exec_driver_sql("DROP TABLE webhook_refusals")
            forged = {"MessageSid": "SM1", "MessageStatus": "delivered"}
            for _ in range(3):
                assert httpx.post(f"{server.url}/webhooks/twilio", data=forged).status_code == 401
            deadline = time.monotonic() + 10
            while "could not count" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "could not count" in caplog.text  # the write failed while the table was gone
            ledger.migrate()  # the table is back
            assert httpx.post(f"{server.url}/webhooks/twilio", data=forged).status_code == 401
            while ledger.refusals_since(began) != {"twilio": 4} and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ledger.refusals_since(began) == {"twilio": 4}
    finally:
        ledger.dispose()
