"""`make_client` (aiohttp transport) against real sockets on 127.0.0.1, next to plain httpx.

Every scenario runs twice, once per client, with the same expectations: the connectors must not
be able to tell the transports apart. What matters most is the transport-error classification,
because it decides between a safe resend (RETRY) and "may have been delivered" (UNKNOWN): a
mistake there sends a customer the same message twice. The sandbox gives the provider answers;
a small raw-socket server gives the misbehaviours no real provider does on demand (silence,
hang-ups, resets, truncated bodies, canned 429s).
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import gzip
import socket
import socketserver
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest

from cdp_activation.connectors import (
    MetaWhatsAppConnector,
    TwilioConnector,
)
from cdp_activation.connectors.base import (
    Connector,
    CredentialsError,
    OutboundMessage,
    Outcome,
    SendResult,
    TemplateRef,
)
from cdp_activation.delivery.transport import AiohttpTransport, make_client
from cdp_activation.sandbox import SandboxServer
from cdp_activation.settings import Settings
from test_connectors import meta, twilio  # the same builders as the connector tests

pytestmark = pytest.mark.integration

UK = "+447911123456"
NOT_ON_WHATSAPP = "+447911123413"  # the sandbox's "not on WhatsApp" rule: digits end in 13
WINBACK = TemplateRef("winback_offer", "en", ("Ana", "45", "COMEBACK20"))
BAD_TOKEN = "not-the-right-token-0123456789"

ClientFactory = Callable[[float, int], httpx.AsyncClient]


def _plain_httpx(timeout: float, max_in_flight: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=max_in_flight))


def _aiohttp(timeout: float, max_in_flight: int) -> httpx.AsyncClient:
    return make_client(timeout=timeout, max_in_flight=max_in_flight)


@pytest.fixture(params=[_plain_httpx, _aiohttp], ids=["httpx", "aiohttp"])
def new_client(request: pytest.FixtureRequest) -> ClientFactory:
    """Builds a client of the parametrised kind: plain httpx, or `make_client`."""
    return request.param


def send(
    new_client: ClientFactory, connector: Connector, message: OutboundMessage, timeout: float = 5.0
) -> SendResult:
    """One message through `send_batch` with a fresh client, as the delivery engine would."""

    async def go() -> list[SendResult]:
        async with new_client(timeout, 8) as client:
            return await connector.send_batch(client, [message])

    [result] = asyncio.run(go())
    assert result.key == message.key
    return result


def wa(to: str = UK, template: TemplateRef | None = WINBACK) -> OutboundMessage:
    return OutboundMessage(key="k1", to=to, channel="whatsapp", template=template)


def sms(to: str = UK, body: str = "Hi Ana, we miss you! 50% off, ça va?") -> OutboundMessage:
    return OutboundMessage(key="k1", to=to, channel="sms", body=body)


# --- provider answers (sandbox) ---------------------------------------------------------------


def test_meta_template_is_sent_and_recorded(
    new_client: ClientFactory, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    result = send(new_client, meta(sandbox_settings), wa())

    assert result.outcome is Outcome.SENT
    assert result.provider_message_id and result.provider_message_id.startswith("wamid.")
    [recorded] = sandbox.messages()
    assert recorded.provider_message_id == result.provider_message_id
    assert (recorded.to, recorded.template_name, recorded.parameters) == (
        UK,
        "winback_offer",
        ("Ana", "45", "COMEBACK20"),
    )


def test_twilio_form_with_basic_auth_is_sent(
    new_client: ClientFactory, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    message = sms()
    result = send(new_client, twilio(sandbox_settings), message)

    assert result.outcome is Outcome.SENT
    assert result.provider_message_id and result.provider_message_id.startswith("SM")
    [recorded] = sandbox.messages()
    assert (recorded.provider, recorded.to, recorded.body) == ("twilio", UK, message.body)


def test_not_on_whatsapp_fails_with_the_meta_code(
    new_client: ClientFactory, sandbox: SandboxServer, sandbox_settings: Settings
) -> None:
    result = send(new_client, meta(sandbox_settings), wa(to=NOT_ON_WHATSAPP))

    assert result.outcome is Outcome.FAILED
    assert result.error_code == "131026"
    assert NOT_ON_WHATSAPP not in (result.error_message or "")
    assert sandbox.messages() == []


@pytest.mark.parametrize(
    ("build", "message"), [(meta, wa()), (twilio, sms())], ids=["meta", "twilio"]
)
def test_bad_token_stops_with_credentials_error(
    new_client: ClientFactory,
    build: Callable[[Settings, str], Connector],
    message: OutboundMessage,
    sandbox: SandboxServer,
    sandbox_settings: Settings,
) -> None:
    with pytest.raises(CredentialsError) as raised:
        send(new_client, build(sandbox_settings, BAD_TOKEN), message)
    assert BAD_TOKEN not in str(raised.value)
    assert sandbox.messages() == []


def test_template_listing_uses_query_params_and_paging(
    new_client: ClientFactory, sandbox_settings: Settings
) -> None:
    connector = meta(sandbox_settings)

    async def go() -> list[tuple[str, str, str]]:
        async with new_client(5.0, 8) as client:
            templates = await connector.fetch_templates(client, page_size=2)  # several pages
            return [(t.name, t.language, t.status) for t in templates]

    listed = asyncio.run(go())
    assert len(listed) > 2
    assert len(set(listed)) == len(listed), "each page requested once, with the right cursor"
    assert ("winback_offer", "en", "APPROVED") in listed


# --- misbehaving servers ----------------------------------------------------------------------


@dataclass
class RawServer:
    """A threaded TCP server that reads one HTTP request per connection, then does `action`.

    Actions: "close" (FIN after reading), "reset" (RST after reading), "silent" (hold the
    connection open, answer nothing) or raw response bytes to write before closing.
    """

    action: str | bytes
    requests: list[bytes] = field(default_factory=list)
    url: str = ""
    _server: socketserver.ThreadingTCPServer | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> RawServer:
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                outer.requests.append(read_request(sock))
                if outer.action == "silent":
                    outer._done.wait(10)  # returning would shut the socket down
                elif outer.action == "reset":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif isinstance(outer.action, bytes):
                    sock.sendall(outer.action)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._done.set()
        self._server.shutdown()
        self._server.server_close()


def read_request(sock: socket.socket) -> bytes:
    """The whole request: headers up to the blank line, then Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def connectors_at(url: str) -> list[tuple[str, Connector, OutboundMessage]]:
    return [
        ("meta", MetaWhatsAppConnector(f"{url}/meta", "v23.0", "1", "2", "tok"), wa()),
        ("twilio", TwilioConnector(f"{url}/twilio", "AC" + "0" * 32, "tok", "+15005550006"), sms()),
    ]


