"""One proxied `/v1/*` request: parse, route, admit, open upstream, relay, settle.

    read body (413) -> parse JSON (400) -> route by model (404) -> inflight gate (503)
      -> team limits (429) -> upstreams in order, failover before the first byte (502/503/504)
      -> relay bytes as they arrive, accounting on a parsed copy -> settle tokens and limits

Everything learnt on the way goes into the request's `RequestContext`, which the first
middleware turns into metrics and the canonical log line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .components import COMPONENTS, CTX, TEAM, Components
from .config import Route, Team
from .context import RequestContext
from .errors import (
    BadRequest,
    GatewayError,
    ModelNotFound,
    RequestTooLarge,
    UpstreamError,
    error_response,
    sse_error_event,
)
from .exchange import Exchange
from .relay import RelayResult, pump
from .routing import RouteMatch
from .upstream import Opened, UpstreamRequest, open_on_route, read_error_body, response_headers

#: endpoints whose body must be a JSON object naming a model
MODEL_ENDPOINTS = frozenset({"chat/completions", "completions", "embeddings"})
#: above this many body bytes, the prompt estimate runs in a thread, off the event loop
ESTIMATE_IN_THREAD_BYTES = 64 * 1024
KEEPALIVE_COMMENT = b": keep-alive\n\n"


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    tail: str
    body: bytes
    doc: dict[str, Any] | None
    model: str | None
    stream: bool


async def handle(request: web.Request) -> web.StreamResponse:
    comp, ctx = request.app[COMPONENTS], request[CTX]
    parsed = await parse_request(request, comp.settings.max_request_bytes)
    match = resolve(comp, parsed)
    ctx.model, ctx.stream = match.label, parsed.stream
    team: Team | None = request.get(TEAM)
    async with comp.gate(ctx):
        exchange = await Exchange.admit(comp, ctx, team, match, parsed.doc, parsed.body)
        try:
            return await _serve(request, comp, exchange, match.route, parsed)
        except asyncio.CancelledError:  # the client went away (handler cancellation)
            ctx.end = "client_disconnect"
            raise
        finally:
            await exchange.settle()


async def parse_request(request: web.Request, max_bytes: int) -> ParsedRequest:
    tail = request.match_info.get("tail", "")
    body = await read_body(request, max_bytes)
    doc = parse_json(body, required=tail in MODEL_ENDPOINTS and request.method == "POST")
    model = doc.get("model") if doc is not None else None
    if doc is not None and tail in MODEL_ENDPOINTS and not isinstance(model, str):
        raise BadRequest("You must provide a model parameter.", param="model")
    stream = doc is not None and doc.get("stream") is True
    return ParsedRequest(tail, body, doc, model if isinstance(model, str) else None, stream)


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(max_bytes) from None


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
        query=request.query_string,
        body=parsed.body,
        headers=request.headers,
        request_id=exchange.ctx.request_id,
        injected_body=exchange.injected_body(parsed.doc),
    )
    clients = [comp.upstreams[name] for name in route.upstreams]
    if parsed.stream and route.keepalive_comment_s:
        return await _serve_with_keepalive(request, exchange, clients, upstream_request, route)
    opened = await open_on_route(clients, upstream_request, exchange.on_upstream_error)
    try:
        return await _answer(request, exchange, opened, None)
    finally:
        opened.close()


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
        open_on_route(clients, upstream_request, exchange.on_upstream_error)
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
    except BaseException:
        task.cancel()
        raise
    if resp is None:
        opened = task.result()
    else:
        try:
            opened = task.result()
        except GatewayError as error:
            exchange.fail(error)
            await resp.write(sse_error_event(error))
            return resp
    try:
        return await _answer(request, exchange, opened, resp)
    finally:
        opened.close()


async def _answer(
    request: web.Request, exchange: Exchange, opened: Opened, resp: web.StreamResponse | None
) -> web.StreamResponse:
    exchange.ctx.upstream = opened.upstream.name
    status = opened.response.status
    if status >= 400:
        return await _upstream_refused(exchange, opened, resp)
    if resp is None:
        headers = response_headers(opened.response.headers)
        resp = await exchange.prepare_stream(request, status, headers)
    plan = exchange.relay_plan(opened)
    plan.client_transport = request.transport
    result: RelayResult = await pump(resp, opened.response.content, opened.first_chunk, plan)
    exchange.finish(result)
    if result.outcome == "completed":
        opened.release()
        await _write_eof(resp)
    return resp


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
        if resp is not None:
            exchange.fail(error)
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


async def _write_eof(resp: web.StreamResponse) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await resp.write_eof()


def render_error(error: GatewayError, extra_headers: Mapping[str, str]) -> web.Response:
    response = error_response(error)
    response.headers.update(extra_headers)
    return response


__all__ = ["RequestContext", "handle", "parse_json", "read_body", "render_error"]
