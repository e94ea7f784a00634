"""One proxied `/v1/*` request: parse, route, admit, open upstream, relay, settle.

    request_parse   path, body and JSON (400, 408, 413)
      -> routing    the model's route (404)
      -> admission  the max_inflight gate (503), the team's limits (429)
      -> upstream   the balancer's choice of upstream; retries and failover before the first
                    byte (429 paced, 502/503/504)
      -> client_response, relay   bytes as they arrive; the ledger meters a parsed copy
      -> ledger.settle            the final tally, the limiter's unused reservation

Modules report what happened on the request's `RequestContext` (the error the client was told
about, the client leaving, the upstream's refusal); `gateway.outcome` decides how the request
ended from that, once, in the first middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import orjson
from aiohttp import web
from multidict import CIMultiDict

from .admission import admit, enter_gate, leave_gate
from .app_state import CALLER, CTX, REQUEST_COMPONENTS, Components
from .balancer import RoutePlan, affinity_key
from .client_response import prepare_stream
from .config import Route
from .context import RequestContext
from .errors import (
    BadRequest,
    GatewayError,
    ModelNotFound,
    ServiceUnavailable,
    UpstreamError,
    drop_tracebacks,
)
from .ledger import COMPLETION_ENDPOINTS, Ledger
from .relay import RelayResult, pump
from .request_parse import MODEL_ENDPOINTS, ParsedRequest, parse_request
from .response_routes import response_id_of
from .routing import RouteMatch
from .upstream import (
    OnUpstreamError,
    Opened,
    UpstreamRequest,
    open_on_route,
    read_error_body,
    response_headers,
)

KEEPALIVE_COMMENT = b": keep-alive\n\n"
#: how long a stream cut by the drain gets to write its last event
CUT_WRITE_S = 1.0


async def handle(request: web.Request) -> web.StreamResponse:
    """One request, start to end, in one coroutine: a stream holds this frame for its whole
    life, so the steps before the relay are not frames of their own."""
    comp, ctx = request[REQUEST_COMPONENTS], request[CTX]
    try:
        parsed = await parse_request(request, comp.settings.max_request_bytes, comp.timeouts.body_s)
        ctx.requested_model = parsed.model
        match = resolve(comp, parsed)
        ctx.model, ctx.stream = match.label, parsed.stream
        gate = await enter_gate(comp, ctx)
        try:
            admitted = await admit(comp, ctx, request.get(CALLER), match, parsed.doc, parsed.body)
            ledger = Ledger(comp, ctx, match, admitted, parsed.tail)
            try:
                return await _serve(request, ledger, parsed)
            except asyncio.CancelledError:
                ctx.client_left = not comp.lifecycle.was_cut()
                raise
            finally:
                await ledger.settle()
        finally:
            await leave_gate(comp, gate)
    except asyncio.CancelledError:
        if not comp.lifecycle.was_cut():
            raise
        _uncancel()  # the drain's grace ran out before any byte went out: answer 503
        raise _shutdown_error() from None


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


async def _serve(request: web.Request, ledger: Ledger, parsed: ParsedRequest) -> web.StreamResponse:
    comp, ctx, route = ledger.comp, ledger.ctx, ledger.match.route
    plan = comp.balancer.plan(route)
    about = response_id_of(parsed.tail, parsed.doc)
    if about is not None:
        plan = await _creator(comp, plan, about)
    upstream_request = UpstreamRequest(
        method=request.method,
        tail=parsed.tail,
        query=request.rel_url.raw_query_string,
        body=parsed.body,
        headers=_forwarded_headers(request, parsed),
        request_id=ctx.request_id,
        injected_body=_injected_body(comp, route, parsed),
        affinity_key=affinity_key(plan, request.headers, parsed.doc),
    )
    parsed.release()
    if parsed.stream and route.keepalive_comment_s:
        return await _serve_with_keepalive(request, ledger, plan, upstream_request)
    # (no local for the callback: this frame lasts as long as the stream)
    try:
        opened = await open_on_route(
            comp.balancer, plan, comp.upstreams, upstream_request, _on_upstream_error(comp, ctx)
        )
    finally:
        ctx.attempts = upstream_request.attempts
    try:
        return await _answer(request, ledger, opened, None, upstream_request)
    finally:
        opened.close()


async def _creator(comp: Components, plan: RoutePlan, response_id: str) -> RoutePlan:
    """For a request about an existing Responses API response: the one upstream that created
    it, when the gateway saw that (gateway.response_routes), else the route's own plan."""
    name = await comp.responses.find(response_id, comp.limiter)
    if name is None or name not in comp.upstreams:
        return plan
    return comp.balancer.pinned(plan, name)