@pytest.fixture
def closed_port() -> int:
    """A port that was free a moment ago and has nothing listening: connect is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_connection_refused_is_retry(new_client: ClientFactory, closed_port: int) -> None:
    for label, connector, message in connectors_at(f"http://127.0.0.1:{closed_port}"):
        result = send(new_client, connector, message)
        assert (result.outcome, result.error_code) == (Outcome.RETRY, "ConnectError"), label


def test_unresolvable_host_is_retry(new_client: ClientFactory) -> None:
    connector = MetaWhatsAppConnector("http://no-such-host.invalid/meta", "v23.0", "1", "2", "t")
    result = send(new_client, connector, wa())
    assert (result.outcome, result.error_code) == (Outcome.RETRY, "ConnectError")


def test_full_listen_backlog_is_connect_timeout_and_retry(new_client: ClientFactory) -> None:
    """SYNs to a listener whose accept queue is full are dropped: the connect never completes."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(address)
            connector = MetaWhatsAppConnector(
                f"http://127.0.0.1:{address[1]}/meta", "v23.0", "1", "2", "tok"
            )
            result = send(new_client, connector, wa(), timeout=0.3)
        finally:
            for filler in fillers:
                filler.close()
    assert (result.outcome, result.error_code) == (Outcome.RETRY, "ConnectTimeout")


def test_no_answer_within_timeout_is_unknown(new_client: ClientFactory) -> None:
    with RawServer("silent") as server:
        for label, connector, message in connectors_at(server.url):
            result = send(new_client, connector, message, timeout=0.3)
            assert (result.outcome, result.error_code) == (Outcome.UNKNOWN, "ReadTimeout"), label
        assert len(server.requests) == 2, "the request was sent before the wait"


def test_hang_up_after_reading_the_request_is_unknown(new_client: ClientFactory) -> None:
    with RawServer("close") as server:
        for label, connector, message in connectors_at(server.url):
            result = send(new_client, connector, message)
            assert result.outcome is Outcome.UNKNOWN, label
            assert result.error_code == "RemoteProtocolError", label


