"""The aiohttp application: middlewares, routes, and what lives as long as the app.

A request's route through the middlewares, in the order they run:

    1. request_context  request id (x-request-id; gateway.logs.REQUEST_ID for the lines
                        logged meanwhile), RequestContext, the app's Components under
                        REQUEST_COMPONENTS (looked up once); in `finally` how the request
                        ended (gateway.outcome, decided once), its metrics and its one
                        canonical log line (Components.request_log)
    2. errors           GatewayError and aiohttp's HTTP errors -> OpenAI-shaped JSON; inside
                        it, for every path but PUBLIC_PATHS (the explicit allow-list):
                        a. refuse_while_draining: after SIGTERM, 503 for new requests
                           (readiness is already false)
                        b. authenticate: /v1/* and /gateway/usage need a gateway key
                           unless auth is off
    3. handler          /v1/models, /gateway/usage, or proxy.handle for every other /v1/*

Two middlewares, not four: each one costs every request a coroutine frame for the life of
its stream (about 500 bytes on a stream held open for minutes) and a call.

Everything with a lifetime (upstream sessions, the in-process simulator, tokenizers, the
limiter) is created and closed in `cleanup_ctx`, in `_lifespan`.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import structlog
from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from .app_state import CALLER, COMPONENTS, CTX, REQUEST_COMPONENTS, Components
from .auth import Authenticator
from .balancer import Balancer
from .config import Settings, Upstream
from .context import RequestContext
from .errors import (
    BadRequest,
    GatewayError,
    ModelNotFound,
    RequestTooLarge,
    ServiceUnavailable,
    drop_tracebacks,
    error_response,
)
from .limits import InflightGate, create_limiter
from .logs import REQUEST_ID
from .metrics import GatewayMetrics
from .model_catalog import ModelCatalog
from .outcome import conclude
from .proxy import handle
from .routing import Router
from .spend import create_spend_book
from .tokens import Tokenizer, load_tokenizer
from .upstream import UpstreamClient, create_client

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
#: the `Server` header of every answer: the product, not what it runs on
SERVER_NAME = "llm-stream-gateway"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = structlog.get_logger("gateway")
#: the in-process simulators (config `simulator: {}`), for tests that look at what they received
SIM_RUNNERS = web.AppKey("sim_runners", list[web.AppRunner])
#: the upstreams' model lists, cached, behind `GET /v1/models`
MODEL_CATALOG = web.AppKey("model_catalog", ModelCatalog)


def create_app(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    exposition: CollectorRegistry | None = None,
) -> web.Application:
    """The gateway app. Metrics go into `registry`; `/metrics` serves `exposition` (a
    multiprocess collector under --workers), by default the same registry."""
    app = web.Application(
        middlewares=[request_context, errors],
        client_max_size=settings.max_request_bytes,
        handler_args={"max_field_size": 16384},
    )
    registry = registry if registry is not None else CollectorRegistry()
    app[MODEL_CATALOG] = ModelCatalog()
    app.cleanup_ctx.append(_lifespan(settings, registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(exposition or registry))
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/gateway/usage", usage)
    app.router.add_route("*", "/v1/{tail:.*}", handle)
    app.on_response_prepare.append(_stamp_answer)
    return app


def _lifespan(
    settings: Settings, registry: CollectorRegistry
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifespan(app: web.Application) -> AsyncIterator[None]:
        sims, upstreams = await _start_upstreams(settings)
        app[SIM_RUNNERS] = sims
        names = {route.tokenizer for route in settings.routes}
        tokenizers: dict[str, Tokenizer] = {
            name: await asyncio.to_thread(load_tokenizer, name) for name in names
        }
        limits = settings.limits
        limiter = create_limiter(limits.backend, limits.redis_url, limits.on_backend_error)
        metrics = GatewayMetrics(registry)
        spend = await create_spend_book(settings, metrics)
        app[COMPONENTS] = Components(
            settings=settings,
            metrics=metrics,
            router=Router(settings),
            auth=Authenticator(settings),
            tokenizers=tokenizers,
            upstreams=upstreams,
            limiter=limiter,
            inflight=InflightGate(limits.max_inflight, limits.queue_timeout_s),
            balancer=Balancer(settings, metrics),
            spend=spend,
        )
        watcher = asyncio.create_task(_watch_limiter(app[COMPONENTS]))
        if not settings.auth_enabled:
            log.warning("auth_disabled", reason="no teams configured: every request is anonymous")
        try:
            yield
        finally:
            watcher.cancel()
            await app[COMPONENTS].limiter.aclose()  # a reload may have replaced it
            await app[COMPONENTS].spend.aclose()  # after the drain: every request settled
            for client in upstreams.values():
                await client.aclose()
            for runner in sims:
                await runner.cleanup()

    return lifespan


async def _start_upstreams(
    settings: Settings,
) -> tuple[list[web.AppRunner], dict[str, UpstreamClient]]:
    sims: list[web.AppRunner] = []
    clients: dict[str, UpstreamClient] = {}
    for name, upstream in settings.upstreams.items():
        runner, clients[name] = await start_upstream(name, upstream)
        if runner is not None:
            sims.append(runner)
    return sims, clients


async def start_upstream(
    name: str, upstream: Upstream
) -> tuple[web.AppRunner | None, UpstreamClient]:
    """One upstream's client; for `simulator: {}`, the simulator's runner as well."""
    from .sim import SimDefaults, start_sim

    base_url = upstream.base_url
    runner = None
    if upstream.simulator is not None:
        options = SimDefaults(
            chunks=upstream.simulator.chunks,
            delay_ms=upstream.simulator.delay_ms,
            ttft_ms=upstream.simulator.ttft_ms,
        )
        runner, port = await start_sim("127.0.0.1", 0, options)
        base_url = f"http://127.0.0.1:{port}/v1"
    assert base_url is not None  # config check: base_url or simulator
    return runner, create_client(name, upstream, base_url)


async def _watch_limiter(comp: Components) -> None:
    """Mirror the limiter's degraded state into its gauge."""
    while True:
        degraded = comp.limiter.degraded or comp.spend.degraded
        comp.metrics.limits_degraded.set(1 if degraded else 0)
        await asyncio.sleep(1)


