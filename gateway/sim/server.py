"""The simulator's aiohttp application, and starting it on a port.

A request's route, in the order it runs:

    _observe (record the request, count the handler, map errors to OpenAI's shape)
      -> handler: read the JSON body and its `sim` steering (400 if either is bad)
        -> `headers_delay_ms`, then an early fault or status (reset, HTML 500, redirect, error)
          -> a streamed answer (stream.write_stream) or a whole one (answers.whole_answer)

Routes: POST /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings;
GET /v1/models, /v1/responses/{id} (the responses this simulator made, bounded); and two
control paths that SimState neither records nor counts: GET /sim/state (SimState's counters,
for a simulator in another process) and /sim/redirected (where the `redirect` fault points).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gateway.tokens import Tokenizer, estimate_prompt_tokens, load_tokenizer

from .answers import embeddings, model_list, whole_answer
from .connection import drop, pause, reset
from .events import ChunkEncoder, Kind, error_body
from .responses import Draft, ResponseShape, whole_response
from .state import SIM_STATE, RecordedRequest, SimState
from .steering import Plan, SimDefaults, SteeringError, read_steering, resolve
from .stream import STALL_S, ChatShape, Shape, write_stream

SIM_DEFAULTS = web.AppKey("sim_defaults", SimDefaults)
#: the gateway's default tokenizer: the simulator's usage is what the gateway counts with it
SIM_TOKENIZER = web.AppKey("sim_tokenizer", Tokenizer)
TOKENIZER = "o200k_base"
#: request bodies at least this large have their prompt counted off the event loop
OFF_LOOP_PROMPT_BYTES = 64 * 1024

#: request bodies up to this size are read (aiohttp's default is 1 MiB)
MAX_REQUEST_BYTES = 64 * 1024 * 1024
#: how long runner.cleanup() lets in-flight handlers finish before cancelling them
SHUTDOWN_TIMEOUT_S = 1.0
MAX_CHOICES = 128
#: the simulator's own paths: neither recorded nor counted in SimState
CONTROL_PREFIX = "/sim/"
REDIRECT_TARGET = CONTROL_PREFIX + "redirected"

HTML_500 = (
    b"<html>\r\n<head><title>500 Internal Server Error</title></head>\r\n<body>\r\n"
    b"<center><h1>500 Internal Server Error</h1></center>\r\n</body>\r\n</html>\r\n"
)

#: OpenAI's error `type` and `code` by status, for `status` steering and the simulator's own errors
ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", None),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """The request cannot be answered: a 400 in OpenAI's shape."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def error_response(
    status: int, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    type_, code = ERROR_KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return web.Response(
        status=status,
        body=orjson.dumps(error_body(message, type_, code, param)),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def _observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(CONTROL_PREFIX):
        return await handler(request)
    state = request.app[SIM_STATE]
    state.handler_started()
    try:
        state.record(await _recorded(request))
        return await handler(request)
    except BadRequest as exc:
        return error_response(400, exc.message, param=exc.param)
    except SteeringError as exc:
        return error_response(400, str(exc), param="sim")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, exc.reason, headers=allow)
    except ConnectionError:  # the client left before the answer began
        return web.Response()
    finally:
        state.handler_ended()


async def _recorded(request: web.Request) -> RecordedRequest:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return RecordedRequest(
        method=request.method,
        path=request.path,
        query_string=request.query_string,
        headers=request.headers,
        body=await request.read(),
        peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else None,
    )


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you"
            " aren't using your HTTP library correctly.)"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    return body


def _plan(request: web.Request, body: dict[str, Any], kind: Kind) -> Plan:
    steer = read_steering(body.get("sim"), request.headers.get("x-sim"))
    tokenizer = request.app[SIM_TOKENIZER]
    return resolve(steer, request.app[SIM_DEFAULTS], kind=kind, tokenizer=tokenizer)


async def _prompt_tokens(request: web.Request, body: dict[str, Any]) -> int:
    """The gateway's prompt estimate of `body`; a big body is counted in a thread."""
    tokenizer = request.app[SIM_TOKENIZER]
    if (request.content_length or 0) < OFF_LOOP_PROMPT_BYTES:
        return estimate_prompt_tokens(body, tokenizer)
    return await asyncio.to_thread(estimate_prompt_tokens, body, tokenizer)


