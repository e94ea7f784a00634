"""Upstream pools, and opening a request on a route with retries before the first byte.

One `gateway.upstream_http.Pool` of keep-alive connections per upstream per process, with explicit
connect and idle-read timeouts and no total timeout (a stream may last an hour). A semaphore of
`max_connections` slots bounds the connections and the wait for one: past `pool_timeout_s` the
request gets a 503 instead of queueing without end.

`open_on_route` asks the balancer (`gateway.balancer`, the one owner of that choice) for an
upstream, and returns once it answered with headers AND its first body bytes (or a non-2xx
answer it relays): until then nothing has reached the client, so a connect error, a reset, a
5xx, a 408, 409 or 429 may move on to another member of the tier, down the tiers, or, after a
backoff, the same upstream again. After that, never. A timeout is not retried (the client
already waited an idle timeout), nor is any other 4xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NoReturn

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import upstream_http
from .balancer import Balancer, Paced, RoutePlan, Tried, UpstreamState
from .config import Upstream
from .errors import (
    GatewayError,
    RateLimitExceeded,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)

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
    #: the upstream's credentials header, if it has a key: built once, sent with every request
    _authorization: tuple[tuple[str, str], ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.settings.max_connections)
        if self.settings.api_key:
            self._authorization = (("Authorization", f"Bearer {self.settings.api_key}"),)

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
        """The headers sent upstream: the client's (each name lowered once), less the dropped
        and the `Connection`-nominated ones, then the gateway's own."""
        drop = _dropped(_connection(client_headers))
        headers = [(k, v) for k, v in client_headers.items() if k.lower() not in drop]
        headers += (_ACCEPT_IDENTITY, ("X-Request-Id", request_id), *self._authorization)
        return headers

    async def aclose(self) -> None:
        await self.pool.aclose()


_ACCEPT_IDENTITY = ("Accept-Encoding", "identity")


def _connection(headers: Mapping[str, str]) -> str:
    """The client's `Connection` header fields, as one list (a multidict is asked by name)."""
    if isinstance(headers, CIMultiDict | CIMultiDictProxy):
        return ",".join(headers.getall("Connection", ()))
    return ",".join(v for k, v in headers.items() if k.lower() == "connection")


@functools.lru_cache(maxsize=64)
def _dropped(connection: str) -> frozenset[str]:
    """The headers not forwarded for a `Connection` value: DROP_REQUEST_HEADERS and the ones
    it nominates hop-by-hop (RFC 9110 7.6.1). Cached: clients send one or two values (the
    openai SDK's `keep-alive`)."""
    nominated = (name.strip().lower() for name in connection.split(","))
    return DROP_REQUEST_HEADERS.union(name for name in nominated if name)


def create_client(name: str, settings: Upstream, base_url: str) -> UpstreamClient:
    # the pool keeps no cookies: it serves every team, and a Set-Cookie one answer carries
    # must never go out with another team's request
    pool = upstream_http.Pool(
        base_url,
        connect_timeout_s=settings.connect_timeout_s,
        idle_timeout_s=settings.read_idle_timeout_s,
        # HTTPS_PROXY / HTTP_PROXY / NO_PROXY, read here once: never per request; the
        # built-in simulator listens on this host's loopback, which no proxy can reach
        proxy=upstream_http.environment_proxy(base_url) if settings.simulator is None else None,
    )
    return UpstreamClient(name=name, settings=settings, base_url=URL(base_url), pool=pool)


@dataclass(slots=True)
class Opened:
    """An upstream answer whose headers and first body bytes have arrived.

    It holds a connection slot and the upstream's in-flight count: `release` or `close` gives
    both back, once, whichever way the request ends."""

    upstream: UpstreamClient
    response: upstream_http.Response
    first_chunk: bytes
    #: the balancer's view of that upstream (its in-flight count)
    state: UpstreamState
    _slot_held: bool = True

    def release(self) -> None:
        """Return the connection to the pool (or close it if the body was not read to its end)."""
        self.response.release()
        self._let_go()

    def close(self) -> None:
        """Drop the connection: the client went away or the stream failed mid-way."""
        self.response.close()
        self._let_go()

    def _let_go(self) -> None:
        if self._slot_held:
            self._slot_held = False
            _free(self.upstream, self.state)


def _free(client: UpstreamClient, state: UpstreamState) -> None:
    client.slots.release()
    state.end()


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
    #: the balancer's affinity key (balance: affinity), see balancer.affinity_key
    affinity_key: bytes | None = None
    #: whether there is one (kept after `release`)
    injected: bool = field(init=False)
    #: how many times it was sent upstream so far
    attempts: int = field(init=False, default=0)

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
#: what a failed attempt tells the upstream's passive health
Verdict = Literal["failure", "wait", "none"]


