"""Upstream pools, and opening a request on a route with failover before the first byte.

One `gateway.upstream_http.Pool` of keep-alive connections per upstream per process, with explicit
connect and idle-read timeouts and no total timeout (a stream may last an hour). A semaphore of
`max_connections` slots bounds the connections and the wait for one: past `pool_timeout_s` the
request gets a 503 instead of queueing without end.

`open_on_route` tries the route's upstreams in order and returns once an upstream answered
with headers AND its first body bytes (or a complete non-2xx answer): until then nothing has
reached the client, so a connect error, a reset, a 5xx or a 429 may move on to the next
upstream. After that, never.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import upstream_http
from .config import Upstream
from .errors import GatewayError, ServiceUnavailable, UpstreamError, UpstreamTimeout

#: request headers never forwarded upstream: hop-by-hop, the client's own credentials, the
#: ones the pool computes itself or `headers_for` replaces, and Content-Encoding (the server
#: decoded the body)
DROP_REQUEST_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Authorization", "Content-Length",
        "Accept-Encoding", "Cookie", "Expect", "Api-Key", "X-Api-Key", "Content-Encoding",
        "X-Request-Id",
    )
)  # fmt: skip

#: response headers never forwarded to the client (hop-by-hop, the framing aiohttp's server
#: sets itself, and Content-Encoding: the pool decodes gzip and deflate bodies). The upstream's
#: Content-Length travels beside them (`ResponseHeaders.declared_length`): only an answer
#: relayed whole may declare it again (client_response decides)
DROP_RESPONSE_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Content-Length", "Content-Encoding",
        "Set-Cookie", "Date", "Server",
    )
)  # fmt: skip

MAX_ERROR_BODY = 64 * 1024
PATH_CACHE_ENTRIES = 256


@dataclass(slots=True)
class UpstreamClient:
    """One upstream: its pool, its key, and how to reach it."""

    name: str
    settings: Upstream
    base_url: URL
    pool: upstream_http.Pool
    slots: asyncio.Semaphore = field(init=False)
    #: upstream paths by path tail: nearly every request asks for one of a handful
    _paths: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.settings.max_connections)

    def target_for(self, tail: str, raw_query: str) -> str:
        """The request target (path and query) upstream for the `/v1/<tail>` a client asked for.

        `tail` is the decoded path (proxy.check_tail has refused dot segments and control
        characters); it is percent-encoded again here, so a `%3F` or `%23` the client sent
        stays part of the path instead of starting a query or fragment. `raw_query` is the
        client's query string exactly as it came.
        """
        path = self._paths.get(tail)
        if path is None:
            path = self.base_url.with_path(self.base_url.path.rstrip("/") + "/" + tail).raw_path
            if len(self._paths) < PATH_CACHE_ENTRIES:
                self._paths[tail] = path
        return f"{path}?{raw_query}" if raw_query else path

    def headers_for(
        self, client_headers: Mapping[str, str], request_id: str
    ) -> list[tuple[str, str]]:
        drop = DROP_REQUEST_HEADERS | _nominated(client_headers)
        headers = [(k, v) for k, v in client_headers.items() if k.lower() not in drop]
        headers.append(("Accept-Encoding", "identity"))
        headers.append(("X-Request-Id", request_id))
        if self.settings.api_key:
            headers.append(("Authorization", f"Bearer {self.settings.api_key}"))
        return headers

    async def aclose(self) -> None:
        await self.pool.aclose()


def _nominated(headers: Mapping[str, str]) -> frozenset[str]:
    """Headers the client declared hop-by-hop in `Connection` (RFC 9110 7.6.1): not forwarded."""
    listed = ",".join(v for k, v in headers.items() if k.lower() == "connection")
    return frozenset(name.strip().lower() for name in listed.split(",") if name.strip())


def create_client(name: str, settings: Upstream, base_url: str) -> UpstreamClient:
    # the pool keeps no cookies: it serves every team, and a Set-Cookie one answer carries
    # must never go out with another team's request
    pool = upstream_http.Pool(
        base_url,
        connect_timeout_s=settings.connect_timeout_s,
        idle_timeout_s=settings.read_idle_timeout_s,
    )
    return UpstreamClient(name=name, settings=settings, base_url=URL(base_url), pool=pool)


@dataclass(slots=True)
class Opened:
    """An upstream answer whose headers and first body bytes have arrived."""

    upstream: UpstreamClient
    response: upstream_http.Response
    first_chunk: bytes
    _slot_held: bool = True

    def release(self) -> None:
        """Return the connection to the pool (or close it if the body was not read to its end)."""
        self.response.release()
        if self._slot_held:
            self._slot_held = False
            self.upstream.slots.release()

    def close(self) -> None:
        """Drop the connection: the client went away or the stream failed mid-way."""
        self.response.close()
        if self._slot_held:
            self._slot_held = False
            self.upstream.slots.release()


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    tail: str
    query: str
    body: bytes
    headers: Mapping[str, str]
    request_id: str
    #: the body for upstreams with `usage: inject` (stream_options added), when it differs
    injected_body: bytes | None = None
    #: whether there is one (kept after `release`)
    injected: bool = field(init=False)

    def __post_init__(self) -> None:
        self.injected = self.injected_body is not None

    def body_for(self, client: UpstreamClient) -> bytes:
        if self.injected_body is not None and client.settings.usage == "inject":
            return self.injected_body
        return self.body

    def release(self) -> None:
        """An upstream answered: the body is never sent again, so it is not kept."""
        self.body, self.injected_body = b"", None


#: called for each failed attempt: (upstream name, reason label)
OnUpstreamError = Callable[[str, str], None]


class _Retryable(Exception):
    """An attempt that failed before any byte reached the client; the next upstream may serve."""

    def __init__(self, error: GatewayError, opened: Opened | None = None) -> None:
        self.error, self.opened = error, opened


async def open_on_route(
    clients: Sequence[UpstreamClient],
    request: UpstreamRequest,
    on_error: OnUpstreamError,
) -> Opened:
    """Try each upstream in order; return the first usable answer, or raise the last error."""
    # the last failure's parts, not the exception: its traceback holds this frame, and this
    # frame holding it would be a reference cycle only the garbage collector could break
    last_error: GatewayError | None = None
    last_opened: Opened | None = None
    for attempt, client in enumerate(clients):
        if last_opened is not None:
            last_opened.close()
        try:
            opened = await _attempt(client, request, is_last=attempt == len(clients) - 1)
        except _Retryable as failure:
            on_error(client.name, failure.error.reason or "connect")
            last_error, last_opened = failure.error, failure.opened
        except GatewayError as error:  # not retried (a timeout), but counted all the same
            if error.reason is not None:
                on_error(client.name, error.reason)
            raise
        else:
            request.release()
            return opened
    assert last_error is not None  # a route has at least one upstream (config check)
    if last_opened is not None:
        return last_opened  # the last upstream's own non-2xx answer, relayed as it is
    raise last_error  # (its traceback, dropped where it is answered: app.errors)


async def _attempt(client: UpstreamClient, request: UpstreamRequest, is_last: bool) -> Opened:
    await _acquire_slot(client)
    opened: Opened | None = None
    try:
        response = await _send(client, request)
        opened = Opened(client, response, b"")
        _check_status(opened, is_last)
        opened.first_chunk = await _first_chunk(opened)
        return opened
    except _Retryable as failure:
        if failure.opened is None and opened is not None:
            opened.close()
        elif failure.opened is None:
            client.slots.release()
        raise
    except BaseException:
        if opened is not None:
            opened.close()
        else:
            client.slots.release()
        raise


async def _acquire_slot(client: UpstreamClient) -> None:
    if not client.slots.locked():  # a slot is free: take it without arming a timer
        await client.slots.acquire()
        return
    try:
        async with asyncio.timeout(client.settings.pool_timeout_s):
            await client.slots.acquire()
    except TimeoutError:
        raise ServiceUnavailable(
            f"all {client.settings.max_connections} connections to upstream {client.name!r} "
            "are busy",
            code="upstream_pool_exhausted",
            headers={"Retry-After": "1"},
        ) from None


async def _send(client: UpstreamClient, request: UpstreamRequest) -> upstream_http.Response:
    target = client.target_for(request.tail, request.query)
    headers = client.headers_for(request.headers, request.request_id)
    try:
        return await client.pool.request(request.method, target, headers, request.body_for(client))
    except upstream_http.IdleTimeout:
        raise UpstreamTimeout(
            f"upstream {client.name!r} sent no answer in time", reason="idle_timeout"
        ) from None
    except upstream_http.ConnectFailed as exc:
        # the class only: the client must not learn the upstream's address
        error = UpstreamError(f"upstream {client.name!r} is unreachable: {exc.__class__.__name__}")
        raise _Retryable(error) from exc
    except upstream_http.Disconnected as exc:
        error = UpstreamError(
            f"upstream {client.name!r} closed the connection before answering", reason="reset"
        )
        raise _Retryable(error) from exc
    except (upstream_http.ProtocolViolation, ValueError) as exc:
        error = UpstreamError(
            f"upstream {client.name!r} failed: {exc.__class__.__name__}", reason="protocol"
        )
        raise _Retryable(error) from exc


def _check_status(opened: Opened, is_last: bool) -> None:
    """5xx, 429 and redirects: fail over while another upstream is left."""
    status = opened.response.status
    if 300 <= status < 400:
        error = UpstreamError(
            f"upstream {opened.upstream.name!r} answered a redirect ({status})", reason="redirect"
        )
        raise _Retryable(error)
    if status >= 500 or status == 429:
        reason = "status_429" if status == 429 else "status_5xx"
        error = UpstreamError(f"upstream {opened.upstream.name!r} answered {status}", reason=reason)
        raise _Retryable(error, None if not is_last else opened)


async def _first_chunk(opened: Opened) -> bytes:
    """Read until the first body bytes (or the end of an empty body)."""
    try:
        return await opened.response.read_any()
    except upstream_http.IdleTimeout:
        raise UpstreamTimeout(
            f"upstream {opened.upstream.name!r} sent no body in time", reason="idle_timeout"
        ) from None
    except upstream_http.H1Error as exc:
        error = UpstreamError(
            f"upstream {opened.upstream.name!r} broke off before the body", reason="reset"
        )
        raise _Retryable(error) from exc


class ResponseHeaders(CIMultiDict[str]):
    """The upstream's response headers to relay, and the length it declared for a body sent
    as it is (no Content-Encoding, no Transfer-Encoding), else None."""

    declared_length: int | None = None


def response_headers(upstream: CIMultiDictProxy[str]) -> ResponseHeaders:
    """The upstream's response headers, less hop-by-hop and what aiohttp's server sets itself."""
    headers = ResponseHeaders(
        (k, v) for k, v in upstream.items() if k.lower() not in DROP_RESPONSE_HEADERS
    )
    length = upstream.get("Content-Length", "")
    as_is = upstream.get("Content-Encoding", "identity").strip().lower() == "identity"
    if length.isdigit() and as_is and "Transfer-Encoding" not in upstream:
        headers.declared_length = int(length)
    return headers


async def read_error_body(opened: Opened) -> bytes:
    """The rest of a non-2xx answer, bounded (it is relayed or summarised, never streamed)."""
    body = bytearray(opened.first_chunk)
    with contextlib.suppress(upstream_http.H1Error):
        while len(body) < MAX_ERROR_BODY:
            piece = await opened.response.read_any()
            if not piece:
                break
            body += piece
    return bytes(body[:MAX_ERROR_BODY])
