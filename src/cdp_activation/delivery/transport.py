"""The HTTP client the delivery engine sends with: httpx's API on an aiohttp transport.

Why not plain `httpx.AsyncClient`: measured here (bench/results_delivery.md), its httpcore
transport costs about 1 ms of CPU a request and stops scaling past a handful of requests in
flight, so a 100 ms provider caps a run at ~80 requests/s. aiohttp's HTTP/1.1 client (C parser,
one connection pool per session) does the same work for a fraction of the CPU. The connectors
keep speaking httpx (`client.post`, `httpx.Response`, `httpx.TransportError`), so only this
module knows about aiohttp.

Why not the `httpx-aiohttp` package: version 0.2.0 maps `ServerDisconnectedError` and every
other `ClientConnectionError` to `httpx.ConnectTimeout`, which the connectors read as "the
request never left, safe to resend". A provider that took the request and then dropped the
connection would be sent the message twice. Here every aiohttp error is mapped by *when* it can
happen:

- before any byte of the request was written (DNS, refused, TLS handshake, connect timeout, no
  free connection within the pool timeout): `ConnectError` / `ConnectTimeout` / `PoolTimeout`,
  which the connectors retry;
- after the request may have reached the provider (read timeout, disconnect, reset, garbled or
  truncated answer): `ReadTimeout` / `RemoteProtocolError` / `ReadError`, which the connectors
  record as UNKNOWN.

Differences from httpcore worth knowing: aiohttp has no write timeout (the request is small and
buffered by the kernel; a stalled write surfaces as a read timeout), environment proxies are not
honoured (as with any httpx client given an explicit transport), and responses are read whole
before they are returned (the connectors never stream).
"""

from __future__ import annotations

import asyncio
import json as json_module
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import aiohttp
import httpx
import yarl

# Close a pooled connection after 4 s idle: before the shortest common server keep-alive
# (uvicorn's 5 s) closes it under us, which would make a POST on it fail as UNKNOWN.
_KEEPALIVE_EXPIRY_S = 4.0

# Most specific first: the first class the exception is an instance of decides. Timeouts come
# before their `ClientConnectorError`/`ClientOSError` bases, disconnects before `ClientOSError`.
_ERROR_MAP: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    # Never sent: no connection was made.
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),  # refused, DNS, TLS, proxy connect
    (aiohttp.ServerFingerprintMismatch, httpx.ConnectError),  # TLS pinning, before sending
    # Possibly received by the provider.
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),  # SocketTimeoutError: no answer in time
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),  # truncated / bad body
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),  # unparseable status line/headers
    (aiohttp.ClientOSError, httpx.ReadError),  # reset / broken pipe on an open connection
    (aiohttp.ClientConnectionError, httpx.ReadError),
    # Configuration: a URL aiohttp cannot send to.
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.NonHttpUrlClientError, httpx.UnsupportedProtocol),
    (aiohttp.ClientError, httpx.TransportError),  # unknown: UNKNOWN, never a blind resend
)