def test_reset_after_reading_the_request_is_unknown(new_client: ClientFactory) -> None:
    with RawServer("reset") as server:
        for label, connector, message in connectors_at(server.url):
            result = send(new_client, connector, message)
            assert result.outcome is Outcome.UNKNOWN, label
            # httpcore reads ECONNRESET as ReadError, aiohttp as a disconnect: both UNKNOWN.
            assert result.error_code in ("ReadError", "RemoteProtocolError"), label


def test_truncated_body_is_unknown(new_client: ClientFactory) -> None:
    answer = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"me'
    with RawServer(answer) as server:
        for label, connector, message in connectors_at(server.url):
            result = send(new_client, connector, message)
            assert result.outcome is Outcome.UNKNOWN, label
            assert result.error_code == "RemoteProtocolError", label


def test_429_with_retry_after_is_retry_with_the_delay(new_client: ClientFactory) -> None:
    body = b'{"error": {"message": "(#130429) Rate limit hit", "code": 130429}}'
    answer = (
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
        b"Retry-After: 7\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with RawServer(answer) as server:
        [(_, connector, message), _] = connectors_at(server.url)
        result = send(new_client, connector, message)
    assert (result.outcome, result.error_code, result.retry_after) == (
        Outcome.RETRY,
        "130429",
        7.0,
    )


def test_a_gzipped_answer_is_read_the_same_by_either_path(new_client: ClientFactory) -> None:
    """aiohttp leaves bodies as sent; httpx decodes them, on its own path (Twilio, Basic auth)
    and on the one straight to the transport (Meta)."""
    body = gzip.compress(b'{"messages": [{"id": "wamid.GZ1"}], "sid": "SMgz1"}')
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with RawServer(answer) as server:
        sent = {
            label: send(new_client, connector, message)
            for label, connector, message in connectors_at(server.url)
        }
    assert (sent["meta"].outcome, sent["meta"].provider_message_id) == (Outcome.SENT, "wamid.GZ1")
    assert (sent["twilio"].outcome, sent["twilio"].provider_message_id) == (Outcome.SENT, "SMgz1")


def test_pool_timeout_is_retry(new_client: ClientFactory) -> None:
    """With every connection busy past the pool timeout, the next request never leaves."""
    with RawServer("silent") as server:
        [(_, connector, message), _] = connectors_at(server.url)

        async def go() -> list[SendResult]:
            timeout = httpx.Timeout(1.0, pool=0.1)
            async with new_client(1.0, 1) as client:
                client.timeout = timeout
                first = asyncio.create_task(connector.send_batch(client, [message]))
                await asyncio.sleep(0.2)  # the first request holds the only connection
                second = await connector.send_batch(client, [message])
                return [*await first, *second]

        first, second = asyncio.run(go())
    assert (first.outcome, first.error_code) == (Outcome.UNKNOWN, "ReadTimeout")
    assert (second.outcome, second.error_code) == (Outcome.RETRY, "PoolTimeout")
    assert len(server.requests) == 1


# --- the bytes on the wire --------------------------------------------------------------------


def _wire(connector: Connector, message: OutboundMessage) -> list[bytes]:
    """The raw requests plain httpx and `make_client` send for one message, in that order."""
    answer = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
    with RawServer(answer) as server:
        connector = type(connector)(  # type: ignore[call-arg]
            **{**_init_args(connector), "base_url": f"{server.url}/x"}
        )
        for new_client in (_plain_httpx, _aiohttp):
            send(new_client, connector, message)
    return server.requests


def _init_args(connector: Connector) -> dict[str, str]:
    if isinstance(connector, TwilioConnector):
        return {
            "base_url": connector.base_url,
            "account_sid": connector.account_sid,
            "auth_token": "s3cret",
            "from_number": connector.from_number,
        }
    assert isinstance(connector, MetaWhatsAppConnector)
    return {
        "base_url": connector.base_url,
        "api_version": connector.api_version,
        "phone_number_id": connector.phone_number_id,
        "waba_id": connector.waba_id,
        "access_token": "s3cret",
    }


def _parts(raw: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    request_line, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return request_line, headers, body


@pytest.mark.parametrize(
    ("build", "message"), [(meta, wa()), (twilio, sms())], ids=["meta-json", "twilio-form-auth"]
)
def test_requests_match_plain_httpx_on_the_wire(
    build: Callable[[Settings], Connector], message: OutboundMessage, sandbox_settings: Settings
) -> None:
    connector = build(sandbox_settings)
    by_httpx, by_aiohttp = _wire(connector, message)
    line_h, headers_h, body_h = _parts(by_httpx)
    line_a, headers_a, body_a = _parts(by_aiohttp)

    assert line_a == line_h
    assert body_a == body_h
    for name in (b"host", b"authorization", b"content-type", b"content-length", b"user-agent"):
        assert headers_a.get(name) == headers_h.get(name), name
    assert headers_a[b"authorization"].startswith(
        b"Basic " if isinstance(connector, TwilioConnector) else b"Bearer "
    )


# --- the requests the client builds ---------------------------------------------------------

_URLS = [
    "http://127.0.0.1:8080/v21.0/123/messages",
    httpx.URL("https://graph.example.com/v21.0/123/messages"),
    "https://api.example.com:8443/a%20b/c?x=1&y=%C3%A7a",
    "http://[::1]:9000/hook",
    "http://user:pw@example.com/hook",
]
_HEADERS: list[Any] = [
    None,
    {"Authorization": "Bearer s3cret", "Content-Type": "application/json"},
    {"accept": "application/json", "USER-AGENT": "cdp/1", "Idempotency-Key": "k-1"},
    [("X-Dup", "1"), ("x-dup", "2"), ("Host", "other.example.com")],
    {"Content-Length": "999", "Content-Type": "text/plain; charset=utf-8"},
    {"Transfer-Encoding": "chunked"},
    [(b"X-Raw", "caf\u00e9".encode())],
    httpx.Headers({"Accept-Encoding": "identity"}),
]
_BODIES: list[dict[str, Any]] = [
    {"json": {"to": "+447911123456", "text": 'ça va? \u2028 \u0007 "q" 😀', "n": [1, 2.5, None]}},
    {"json": [{"a": True}, {"b": False}]},
    {"json": 0},
    {"json": ""},
    {"content": b'{"raw":"bytes"}'},
    {"content": b"x", "json": {"ignored": 1}},  # httpx sends the content, as here
]


@pytest.mark.parametrize("url", _URLS, ids=range(len(_URLS)))
@pytest.mark.parametrize("headers", _HEADERS, ids=range(len(_HEADERS)))
@pytest.mark.parametrize("body", _BODIES, ids=range(len(_BODIES)))
def test_built_requests_match_httpx_s_own(url: Any, headers: Any, body: dict[str, Any]) -> None:
    """The client's shorter way to a request with a body in memory builds exactly what
    httpx's `build_request` builds: method, URL, headers in the same order, body, timeouts."""
    client = make_client(timeout=7.0, max_in_flight=1)
    for method, timeout in (("POST", httpx.USE_CLIENT_DEFAULT), ("put", 3.0)):
        ours = client.build_request(method, url, headers=headers, timeout=timeout, **body)
        theirs = httpx.AsyncClient.build_request(
            client, method, url, headers=headers, timeout=timeout, **body
        )
        assert (ours.method, str(ours.url)) == (theirs.method, str(theirs.url))
        assert ours.headers.raw == theirs.headers.raw
        assert ours.content == theirs.content
        assert ours.extensions == theirs.extensions


def test_built_requests_match_httpx_s_own_with_client_headers_and_base_url() -> None:
    client = make_client(timeout=7.0, max_in_flight=1)
    client.headers = {"User-Agent": "cdp-activation", "X-Team": "crm", "Content-Type": "a/b"}
    client.base_url = "https://api.example.com/v2"
    for url in ("messages", "/messages", "https://elsewhere.example.com/m"):
        for headers in (None, {"x-team": "growth"}):
            ours = client.build_request("POST", url, json={"a": 1}, headers=headers)
            theirs = httpx.AsyncClient.build_request(
                client, "POST", url, json={"a": 1}, headers=headers
            )
            assert ours.url == theirs.url
            assert ours.headers.raw == theirs.headers.raw
            assert ours.content == theirs.content


def test_json_beside_form_data_or_files_is_left_to_httpx() -> None:
    """httpx sends the form or the files and ignores `json=`: so does this client, whatever
    the JSON holds."""
    client = make_client(timeout=7.0, max_in_flight=1)
    unencodable = {"when": datetime.date(2026, 12, 6), "score": float("nan")}
    for extra in ({"data": {"a": "1"}}, {"files": {"f": b"x"}}):
        ours = client.build_request("POST", "http://127.0.0.1/x", json=unencodable, **extra)
        theirs = httpx.AsyncClient.build_request(
            client, "POST", "http://127.0.0.1/x", json=unencodable, **extra
        )
        kind = [r.headers["content-type"].split(";")[0] for r in (ours, theirs)]
        assert kind[0] == kind[1] != "application/json"
        assert len(ours.read()) == len(theirs.read())  # a multipart boundary is random


def test_a_json_body_httpx_refuses_is_refused_the_same() -> None:
    client = make_client(timeout=7.0, max_in_flight=1)
    for bad in ({"score": float("nan")}, {"score": float("inf")}, {1j: "key"}, {"d": object()}):
        with pytest.raises(Exception) as ours:
            client.build_request("POST", "http://127.0.0.1/x", json=bad)
        with pytest.raises(Exception) as theirs:
            httpx.AsyncClient.build_request(client, "POST", "http://127.0.0.1/x", json=bad)
        assert type(ours.value) is type(theirs.value)


# --- lifecycle --------------------------------------------------------------------------------


def test_closing_the_client_closes_the_aiohttp_session(sandbox: SandboxServer) -> None:
    async def go() -> AiohttpTransport:
        client = make_client(timeout=5.0, max_in_flight=4)
        transport = client._transport
        assert isinstance(transport, AiohttpTransport)
        async with client:
            response = await client.get(f"{sandbox.url}/_sandbox/health")
            assert response.status_code == 200
            assert response.elapsed.total_seconds() >= 0
            assert transport.session is not None and not transport.session.closed
            session = transport.session
        assert session.closed
        with pytest.raises(RuntimeError):
            await client.get(f"{sandbox.url}/_sandbox/health")
        return transport

    assert asyncio.run(go()).session is None


@pytest.mark.parametrize(
    ("builder", "message", "through_httpx"),
    [(meta, wa(), 0), (twilio, sms(), 200)],
    ids=["straight to the transport", "through httpx's auth flow"],
)
def test_answers_read_whole_leave_nothing_for_the_garbage_collector(
    sandbox: SandboxServer,
    sandbox_settings: Settings,
    builder: Callable[[Settings], Connector],
    message: OutboundMessage,
    through_httpx: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx ties a response's stream to the response, a reference cycle only the collector
    frees, with the request, URL and headers on it: a dozen objects or more a message before
    this client cut it, whichever way a request goes (straight to the transport, or, with
    Twilio's Basic auth, through httpx's own machinery). The answers still read the same.
    (The sandbox serves from this process: its server's own garbage is not counted.)"""
    connector = builder(sandbox_settings)
    by_httpx = 0
    httpx_send = httpx.AsyncClient._send_handling_auth

    async def counted(*args: Any, **kwargs: Any) -> httpx.Response:
        nonlocal by_httpx
        by_httpx += 1
        return await httpx_send(*args, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "_send_handling_auth", counted)
    messages = [replace(message, key=f"k{i}") for i in range(200)]

    async def go() -> tuple[list[SendResult], httpx.Response, Counter[str]]:
        async with make_client(timeout=5.0, max_in_flight=8) as client:
            await connector.send_batch(client, messages[:1])  # the pool and its connection
            nonlocal by_httpx
            by_httpx = 0
            gc.collect()
            gc.disable()
            try:
                answers = await asyncio.gather(
                    *(connector.send_batch(client, [m]) for m in messages)
                )
                health = await client.get(f"{sandbox.url}/_sandbox/health")
                gc.set_debug(gc.DEBUG_SAVEALL)  # what a pass frees, kept in gc.garbage
                gc.collect()
                found = Counter(type(o).__qualname__ for o in gc.garbage if _of_httpx(o))
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
        return [r for batch in answers for r in batch], health, found

    results, health, garbage = asyncio.run(go())

    assert [r.outcome for r in results] == [Outcome.SENT] * 200
    assert by_httpx == through_httpx
    assert not garbage, f"httpx objects in reference cycles after 200 messages: {garbage}"
    assert health.status_code == 200 and health.json() and health.content
    assert health.elapsed.total_seconds() > 0 and health.is_closed


def _of_httpx(thing: object) -> bool:
    return type(thing).__module__.split(".")[0] == "httpx"


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        make_client(timeout=1.0, max_in_flight=0)