def _early_answer(request: web.Request, plan: Plan) -> web.StreamResponse | None:
    """The answer of a fault or `status` that replaces the whole response, if any."""
    if plan.fault == "reset_before_headers":
        reset(request)
        return web.Response()  # never sent: the connection is gone
    if plan.fault == "html_500":
        return web.Response(status=500, body=HTML_500, content_type="text/html")
    if plan.fault == "redirect":
        return web.Response(status=302, headers={"Location": REDIRECT_TARGET})
    if plan.status is not None:
        headers = None if plan.retry_after is None else {"Retry-After": f"{plan.retry_after:g}"}
        return error_response(plan.status, f"sim: status {plan.status} as steered", headers=headers)
    return None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, "text")


def _model_and_n(body: dict[str, Any], kind: Kind) -> tuple[str, int]:
    """The fields a completion request cannot do without, checked as OpenAI checks them."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    if kind == "chat" and not isinstance(body.get("messages"), list):
        raise BadRequest("'messages' is a required property", "messages")
    n = 1 if body.get("n") is None else body["n"]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise BadRequest(f"n must be an integer from 1 to {MAX_CHOICES}", "n")
    return model, n


async def _complete(request: web.Request, kind: Kind) -> web.StreamResponse:
    body = await _json_object(request)
    model, n = _model_and_n(body, kind)
    plan = _plan(request, body, kind)
    await pause(request, plan.headers_delay_s)
    if (early := _early_answer(request, plan)) is not None:
        return early
    response_id = (
        f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-sim{request.app[SIM_STATE].next_id()}"
    )
    created = int(time.time())
    prompt_tokens = await _prompt_tokens(request, body)
    if body.get("stream") is True:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        enc = ChunkEncoder(
            kind, response_id=response_id, created=created, model=model, include_usage=include_usage
        )
        shape = ChatShape(enc, plan, n=n, prompt_tokens=prompt_tokens, include_usage=include_usage)
        return await _stream(request, shape, plan)
    answer = whole_answer(
        kind, plan, response_id=response_id, created=created, model=model, n=n,
        prompt_tokens=prompt_tokens,
    )  # fmt: skip
    return await _whole(request, orjson.dumps(answer), plan)


async def _stream(request: web.Request, shape: Shape, plan: Plan) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):  # the client left, or a fault reset the line
        await write_stream(request, resp, shape, plan)
    return resp


async def responses_endpoint(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses, streamed or whole; the answer is kept for GET /v1/responses/{id}."""
    body = await _json_object(request)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("you must provide a model parameter", "model")
    state = request.app[SIM_STATE]
    previous = body.get("previous_response_id")
    if previous is not None and previous not in state.responses:
        return _previous_not_found(previous)
    plan = _within_max_output_tokens(_plan(request, body, "responses"), body)
    await pause(request, plan.headers_delay_s)
    if (early := _early_answer(request, plan)) is not None:
        return early
    response_id = f"resp_sim{state.tag}_{state.next_id()}"
    input_tokens = await _prompt_tokens(request, body)
    draft = Draft(plan, body, response_id=response_id, input_tokens=input_tokens)
    keep = body.get("store") is not False  # `store: false`: OpenAI keeps nothing to GET
    if body.get("stream") is True:
        shape = ResponseShape(draft)
        resp = await _stream(request, shape, plan)
        if shape.last is not None and keep:
            state.store_response(shape.last)
        return resp
    answer = whole_response(draft)
    if keep:
        state.store_response(answer)
    return await _whole(request, orjson.dumps(answer), plan)