def _forwarded_headers(request: web.Request, parsed: ParsedRequest) -> Mapping[str, str]:
    """The client's headers; a body the gateway parsed as JSON goes up as application/json,
    whatever type the client named (a text/plain or form type would make the upstream fail)."""
    if parsed.doc is None or request.content_type == "application/json":
        return request.headers
    headers = CIMultiDict(request.headers)
    headers["Content-Type"] = "application/json"
    return headers


def _injected_body(comp: Components, route: Route, parsed: ParsedRequest) -> bytes | None:
    """With `usage: inject`, the body asking upstream for include_usage (None if not needed).

    Only chat and completions have `stream_options.include_usage`: a Responses API stream
    always ends with its usage, and that API refuses the option."""
    doc = parsed.doc
    if doc is None or doc.get("stream") is not True or parsed.tail not in COMPLETION_ENDPOINTS:
        return None
    options = doc.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return None
    for name in route.upstream_names:  # (a loop, not any(): no generator per request)
        if comp.upstreams[name].settings.usage == "inject":
            break
    else:
        return None
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return orjson.dumps({**doc, "stream_options": merged})


def _on_upstream_error(comp: Components, ctx: RequestContext) -> OnUpstreamError:
    """Count a failed attempt, and name that upstream in the request's labels meanwhile (the
    one that answers in the end replaces it): a 502 says which upstream failed."""

    def on_error(upstream: str, reason: str) -> None:
        ctx.upstream = upstream
        comp.metrics.upstream_errors.labels(upstream, reason).inc()

    return on_error


async def _serve_with_keepalive(
    request: web.Request,
    ledger: Ledger,
    plan: RoutePlan,
    upstream_request: UpstreamRequest,
) -> web.StreamResponse:
    """Send an SSE comment every keepalive_comment_s while the first upstream byte is awaited.

    Once the first comment went out, the client has bytes: there is no failover any more and
    a failure becomes an SSE error event.
    """
    comp, ctx = ledger.comp, ledger.ctx
    every_s = ledger.match.route.keepalive_comment_s
    task = asyncio.ensure_future(
        open_on_route(
            comp.balancer, plan, comp.upstreams, upstream_request, _on_upstream_error(comp, ctx)
        )
    )
    resp: web.StreamResponse | None = None
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every_s)
            if done:
                break
            if resp is None:
                resp = await prepare_stream(
                    request,
                    ctx,
                    200,
                    {"Content-Type": "text/event-stream"},
                    ledger.admitted.limit_headers,
                )
            await resp.write(KEEPALIVE_COMMENT)
    except asyncio.CancelledError:
        _drop_opening(task)
        if resp is not None and comp.lifecycle.was_cut():
            return await _end_cut_stream(ledger, resp)
        raise
    except BaseException:
        _drop_opening(task)
        raise
    finally:
        ctx.attempts = upstream_request.attempts
    if resp is None:
        opened = task.result()
    else:
        try:
            opened = task.result()
        except GatewayError as error:  # open_on_route counted it
            await _fail_after_comments(ledger, resp, error)
            return resp
    try:
        return await _answer(request, ledger, opened, resp, upstream_request)
    finally:
        opened.close()


def _drop_opening(task: asyncio.Future[Opened]) -> None:
    """The request ends while its upstream is being opened: cancel that, or close what it
    opened (an answer that arrived in the meantime holds a connection and an in-flight count)."""
    if not task.done():
        task.cancel()
    elif not task.cancelled() and task.exception() is None:
        task.result().close()


async def _fail_after_comments(
    ledger: Ledger, resp: web.StreamResponse, error: GatewayError
) -> None:
    """A stream that failed after keep-alive comments (the 200 is sent): the error goes out as
    an SSE event.

    The error ends here, not in the `errors` middleware: its tracebacks go here too (see
    `drop_tracebacks`)."""
    drop_tracebacks(error)
    ledger.ctx.error = error
    await resp.write(ledger.error_event(error))


