"""One proxied `/v1/*` request: parse, route, admit, open upstream, relay, settle.

    read body (413) -> parse JSON (400) -> route by model (404) -> inflight gate (503)
      -> team limits (429) -> upstreams in order, failover before the first byte (502/503/504)
      -> relay bytes as they arrive, accounting on a parsed copy -> settle tokens and limits

Everything learnt on the way goes into the request's `RequestContext`, which the first
middleware turns into metrics and the canonical log line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from aiohttp import StreamReader, web
from multidict import CIMultiDict

from .components import COMPONENTS, CTX, TEAM, Components
from .config import Route, Team
from .errors import (
    BadRequest,
    GatewayError,
    ModelNotFound,
    RequestTooLarge,
    ServiceUnavailable,
    UpstreamError,
    drop_tracebacks,
    sse_error_event,
)
from .exchange import Exchange
from .relay import RelayResult, pump
from .routing import RouteMatch
from .upstream import (
    OnUpstreamError,
    Opened,
    UpstreamRequest,
    open_on_route,
    read_error_body,
    response_headers,
)

#: endpoints whose body must be a JSON object naming a model
MODEL_ENDPOINTS = frozenset({"chat/completions", "completions", "embeddings"})
KEEPALIVE_COMMENT = b": keep-alive\n\n"
#: streams that end with `finish_reason` or `[DONE]`: one that ends with neither was cut short
COMPLETION_ENDPOINTS = frozenset({"chat/completions", "completions"})
#: how long a stream cut by the drain gets to write its last event
CUT_WRITE_S = 1.0
#: a `.` or `..` path segment, or a control character
_UNSAFE_TAIL = re.compile(r"(?:^|/)\.\.?(?:/|$)|[\x00-\x1f\x7f]")


@dataclass(slots=True)
class ParsedRequest:
    tail: str
    body: bytes
    doc: dict[str, Any] | None
    model: str | None
    stream: bool

    def release(self) -> None:
        """Drop the body and its parse once the upstream request is built: a stream that
        lasts minutes holds no copy of its prompt."""
        self.body, self.doc = b"", None


async def handle(request: web.Request) -> web.StreamResponse:
    """One request, start to end, in one coroutine: a stream holds this frame for its whole
    life, so the steps before the relay are not frames of their own."""
    comp, ctx = request.app[COMPONENTS], request[CTX]
    try:
        parsed = await parse_request(request, comp.settings.max_request_bytes, comp.timeouts.body_s)
        match = resolve(comp, parsed)
        ctx.model, ctx.stream = match.label, parsed.stream
        gate = await comp.enter_gate(ctx)
        try:
            team: Team | None = request.get(TEAM)
            exchange = await Exchange.admit(comp, ctx, team, match, parsed.doc, parsed.body)
            try:
                return await _serve(request, comp, exchange, match.route, parsed)
            except asyncio.CancelledError:  # the client went away (handler cancellation)
                ctx.end = "client_disconnect"
                raise
            finally:
                await exchange.settle()
        finally:
            await comp.leave_gate(gate)
    except asyncio.CancelledError:
        if not comp.lifecycle.was_cut():
            raise
        _uncancel()  # the drain's grace ran out before any byte went out: answer 503
        ctx.end = "rejected"
        raise _shutdown_error() from None


async def parse_request(
    request: web.Request, max_bytes: int, timeout_s: float | None = None
) -> ParsedRequest:
    tail = check_tail(request.match_info.get("tail", ""))
    body = await read_body(request, max_bytes, timeout_s)
    doc = parse_json(body, required=tail in MODEL_ENDPOINTS and request.method == "POST")
    model = doc.get("model") if doc is not None else None
    if doc is not None and tail in MODEL_ENDPOINTS and not isinstance(model, str):
        raise BadRequest("You must provide a model parameter.", param="model")
    stream = doc is not None and doc.get("stream") is True
    return ParsedRequest(tail, body, doc, model if isinstance(model, str) else None, stream)


def check_tail(tail: str) -> str:
    """The path after `/v1/`, refused (400) when it could leave the upstream's base path.

    `tail` is already percent-decoded: `%2e%2e` is `..` here. Dot segments would climb out of
    the base URL's path once the upstream normalises them, and control characters have no
    business in a path; everything else is percent-encoded again by `UpstreamClient.target_for`.
    """
    if _UNSAFE_TAIL.search(tail):
        raise BadRequest(f"Invalid path: /v1/{tail!r}", code="invalid_path")
    return tail


async def read_body(request: web.Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The whole body, at most max_bytes (413), within timeout_s (408: a slowloris body).

    An answer to a body left unread or unreadable closes the connection (app.py,
    `_close_if_body_unread`): it cannot carry another request."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    content = request.content
    try:
        while piece := content.read_nowait():  # what has arrived already needs no timer
            _append(body, piece, max_bytes)
        if not content.at_eof():
            async with asyncio.timeout(timeout_s):
                while piece := await content.readany():
                    _append(body, piece, max_bytes)
    except TimeoutError:
        error = BadRequest(
            f"The request body did not arrive within {timeout_s} s.",
            code="request_timeout",
        )
        error.status = 408
        raise error from None
    except web.RequestPayloadError:  # a body that does not match its Content-Encoding
        encoding = request.headers.get("Content-Encoding", "identity")
        raise BadRequest(
            f"The request body could not be decoded (Content-Encoding: {encoding!r}).",
            code="invalid_request_body",
        ) from None
    park_buffer(content)  # read to its end: its buffer is not needed for the stream's life
    return bytes(body)


class _Parked(collections.deque[bytes]):
    """An empty buffer shared by every request body read to its end: growing it is a bug."""

    __slots__ = ()

    def append(self, item: bytes) -> None:
        raise RuntimeError("a parked reader buffer cannot take data")

    appendleft = append


PARKED = _Parked()


def park_buffer(reader: StreamReader) -> None:
    """Free the empty buffers of a request body read to its end: a stream that lasts minutes
    keeps its request object, and these deques are about 1.5 KB of it.

    Other readers (aiohttp's shared `EMPTY_PAYLOAD` for a body-less request) are left alone.
    """
    if type(reader) is StreamReader and not reader._buffer:
        reader._buffer = PARKED
        reader._http_chunk_splits = None


def _append(body: bytearray, piece: bytes, max_bytes: int) -> None:
    body += piece
    if len(body) > max_bytes:
        raise _too_large(max_bytes)


def _too_large(max_bytes: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than the limit of {max_bytes} bytes.")


def parse_json(body: bytes, *, required: bool) -> dict[str, Any] | None:
    if not body:
        if required:
            raise BadRequest("The request body is empty; send a JSON object.")
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if not required:
            return None
        raise BadRequest(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(doc, dict):
        if required:
            raise BadRequest("The request body must be a JSON object.")
        return None
    return doc


def resolve(comp: Components, parsed: ParsedRequest) -> RouteMatch:
    if parsed.model is not None:
        found = comp.router.match(parsed.model)
        if found is None:
            raise ModelNotFound(
                f"The model `{parsed.model}` does not exist or you do not have access to it.",
                param="model",
            )
        return found
    if parsed.tail in MODEL_ENDPOINTS or not comp.settings.routes:
        raise BadRequest("You must provide a model parameter.", param="model")
    first = comp.settings.routes[0]
    return RouteMatch(first, "other")


async def _serve(
    request: web.Request, comp: Components, exchange: Exchange, route: Route, parsed: ParsedRequest
) -> web.StreamResponse:
    upstream_request = UpstreamRequest(
        method=request.method,
        tail=parsed.tail,
        query=request.rel_url.raw_query_string,
        body=parsed.body,
        headers=_forwarded_headers(request, parsed),
        request_id=exchange.ctx.request_id,
        injected_body=exchange.injected_body(parsed.doc),
    )
    parsed.release()
    clients = [comp.upstreams[name] for name in route.upstreams]
    if parsed.stream and route.keepalive_comment_s:
        return await _serve_with_keepalive(request, exchange, clients, upstream_request, route)
    # (no local for the callback: this frame lasts as long as the stream)
    opened = await open_on_route(clients, upstream_request, _on_upstream_error(exchange))
    try:
        return await _answer(request, exchange, opened, None, parsed.tail)
    finally:
        opened.close()


def _forwarded_headers(request: web.Request, parsed: ParsedRequest) -> Mapping[str, str]:
    """The client's headers; a body the gateway parsed as JSON goes up as application/json,
    whatever type the client named (a text/plain or form type would make the upstream fail)."""
    if parsed.doc is None or request.content_type == "application/json":
        return request.headers
    headers = CIMultiDict(request.headers)
    headers["Content-Type"] = "application/json"
    return headers


def _on_upstream_error(exchange: Exchange) -> OnUpstreamError:
    """Count a failed attempt, and name that upstream in the request's labels meanwhile (the
    one that answers in the end replaces it): a 502 says which upstream failed."""

    def on_error(upstream: str, reason: str) -> None:
        exchange.ctx.upstream = upstream
        exchange.on_upstream_error(upstream, reason)

    return on_error


async def _serve_with_keepalive(
    request: web.Request,
    exchange: Exchange,
    clients: list[Any],
    upstream_request: UpstreamRequest,
    route: Route,
) -> web.StreamResponse:
    """Send an SSE comment every keepalive_comment_s while the first upstream byte is awaited.

    Once the first comment went out, the client has bytes: there is no failover any more and
    a failure becomes an SSE error event.
    """
    assert route.keepalive_comment_s is not None
    task = asyncio.ensure_future(
        open_on_route(clients, upstream_request, _on_upstream_error(exchange))
    )
    resp: web.StreamResponse | None = None
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=route.keepalive_comment_s)
            if done:
                break
            if resp is None:
                resp = await exchange.prepare_stream(
                    request, 200, {"Content-Type": "text/event-stream"}
                )
            await resp.write(KEEPALIVE_COMMENT)
    except asyncio.CancelledError:
        task.cancel()
        if resp is not None and exchange.comp.lifecycle.was_cut():
            return await _end_cut_stream(exchange, resp)
        raise
    except BaseException:
        task.cancel()
        raise
    if resp is None:
        opened = task.result()
    else:
        try:
            opened = task.result()
        except GatewayError as error:  # open_on_route counted it
            _failed_after_comments(exchange, error)
            await resp.write(sse_error_event(error))
            return resp
    try:
        return await _answer(request, exchange, opened, resp, upstream_request.tail)
    finally:
        opened.close()


def _failed_after_comments(exchange: Exchange, error: GatewayError) -> None:
    """The log line of a stream that failed after keep-alive comments (the 200 is sent).

    The error ends here, as an SSE event, not in the `errors` middleware: its tracebacks go
    here too (see `drop_tracebacks`)."""
    drop_tracebacks(error)
    exchange.ctx.error_code = error.code
    exchange.ctx.end = "upstream_error" if error.reason is not None else "rejected"


async def _answer(
    request: web.Request,
    exchange: Exchange,
    opened: Opened,
    resp: web.StreamResponse | None,
    tail: str,
) -> web.StreamResponse:
    exchange.ctx.upstream = opened.upstream.name
    status = opened.response.status
    if status >= 400:
        return await _upstream_refused(exchange, opened, resp)
    if resp is None:  # (no local for the headers: a stream that lasts minutes keeps its frame)
        resp = await exchange.prepare_stream(
            request, status, response_headers(opened.response.headers)
        )
    plan = exchange.relay_plan(opened)
    opened.response.forget_headers()  # all read: the client's copy went out with its head
    plan.client_transport = request.transport
    if plan.sse and tail in COMPLETION_ENDPOINTS:
        plan.end_check = partial(_cut_short, exchange)
    try:
        result: RelayResult = await pump(resp, opened.response, opened.first_chunk, plan)
    except asyncio.CancelledError:
        if not exchange.comp.lifecycle.was_cut():
            raise
        return await _end_cut_stream(exchange, resp)
    exchange.finish(result)
    if result.outcome == "completed":
        _note_error_event(exchange)
        opened.release()
    # the final chunk terminator goes out after the middleware recorded the request's metrics
    # and log line: a client that has the whole answer can already see both
    return resp


def _cut_short(exchange: Exchange) -> GatewayError | None:
    """A completion stream that ended with no finish_reason, no [DONE] and no error event
    was cut short: without a word, the client would take half an answer for a whole one.

    A stream with a finish_reason but no [DONE] is whole (some upstreams never send it). With
    accounting off for the route there is no parsed copy to tell, and nothing is added.
    """
    tally = exchange.stream_tally()  # idempotent: settle() takes the same tally
    if tally is None or tally.saw_done or tally.finish_reasons or tally.upstream_error is not None:
        return None
    return UpstreamError(
        "The upstream ended the stream before it was complete (no finish_reason, no [DONE]).",
        code="upstream_truncated",
        reason="truncated",
    )


def _note_error_event(exchange: Exchange) -> None:
    """The upstream ended its stream with its own `data: {"error": ...}` event: relayed as it
    is, and the request counts as an upstream error rather than a completed stream."""
    tally = exchange.stream_tally()
    error = tally.upstream_error if tally is not None else None
    if error is not None:
        code = error.get("code")
        exchange.fail(
            UpstreamError(
                "The upstream ended the stream with an error event.",
                code=code if isinstance(code, str) and code else "upstream_error_event",
                reason="error_event",
            )
        )


async def _end_cut_stream(exchange: Exchange, resp: web.StreamResponse) -> web.StreamResponse:
    """The drain's grace ran out during this stream: an SSE error event tells the client (its
    SDK raises instead of keeping half an answer), then the response ends normally."""
    _uncancel()
    exchange.ctx.end, exchange.ctx.error_code = "rejected", "gateway_shutdown"
    if exchange.ctx.stream:
        with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
            async with asyncio.timeout(CUT_WRITE_S):
                await resp.write(sse_error_event(_shutdown_error()))
                await resp.write_eof()
    return resp


def _shutdown_error() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The gateway shut down before this request finished; retry it.",
        code="gateway_shutdown",
        headers={"Retry-After": "1"},
    )


def _uncancel() -> None:
    """Take back the cancellation the drain sent (Lifecycle.cut): this request ends on its own."""
    task = asyncio.current_task()
    assert task is not None
    task.uncancel()


async def _upstream_refused(
    exchange: Exchange, opened: Opened, resp: web.StreamResponse | None
) -> web.StreamResponse:
    """The last upstream's non-2xx answer: 4xx relayed as it is, 5xx summarised as a 502."""
    body = await read_error_body(opened)
    status = opened.response.status
    retry_after = opened.response.headers.get("Retry-After")
    if status >= 500:
        error = UpstreamError(
            f"The upstream answered {status}: {_upstream_message(body)}",
            headers={"Retry-After": retry_after} if retry_after else None,
        )
        if resp is not None:  # open_on_route counted it (status_5xx)
            _failed_after_comments(exchange, error)
            await resp.write(sse_error_event(error))
            return resp
        raise error
    exchange.ctx.status = status
    exchange.ctx.end = "upstream_error"
    if resp is not None:
        await resp.write(sse_error_event(_as_gateway_error(status, body)))
        return resp
    headers = response_headers(opened.response.headers)
    headers.update(exchange.limit_headers)
    return web.Response(status=status, body=body, headers=headers)


def _upstream_message(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
        message = doc["error"]["message"]
        if isinstance(message, str):
            return message[:500]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    return "(no OpenAI-shaped error body)"


def _as_gateway_error(status: int, body: bytes) -> GatewayError:
    error = GatewayError(f"The upstream answered {status}: {_upstream_message(body)}")
    error.status = status
    return error