def _within_max_output_tokens(plan: Plan, body: dict[str, Any]) -> Plan:
    """With `max_output_tokens` smaller than the answer, it stops after the last token piece
    that fits, as `incomplete` (the reason OpenAI gives: max_output_tokens)."""
    limit = body.get("max_output_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or plan.fault is not None:
        return plan
    fits, used = 0, 0
    for part in (plan.reasoning, plan.content, plan.arguments):
        for tokens in part.tokens:
            used += tokens
            if used > limit:
                return dataclasses.replace(plan, fault="incomplete", fail_after=fits)
            fits += 1
    return plan


def _previous_not_found(previous: Any) -> web.Response:
    body = error_body(
        f"Previous response with id '{previous}' not found.",
        "invalid_request_error",
        "previous_response_not_found",
        "previous_response_id",
    )
    return web.Response(status=400, body=orjson.dumps(body), content_type="application/json")


async def response_get_endpoint(request: web.Request) -> web.StreamResponse:
    response_id = request.match_info["response_id"]
    found = request.app[SIM_STATE].responses.get(response_id)
    if found is None:
        return error_response(404, f"No response found with id '{response_id}'.")
    return web.Response(body=orjson.dumps(found), content_type="application/json")


async def _whole(request: web.Request, payload: bytes, plan: Plan) -> web.StreamResponse:
    """A non-streamed answer, and the faults that apply to one."""
    if plan.fault == "invalid_json":
        payload = payload[: len(payload) // 2]
    elif plan.fault == "gzip":
        return web.Response(
            body=gzip.compress(payload),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
    elif plan.fault in ("reset_mid_stream", "stall"):
        return await _broken_body(request, payload, stall=plan.fault == "stall")
    return web.Response(body=payload, content_type="application/json")


async def _broken_body(request: web.Request, payload: bytes, *, stall: bool) -> web.StreamResponse:
    """Headers announcing `payload`; then half of it and a dropped connection, or silence."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = len(payload)
    await resp.prepare(request)
    with contextlib.suppress(ConnectionError):  # the client left
        if stall:
            await pause(request, STALL_S)
        else:
            await resp.write(payload[: len(payload) // 2])
        drop(request)
    return resp


async def embeddings_endpoint(request: web.Request) -> web.StreamResponse:
    body = await _json_object(request)
    plan = _plan(request, body, "chat")
    await pause(request, plan.headers_delay_s)
    if (early := _early_answer(request, plan)) is not None:
        return early
    answer = embeddings(body, await _prompt_tokens(request, body))
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def models_endpoint(request: web.Request) -> web.StreamResponse:
    models = model_list(request.app[SIM_DEFAULTS].models)
    return web.Response(body=orjson.dumps(models), content_type="application/json")


async def state_endpoint(request: web.Request) -> web.StreamResponse:
    return web.json_response(request.app[SIM_STATE].snapshot())


async def redirected_endpoint(request: web.Request) -> web.StreamResponse:
    return web.json_response({"object": "sim.redirected", "method": request.method})


def create_sim_app(options: SimDefaults | None = None) -> web.Application:
    """The simulator as an aiohttp application; its SimState is `app[SIM_STATE]`."""
    options = options or SimDefaults()
    app = web.Application(middlewares=[_observe], client_max_size=MAX_REQUEST_BYTES)
    app[SIM_DEFAULTS] = options
    app[SIM_STATE] = SimState.new(options.record_limit)
    app.on_startup.append(_load_tokenizer)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/responses", responses_endpoint)
    app.router.add_get("/v1/responses/{response_id}", response_get_endpoint)
    app.router.add_post("/v1/embeddings", embeddings_endpoint)
    app.router.add_get("/v1/models", models_endpoint)
    app.router.add_get(CONTROL_PREFIX + "state", state_endpoint)
    app.router.add_route("*", REDIRECT_TARGET, redirected_endpoint)
    return app


async def _load_tokenizer(app: web.Application) -> None:
    """Read the BPE table once per process (a file read: in a thread, off the event loop)."""
    app[SIM_TOKENIZER] = await asyncio.to_thread(load_tokenizer, TOKENIZER)


async def start_sim(
    host: str = "127.0.0.1", port: int = 0, options: SimDefaults | None = None
) -> tuple[web.AppRunner, int]:
    """Serve the simulator on host:port (0: a free port); the caller awaits runner.cleanup().

    Handlers are cancelled when their client disconnects, the access log is off, and the
    app's SimState counts connections. `runner.app[SIM_STATE]` is that state.
    """
    app = create_sim_app(options)
    runner = web.AppRunner(
        app, access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    try:
        assert runner.server is not None  # set by setup()
        app[SIM_STATE].watch(runner.server)
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port: int = runner.addresses[0][1]
    return runner, bound_port


@dataclass(frozen=True, slots=True)
class RunningSim:
    runner: web.AppRunner
    port: int
    state: SimState
    #: what an OpenAI client takes as base_url: http://host:port/v1
    base_url: str


@asynccontextmanager
async def running_sim(
    options: SimDefaults | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[RunningSim]:
    """`start_sim` on a free port for the length of an `async with`."""
    runner, port = await start_sim(host, 0, options)
    try:
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        yield RunningSim(runner, port, runner.app[SIM_STATE], f"http://{netloc}/v1")
    finally:
        await runner.cleanup()