async def _answer(
    request: web.Request,
    ledger: Ledger,
    opened: Opened,
    resp: web.StreamResponse | None,
    upstream_request: UpstreamRequest,
) -> web.StreamResponse:
    comp, ctx = ledger.comp, ledger.ctx
    ctx.upstream = opened.upstream.name
    status = opened.response.status
    if status >= 400:
        return await _upstream_refused(ledger, opened, resp)
    if resp is None:  # (no local for the headers: a stream that lasts minutes keeps its frame)
        resp = await prepare_stream(
            request,
            ctx,
            status,
            response_headers(opened.response.headers),
            ledger.admitted.limit_headers,
        )
    plan = ledger.plan(opened, request.transport, upstream_request.tail, upstream_request.injected)
    opened.response.forget_headers()  # all read: the client's copy went out with its head
    try:
        result: RelayResult = await pump(resp, opened.response, opened.first_chunk, plan)
    except asyncio.CancelledError:
        if not comp.lifecycle.was_cut():
            raise
        return await _end_cut_stream(ledger, resp)
    _report_relay(comp, ctx, result)
    if result.outcome == "completed":
        if (event_error := ledger.upstream_error_event()) is not None:
            _report_stream_error(comp, ctx, event_error)
        opened.release()
    # the final chunk terminator goes out after the middleware recorded the request's metrics
    # and log line: a client that has the whole answer can already see both
    return resp


def _report_relay(comp: Components, ctx: RequestContext, result: RelayResult) -> None:
    if result.outcome == "client_disconnect":
        ctx.client_left = True
    if result.error is not None:
        _report_stream_error(comp, ctx, result.error)


def _report_stream_error(comp: Components, ctx: RequestContext, error: GatewayError) -> None:
    """An error after the client got its first bytes (it went out as an SSE event)."""
    ctx.error = error
    if error.reason is not None:
        comp.metrics.upstream_errors.labels(ctx.upstream, error.reason).inc()


async def _end_cut_stream(ledger: Ledger, resp: web.StreamResponse) -> web.StreamResponse:
    """The drain's grace ran out during this stream: an SSE error event tells the client (its
    SDK raises instead of keeping half an answer), then the response ends normally."""
    _uncancel()
    ctx = ledger.ctx
    error = ctx.error = _shutdown_error()
    if ctx.stream:
        with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
            async with asyncio.timeout(CUT_WRITE_S):
                await resp.write(ledger.error_event(error))
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
    ledger: Ledger, opened: Opened, resp: web.StreamResponse | None
) -> web.StreamResponse:
    """The last upstream's non-2xx answer: 4xx relayed as it is, 5xx summarised as a 502."""
    ctx = ledger.ctx
    body = await read_error_body(opened)
    status = opened.response.status
    message, code = _upstream_error_fields(body)
    if status >= 500:
        balancer = ledger.comp.balancer
        retry_after = opened.response.headers.get("Retry-After") or balancer.retry_after(
            balancer.plan(ledger.match.route)
        )
        error = UpstreamError(
            f"The upstream answered {status}: {message}", headers={"Retry-After": retry_after}
        )
        if resp is None:
            raise error
        await _fail_after_comments(ledger, resp, error)  # open_on_route counted it (status_5xx)
        return resp
    ctx.upstream_refused, ctx.upstream_code = True, code
    if resp is not None:
        refusal = GatewayError(
            f"The upstream answered {status}: {message}", status=status, code=code
        )
        await resp.write(ledger.error_event(refusal))
        return resp
    headers = response_headers(opened.response.headers)
    headers.update(ledger.admitted.limit_headers)
    return web.Response(status=status, body=body, headers=headers)


def _upstream_error_fields(body: bytes) -> tuple[str, str | None]:
    """The message and code of an upstream's OpenAI-shaped error body, as far as it has them."""
    try:
        error = orjson.loads(body)["error"]
        message, code = error.get("message"), error.get("code")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return "(no OpenAI-shaped error body)", None
    if not isinstance(message, str):
        message = "(no OpenAI-shaped error body)"
    if isinstance(code, int) and not isinstance(code, bool):
        code = str(code)
    return message[:500], code if isinstance(code, str) and code else None