class _Retryable(Exception):
    """An attempt that failed before any byte reached the client; another attempt may serve."""

    def __init__(
        self,
        error: GatewayError,
        opened: Opened | None = None,
        *,
        verdict: Verdict = "failure",
        retry_after_s: float = 0.0,
        counted: bool = True,
        reason: str | None = None,
        again: bool = True,
    ) -> None:
        self.error, self.opened, self.again = error, opened, again
        self.verdict, self.retry_after_s, self.counted = verdict, retry_after_s, counted
        self.reason = reason or error.reason or "connect"


async def open_on_route(
    balancer: Balancer,
    plan: RoutePlan,
    clients: Mapping[str, UpstreamClient],
    request: UpstreamRequest,
    on_error: OnUpstreamError,
) -> Opened:
    """Ask the balancer for an upstream, and another after each failure, while the plan allows;
    return the first usable answer, else the last upstream's own non-2xx answer or error.

    Between two attempts on the same upstream: an exponential backoff with jitter; no wait
    (backoff, pacing) ends past the route's budget."""
    deadline = balancer.now() + plan.budget_s
    state = balancer.choose(plan, None, request.affinity_key)
    assert state is not None  # a first choice always names one (config: one upstream at least)
    tried: Tried = {}
    # the last failure's parts, not the exception: its traceback holds this frame, and this
    # frame holding it would be a reference cycle only the garbage collector could break
    last_error: GatewayError | None = None
    last_opened: Opened | None = None
    try:
        while True:
            try:
                client = clients[state.name]
                opened = await _attempt(balancer, plan, client, state, request, deadline)
            except _Retryable as failure:
                if failure.counted:
                    on_error(state.name, failure.reason)
                last_error, last_opened = failure.error, failure.opened
                reason, again = failure.reason, failure.again and failure.verdict != "wait"
            except GatewayError as error:  # not retried (a timeout), but counted all the same
                if error.reason is not None:
                    on_error(state.name, error.reason)
                raise
            else:
                request.release()
                return opened
            # an upstream that asked for a pause, or redirected, is not asked again
            tried[state.name] = tried.get(state.name, 0) + 1 if again else plan.attempts
            following = balancer.choose(plan, tried, request.affinity_key, request.attempts)
            delay = _backoff(plan, tried.get(following.name, 0)) if following else 0.0
            if following is None or balancer.now() + delay > deadline:
                break
            if last_opened is not None:
                last_opened.close()
                last_opened = None
            balancer.retried(state, reason)
            if delay:
                await asyncio.sleep(delay)
            state = following
    except BaseException:
        if last_opened is not None:
            last_opened.close()
        raise
    if last_opened is not None:
        return last_opened  # the last upstream's own non-2xx answer, relayed as it is
    assert last_error is not None
    last_error.headers.setdefault("Retry-After", balancer.retry_after(plan))
    raise last_error  # (its traceback, dropped where it is answered: app.errors)


def _backoff(plan: RoutePlan, sent: int) -> float:
    """Seconds before the next send to an upstream already tried `sent` times (0: none)."""
    if not sent:
        return 0.0
    retry = plan.retry
    ceiling: float = min(retry.max_backoff_ms, retry.backoff_ms * 2.0 ** (sent - 1)) / 1000
    return ceiling / 2 + random.random() * ceiling / 2


async def _attempt(
    balancer: Balancer,
    plan: RoutePlan,
    client: UpstreamClient,
    state: UpstreamState,
    request: UpstreamRequest,
    deadline: float,
) -> Opened:
    if state.limiter is not None:
        await _pace(balancer, state, deadline)
    await _acquire_slot(client)
    request.attempts += 1
    probe = balancer.claim(state)
    opened: Opened | None = None
    try:
        response = await _send(client, request)
        opened = Opened(client, response, b"", state)
        _check_status(opened)
        opened.first_chunk = await _first_chunk(opened)
    except _Retryable as failure:
        _tell_health(balancer, plan, state, failure)
        if failure.opened is None:
            _let_go(opened, client, state)
        raise
    except UpstreamTimeout:
        balancer.failed(plan, state, "timeout")
        _let_go(opened, client, state)
        raise
    except BaseException:
        balancer.abandoned(state, probe)
        _let_go(opened, client, state)
        raise
    balancer.succeeded(state)
    return opened


def _let_go(opened: Opened | None, client: UpstreamClient, state: UpstreamState) -> None:
    if opened is not None:
        opened.close()
    else:
        _free(client, state)


def _tell_health(
    balancer: Balancer, plan: RoutePlan, state: UpstreamState, failure: _Retryable
) -> None:
    if failure.verdict == "failure":
        balancer.failed(plan, state, failure.reason)
    elif failure.verdict == "wait":
        balancer.asked_to_wait(plan, state, failure.retry_after_s)
    else:
        balancer.succeeded(state)  # it answered (408, 409, 429): alive