def httpx_error(exc: BaseException, request: httpx.Request) -> httpx.TransportError | None:
    """The httpx exception equivalent to an aiohttp one, or None when it is not aiohttp's."""
    for source, target in _ERROR_MAP:
        if isinstance(exc, source):
            message = str(exc) or type(exc).__name__
            return target(message, request=request)
    return None


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An `httpx.AsyncBaseTransport` sending over one pooled `aiohttp.ClientSession`.

    At most `max_in_flight` requests are on the wire at once; a request waits for a slot up to
    httpx's `pool` timeout and then fails with `httpx.PoolTimeout`. The slot count equals the
    connector's connection limit, so aiohttp itself never queues a request: the only pool wait
    is ours, and a timeout inside aiohttp's connect is always a real connect timeout.

    The session is created on first use, inside the running event loop, because aiohttp binds
    a session to the loop it was created in and `make_client` may be called outside one.
    """

    def __init__(self, *, max_in_flight: int, keepalive_expiry: float = _KEEPALIVE_EXPIRY_S):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}
        self._closed = False

    def _open(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        if self._closed:
            raise RuntimeError("the HTTP client has been closed")
        if self._session is None or self._slots is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_in_flight,
                limit_per_host=0,
                keepalive_timeout=self.keepalive_expiry,
                # httpx's certificate store (certifi) so TLS verifies the same with either client.
                ssl=httpx.create_ssl_context(),
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # httpx owns cookies, redirects, decompression and proxies; aiohttp doing them
                # too would send cookies twice or decode a body httpx then decodes again.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                trust_env=False,
                timeout=aiohttp.ClientTimeout(total=None),
            )
            self._slots = asyncio.Semaphore(self.max_in_flight)
        return self._session, self._slots

    def _timeout(self, timeouts: Mapping[str, float | None]) -> aiohttp.ClientTimeout:
        """aiohttp's timeout for httpx's connect/read, cached: a client uses one or two."""
        key = (timeouts.get("connect"), timeouts.get("read"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            connect, read = key
            # `connect` covers DNS + TCP + TLS like httpcore's; no pool wait happens inside it.
            timeout = aiohttp.ClientTimeout(
                total=None, connect=connect, sock_connect=connect, sock_read=read
            )
            self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request and return the whole response, with errors mapped onto httpx's."""
        if request.url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol '{request.url.scheme}://'.",
                request=request,
            )
        session, slots = self._open()
        timeouts: Mapping[str, float | None] = request.extensions.get("timeout", {})
        if slots.locked():
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout(
                    f"no free connection within {timeouts.get('pool')} s "
                    f"({self.max_in_flight} requests already in flight)",
                    request=request,
                ) from None
        else:
            await slots.acquire()
        try:
            body = await request.aread() or None  # the connectors never stream a body
            try:
                async with session.request(
                    request.method,
                    yarl.URL(str(request.url), encoded=True),  # httpx already percent-encoded it
                    headers=request.headers.multi_items(),
                    data=body,
                    allow_redirects=False,
                    timeout=self._timeout(timeouts),
                ) as answer:
                    content = await answer.read()
                    status, raw_headers, reason = answer.status, answer.raw_headers, answer.reason
            except aiohttp.ClientError as exc:
                mapped = httpx_error(exc, request)
                if mapped is None:  # pragma: no cover - every ClientError is in the map
                    raise
                raise mapped from exc
        finally:
            slots.release()
        extensions: dict[str, object] = {"http_version": b"HTTP/1.1"}
        if reason:
            extensions["reason_phrase"] = reason.encode("ascii", "replace")
        return httpx.Response(
            status,
            headers=list(raw_headers),
            stream=httpx.ByteStream(content),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        """Close the aiohttp session and its connections (called by `AsyncClient.aclose`)."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """The aiohttp session once a request has been made (for tests and diagnostics)."""
        return self._session


# The headers a body in memory brings, as httpx adds them (None: the body's length).
_BodyHeaders = tuple[tuple[bytes, bytes | None], ...]
_JSON_HEADERS: _BodyHeaders = ((b"Content-Length", None), (b"Content-Type", b"application/json"))
_BYTES_HEADERS: _BodyHeaders = ((b"Content-Length", None),)


def _json_body(value: Any) -> bytes:
    """A JSON request body exactly as httpx (0.28 and later) encodes `json=`: compact, UTF-8,
    and NaN or Infinity refused (`ValueError`)."""
    return json_module.dumps(
        value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing. Provider APIs authenticate with tokens, never cookies,
    and httpx's cookie extraction (the standard library's cookiejar) cost ~100 µs a response,
    a fifth of a message's whole cost at 256 in flight (bench/results_throughput.md)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class _DeliveryClient(httpx.AsyncClient):
    """`httpx.AsyncClient` that hands a plain request straight to the aiohttp transport.

    A request with no auth flow, no redirect to follow, no event hook and no streamed answer
    (every connector's but Twilio's and Vonage's, which sign with Basic auth) goes from `send`
    to the transport and back: what httpx adds on its way (an auth flow that yields the request as
    it is, a redirect loop that returns at once, and a stream bound to the response to time
    and close it) was ~17% of the engine's CPU samples at batch 1 (py-spy), now ~7%: 548 ->
    505 µs of CPU a message, medians of five alternated 10,000-message runs of
    `bench.throughput`'s engine. The bound stream is also a reference cycle that only the
    garbage collector frees, with the request, headers and URL on it. The answer is the same:
    the transport's, read whole, with its request, the client's timeouts, and `elapsed`.

    Any other request takes httpx's own path; its answer, read whole, drops that cycle."""

    def __init__(self, *, timeout: float, transport: AiohttpTransport) -> None:
        super().__init__(timeout=timeout, transport=transport)
        self._aiohttp = transport

    def build_request(  # httpx's own signature, keyword for keyword
        self,
        method: str,
        url: httpx.URL | str,
        *,
        content: Any = None,
        data: Any = None,
        files: Any = None,
        json: Any = None,
        params: Any = None,
        headers: Any = None,
        cookies: Any = None,
        timeout: Any = httpx.USE_CLIENT_DEFAULT,
        extensions: Any = None,
    ) -> httpx.Request:
        """httpx's request, made with fewer steps for a body in memory (JSON or bytes).

        httpx builds its headers three times over (the client's merged with the call's, the
        request's own copy, then again with `Host` and the body's headers), each time
        normalising every name and value in Python: with the JSON encoding, ~21% of the
        engine's CPU samples at batch 1 (py-spy). Here the merge is done once on raw bytes,
        to the same result: the same headers in the same order, the same body, the same
        timeouts (`test_built_requests_match_httpx_s_own`). Anything else (form data, files,
        query parameters, cookies, a streamed body, extensions) is httpx's own."""
        in_memory = (content is None and json is not None) or (
            isinstance(content, bytes) and content
        )
        if (
            not in_memory
            or data is not None
            or files is not None
            or params is not None
            or cookies is not None
            or extensions is not None
            or self.params
            or self.cookies
        ):
            return super().build_request(
                method,
                url,
                content=content,
                data=data,
                files=files,
                json=json,
                params=params,
                headers=headers,
                cookies=cookies,
                timeout=timeout,
                extensions=extensions,
            )
        if content is None:
            body, defaults = _json_body(json), _JSON_HEADERS
        else:
            body, defaults = content, _BYTES_HEADERS
        target = self._merge_url(url)
        # The client's headers, less those the call names again (any case), then the call's.
        given = httpx.Headers(headers).raw
        named = {name.lower() for name, _ in given}
        raw = [(name, value) for name, value in self.headers.raw if name.lower() not in named]
        raw += given
        named.update(name.lower() for name, _ in raw)
        for name, value in defaults:  # the body's own headers, unless the call set them
            if name.lower() not in named:
                raw.append((name, str(len(body)).encode() if value is None else value))
        if b"host" not in named and target.host:
            raw.insert(0, (b"Host", target.netloc))
        chosen = self.timeout if timeout is httpx.USE_CLIENT_DEFAULT else httpx.Timeout(timeout)
        request = httpx.Request(
            method,
            target,
            headers=raw,
            stream=httpx.ByteStream(body),
            extensions={"timeout": chosen.as_dict()},
        )
        request.read()  # as httpx does for a body in memory: `request.content` is there
        return request

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        default = httpx.USE_CLIENT_DEFAULT
        redirects = self.follow_redirects if follow_redirects is default else follow_redirects
        plain = (
            not stream
            and not redirects
            and auth is default
            and self.auth is None
            and not any(self.event_hooks.values())
        )
        if not plain:
            response = await super().send(
                request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
            if not stream:
                response.stream = httpx.ByteStream(response.content)
            return response
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if "timeout" not in request.extensions:
            request.extensions = {**request.extensions, "timeout": self.timeout.as_dict()}
        began = time.perf_counter()
        response = await self._aiohttp.handle_async_request(request)
        response.request = request
        response.elapsed = timedelta(seconds=time.perf_counter() - began)
        response.read()  # the transport's answer is bytes in memory already
        return response


def make_client(*, timeout: float, max_in_flight: int) -> httpx.AsyncClient:
    """The `httpx.AsyncClient` to deliver with: aiohttp transport, `max_in_flight` connections,
    and no cookie jar (see `_NoCookies`).

    `timeout` applies to each phase (pool wait, connect, read) as in `httpx.AsyncClient`.
    Use it as `async with make_client(...) as client:` so closing it closes the aiohttp session.
    """
    client = _DeliveryClient(
        timeout=timeout, transport=AiohttpTransport(max_in_flight=max_in_flight)
    )
    client._cookies = _NoCookies()  # the `cookies` setter would copy it into a plain jar
    return client