# -- middlewares, in the order they run -------------------------------------------------------


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if _REQUEST_ID.fullmatch(incoming) else _new_request_id()
    ctx = RequestContext(request_id=request_id, started=time.perf_counter())
    request[CTX] = ctx
    if request.path in PUBLIC_PATHS:
        return _close_if_body_unread(request, await handler(request))
    comp = request[REQUEST_COMPONENTS] = request.app[COMPONENTS]
    bound = REQUEST_ID.set(request_id)
    try:
        lifecycle = comp.lifecycle
        task = lifecycle.track()
        try:
            response = _close_if_body_unread(request, await handler(request))
        finally:
            lifecycle.untrack(task)
        ctx.sent_status = ctx.sent_status or response.status
        return response
    except asyncio.CancelledError:
        ctx.client_left = True  # aiohttp cancels the handler of a client that left
        raise
    finally:
        _account(comp, request, ctx, (time.perf_counter() - ctx.started) * 1000.0)
        REQUEST_ID.reset(bound)


def _close_if_body_unread(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """An answer to a request whose body the handler left unread says `Connection: close`.

    aiohttp reads such a body after the answer to keep the connection; if it cannot (a
    broken Content-Encoding), it drops the connection, and a client that sends its next
    request on it gets no answer at all. Requests that carry a body to an endpoint that
    takes none are rare: their connection is not worth the risk.
    """
    if not response.prepared and request.body_exists and not request.content.at_eof():
        response.force_close()
    return response


def _new_request_id() -> str:
    """32 random hex digits, as a uuid4's hex but without a system call: an id needs to be
    unique, not secret (`random` reseeds itself in each forked worker)."""
    return f"{random.getrandbits(128):032x}"


def _account(
    comp: Components, request: web.Request, ctx: RequestContext, duration_ms: float
) -> None:
    """How the request ended, decided once (gateway.outcome), into its metrics and log line."""
    ending = conclude(ctx)
    children = comp.metrics.children[ctx.team, ctx.model, ctx.upstream]
    children.requests[ending.status].inc()
    if ending.end == "client_disconnect":
        # whether or not its answer had begun: clients giving up on a slow first token
        # are the disconnects an operator most needs to see
        children.client_disconnects.inc()
    comp.request_log.info(
        "request", method=request.method, path=request.path, **ctx.log_fields(duration_ms)
    )


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx: RequestContext = request[CTX]
    try:
        if request.path not in PUBLIC_PATHS:
            comp = request[REQUEST_COMPONENTS]
            refuse_while_draining(comp)
            authenticate(comp, request, ctx)
        return await handler(request)
    except GatewayError as error:
        drop_tracebacks(error)  # raised from a frame that held it: no cycle left behind
        return _error(ctx, error)
    except web.HTTPException as exc:
        return _error(ctx, _from_http_exception(exc))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled_error")
        return _error(ctx, GatewayError("The gateway failed to handle this request."))


def _error(ctx: RequestContext, error: GatewayError) -> web.Response:
    ctx.error = error
    return error_response(error)


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return RequestTooLarge("The request body is too large.")
    if exc.status == 404:
        return ModelNotFound(f"Unknown path: {exc.reason}", code="not_found")
    return BadRequest(exc.reason or "Bad request", code=f"http_{exc.status}", status=exc.status)


def refuse_while_draining(comp: Components) -> None:
    if comp.lifecycle.draining:
        raise ServiceUnavailable(
            "The gateway is shutting down; retry on another replica.",
            code="draining",
            headers={"Retry-After": "1", "Connection": "close"},
        )


def authenticate(comp: Components, request: web.Request, ctx: RequestContext) -> None:
    """Name the request's team from its key (Unauthorized, a 401, for a bad one)."""
    caller = comp.auth.identify(request.headers.get("Authorization"))
    if caller is not None:
        request[CALLER] = caller
        ctx.team = caller.team.name
        ctx.key = None if caller.key is None else caller.key.name


# -- handlers that are not the proxy ----------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=_dumps)


async def readyz(request: web.Request) -> web.Response:
    if request.app[COMPONENTS].lifecycle.draining:
        return web.json_response({"status": "draining"}, status=503, dumps=_dumps)
    return web.json_response({"status": "ready"}, dumps=_dumps)


async def list_models(request: web.Request) -> web.Response:
    """Exact route names, and the models a pattern route's upstreams list (model_catalog)."""
    components = request.app[COMPONENTS]
    models = await request.app[MODEL_CATALOG].listed(components.router, components.upstreams)
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "gateway"} for m in models]
    return web.json_response({"object": "list", "data": data}, dumps=_dumps)


async def usage(request: web.Request) -> web.Response:
    """The caller's own team's and key's spend and remaining budgets (never another team's)."""
    caller = request.get(CALLER)
    if caller is None:
        raise BadRequest("Usage is kept per team: this gateway has no teams configured.")
    comp = request.app[COMPONENTS]
    return web.json_response(await comp.spend.usage(caller.team, caller.key), dumps=_dumps)


def _dumps(obj: object) -> str:
    return orjson.dumps(obj).decode()


async def _stamp_answer(request: web.Request, response: web.StreamResponse) -> None:
    """The request's `x-request-id`, and `Server: llm-stream-gateway`, not aiohttp's default
    that names Python's and its own version (set before this hook runs; the head is written
    after it). One hook, not two: each is a coroutine run for every answer."""
    ctx: RequestContext | None = request.get(CTX)
    if ctx is not None:
        response.headers["x-request-id"] = ctx.request_id
    response.headers[hdrs.SERVER] = SERVER_NAME