async def _pace(balancer: Balancer, state: UpstreamState, deadline: float) -> None:
    """The upstream's `max_requests_per_minute`, waited for within the request's budget."""
    try:
        await balancer.pace(state, deadline)
    except Paced as paced:
        wait = str(max(1, math.ceil(paced.wait_s)))
        error = RateLimitExceeded(
            f"upstream {state.name!r} is at its max_requests_per_minute; retry shortly",
            headers={"Retry-After": wait},
        )
        # (not again: the wait would only be longer, in less of the budget)
        raise _Retryable(
            error, verdict="none", counted=False, reason="paced", again=False
        ) from None


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
    except (upstream_http.H1Error, ValueError) as exc:  # ValueError: a head it refused to send
        _fail_before_first_byte(exc, client.name, "send")


#: 4xx answers another upstream (or a later attempt) may answer differently
RETRIED_4XX = frozenset({408, 409, 429})


def _check_status(opened: Opened) -> None:
    """5xx, 408, 409, 429 and redirects: another attempt may serve (the answer is kept, to be
    relayed if none does). 429 or 503 with Retry-After: the upstream asks for a pause."""
    status = opened.response.status
    name = opened.upstream.name
    if 300 <= status < 400:
        error = UpstreamError(f"upstream {name!r} answered redirect {status}", reason="redirect")
        raise _Retryable(error, again=False)
    if status < 500 and status not in RETRIED_4XX:
        return
    reason = "status_5xx" if status >= 500 else f"status_{status}"
    error = UpstreamError(f"upstream {name!r} answered {status}", reason=reason)
    wait_s = None
    if status in (429, 503):
        wait_s = retry_after_seconds(opened.response.headers.get("Retry-After"))
    if wait_s is not None:
        raise _Retryable(error, opened, verdict="wait", retry_after_s=wait_s)
    raise _Retryable(error, opened, verdict="failure" if status >= 500 else "none")


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds (delta-seconds or an HTTP date), None if absent or bad."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return seconds if seconds > 0 and math.isfinite(seconds) else None


async def _first_chunk(opened: Opened) -> bytes:
    """Read until the first body bytes (or the end of an empty body)."""
    try:
        return await opened.response.read_any()
    except upstream_http.H1Error as exc:
        _fail_before_first_byte(exc, opened.upstream.name, "first_chunk")


Phase = Literal["send", "first_chunk", "stream"]


def gateway_error_for(exc: Exception, phase: Phase, upstream_name: str = "") -> GatewayError:
    """The gateway's error for an exchange with an upstream that failed (`exc`: an
    `upstream_http.H1Error`, or the ValueError of a request head the pool refused to send).

    `phase`: "send" until the answer's head arrived, "first_chunk" until its first body
    bytes, "stream" after (the relay; its messages do not name the upstream). The one place
    that says which message, reason label and status each failure gets; whether it may fail
    over is the caller's (`_fail_before_first_byte`: all but a timeout).
    """
    name = repr(upstream_name)
    if isinstance(exc, upstream_http.IdleTimeout):
        if phase == "send":
            message = f"upstream {name} sent no answer in time"
        elif phase == "first_chunk":
            message = f"upstream {name} sent no body in time"
        else:
            message = "The upstream went silent in the middle of the stream."
        return UpstreamTimeout(message, reason="idle_timeout")
    if phase == "stream":
        return UpstreamError(
            f"The upstream broke off the stream ({exc.__class__.__name__}).", reason="reset"
        )
    if phase == "first_chunk":
        return UpstreamError(f"upstream {name} broke off before the body", reason="reset")
    if isinstance(exc, upstream_http.ConnectFailed):
        # the class only: the client must not learn the upstream's address
        return UpstreamError(f"upstream {name} is unreachable: {exc.__class__.__name__}")
    if isinstance(exc, upstream_http.Disconnected):
        return UpstreamError(
            f"upstream {name} closed the connection before answering", reason="reset"
        )
    return UpstreamError(f"upstream {name} failed: {exc.__class__.__name__}", reason="protocol")


def _fail_before_first_byte(exc: Exception, upstream_name: str, phase: Phase) -> NoReturn:
    """A failure before the client got any byte: the next upstream may serve, unless this
    one timed out (not retried: another wait as long would be worse)."""
    error = gateway_error_for(exc, phase, upstream_name)
    if isinstance(error, UpstreamTimeout):
        raise error from None
    raise _Retryable(error) from exc


class ResponseHeaders(CIMultiDict[str]):
    """The upstream's response headers to relay, and the length it declared for a body sent
    as it is (no Content-Encoding, no Transfer-Encoding), else None."""

    declared_length: int | None = None


def response_headers(upstream: CIMultiDictProxy[str]) -> ResponseHeaders:
    """The upstream's response headers, less hop-by-hop and what aiohttp's server sets itself."""
    headers = ResponseHeaders(
        [(k, v) for k, v in upstream.items() if k.lower() not in DROP_RESPONSE_HEADERS]
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
