"""The accounting side of one proxied request: admission, live token counts, settlement.

An `Exchange` is created at admission (prompt estimate, token reservation, team limits),
hands the relay its plan (meter, live counters, budget check), and settles at the end: the
final tally (the upstream's usage when it sent one), the metrics that only the end knows, and
the unused token reservation returned to the limiter. Metric children are looked up once per
request, never per chunk. A stream's meter is fed through the process's `MeterBatch`
(gateway.batch): pieces are metered a few milliseconds after they went out, many streams at
once, and `final_tally` meters what still waits before it reads the counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import Counter

from .accounting import JsonMeter, StreamMeter, Tally
from .config import Team
from .context import RequestContext
from .errors import GatewayError, RateLimitExceeded, ServiceUnavailable
from .limits import Admission, BackendUnavailable, LimitSpec, RateLimited
from .metrics import BatchedObserver, finish_reason_label
from .relay import Observer, RelayPlan, RelayResult
from .routing import RouteMatch
from .sse import ends_frame
from .tokens import Tokenizer, estimate_prompt_tokens

if TYPE_CHECKING:
    from .components import Components
    from .upstream import Opened

#: above this many body bytes, the prompt estimate runs in a thread, off the event loop
ESTIMATE_IN_THREAD_BYTES = 64 * 1024
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class LiveCount:
    """The meter's sink: counts tokens into the metrics as they pass, charges the limiter.

    Every admission is charged (the team's, and the team's budget for this model if it has
    one), so the cut policy sees whichever budget is crossed first.
    """

    __slots__ = ("_admissions", "_completion", "_reasoning", "completion", "over", "reasoning")

    def __init__(self, completion: Any, reasoning: Any, admissions: list[Admission]) -> None:
        self._completion, self._reasoning, self._admissions = completion, reasoning, admissions
        self.completion = self.reasoning = 0
        self.over = False

    def add(self, completion: int, reasoning: int) -> None:
        self.completion += completion
        self._completion.inc(completion)
        if reasoning:
            self.reasoning += reasoning
            self._reasoning.inc(reasoning)
        for admission in self._admissions:
            if admission.charge(completion):
                self.over = True


class FrameEdge:
    """An observer in front of another that knows whether the bytes so far end an SSE frame.

    A frame ends with an empty line; lines end with LF, CR or CRLF. Only the last few bytes
    are kept, so this costs nothing per chunk but a slice.
    """

    __slots__ = ("_inner", "_tail")

    def __init__(self, inner: Observer) -> None:
        self._inner = inner
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self._inner.feed(chunk)
        self._tail = (self._tail + chunk[-3:])[-3:]

    @property
    def at_frame_end(self) -> bool:
        return ends_frame(self._tail)


class Exchange:
    def __init__(
        self,
        comp: Components,
        ctx: RequestContext,
        match: RouteMatch,
        prompt_estimate: int,
        admissions: list[Admission],
    ) -> None:
        self.comp, self.ctx, self.match = comp, ctx, match
        self.prompt_estimate = prompt_estimate
        self.admissions = admissions
        self.tokenizer: Tokenizer = comp.tokenizers[match.route.tokenizer]
        self.meter: StreamMeter | JsonMeter | None = None
        self.live: LiveCount | None = None
        #: the body sent to `usage: inject` upstreams asks for usage the client did not
        self.injected = False
        self._stream_started: float | None = None
        self._gaps: BatchedObserver | None = None
        self._settled = False

    # -- admission ---------------------------------------------------------------------------

    @classmethod
    async def admit(
        cls,
        comp: Components,
        ctx: RequestContext,
        team: Team | None,
        match: RouteMatch,
        doc: dict[str, Any] | None,
        body: bytes,
    ) -> Exchange:
        tokenizer = comp.tokenizers[match.route.tokenizer]
        estimate = await _estimate(doc, body, tokenizer)
        admissions: list[Admission] = []
        if team is not None:
            reserve = estimate + _max_tokens(doc, comp.settings.limits.default_max_tokens)
            admissions = await _admit_team(comp, ctx, team, match, reserve, estimate)
        return cls(comp, ctx, match, estimate, admissions)

    @property
    def limit_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for admission in self.admissions:
            headers.update(admission.headers)
        return headers

    def injected_body(self, doc: dict[str, Any] | None) -> bytes | None:
        """With `usage: inject`, the body asking upstream for include_usage (None if not needed)."""
        if doc is None or doc.get("stream") is not True:
            return None
        options = doc.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return None
        if not any(
            self.comp.upstreams[name].settings.usage == "inject"
            for name in self.match.route.upstreams
        ):
            return None
        merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        self.injected = True
        return orjson.dumps({**doc, "stream_options": merged})

    def on_upstream_error(self, upstream: str, reason: str) -> None:
        self.comp.metrics.upstream_errors.labels(upstream, reason).inc()

    # -- the stream ---------------------------------------------------------------------------

    async def prepare_stream(
        self, request: web.Request, status: int, headers: Mapping[str, str]
    ) -> web.StreamResponse:
        """The client's answer, prepared; its head goes out with the first write, which the
        caller makes at once (the upstream's first piece, or a keep-alive comment)."""
        resp = HeadWithFirstWrite(status=status, headers=headers)
        resp.headers.update(self.limit_headers)
        if self.ctx.stream:
            resp.headers.update(SSE_HEADERS)
        self.ctx.status = status
        await resp.prepare(request)
        return resp

    def relay_plan(self, opened: Opened) -> RelayPlan:
        comp, ctx = self.comp, self.ctx
        content_type = opened.response.headers.get("Content-Type", "")
        sse = content_type.startswith("text/event-stream")
        ctx.stream = sse
        now = time.perf_counter()
        ctx.ttft_ms = (now - ctx.started) * 1000.0
        self._stream_started = now
        cut = comp.settings.limits.on_token_budget_exceeded == "cut"
        plan = RelayPlan(observer=None, write_stall_s=comp.settings.limits.write_stall_timeout_s)
        plan.sse = sse
        if sse:
            comp.metrics.ttft.labels(ctx.model, opened.upstream.name).observe(ctx.ttft_ms / 1000)
            comp.metrics.active_streams.labels(ctx.team, ctx.model).inc()
            self._gaps = comp.metrics.gaps(ctx.model)
            plan.on_chunk_gap = self._gaps.observe
        if not self.match.route.accounting:
            return plan
        tokens = comp.metrics.tokens
        self.live = LiveCount(
            tokens.labels(ctx.team, ctx.model, "completion"),
            tokens.labels(ctx.team, ctx.model, "reasoning"),
            self.admissions,
        )
        if sse:
            meter = StreamMeter(self.tokenizer, self.live, self.prompt_estimate)
            self.meter = meter
            if self.injected_body_sent(opened):
                plan.frame_filter = meter
            else:
                plan.observer = comp.metrics.batch.defer(meter.feed)
            if cut and self.admissions:
                plan.over_budget = self._cut_check(plan)
        else:
            self.meter = JsonMeter(self.tokenizer, self.prompt_estimate)
            plan.observer = self.meter
        return plan

    def _cut_check(self, plan: RelayPlan) -> Callable[[], bool]:
        """When to cut an over-budget stream: only where an SSE frame ends.

        The relay writes upstream reads as they come, and a read may end inside an event;
        an error event written there would be glued to half a chunk, which no client can
        parse. With `usage: inject` the relay writes whole frames only, so any read will do.
        """
        live = self.live
        assert live is not None
        if plan.observer is None:
            return lambda: live.over
        edge = FrameEdge(plan.observer)
        plan.observer = edge
        return lambda: live.over and edge.at_frame_end

    def injected_body_sent(self, opened: Opened) -> bool:
        """Whether this upstream got our include_usage: only then is its usage event hidden.

        A client that asked for usage itself gets the upstream's stream unchanged.
        """
        return self.injected and opened.upstream.settings.usage == "inject" and self.ctx.stream

    def final_tally(self) -> Tally | None:
        """The meter's tally, every relayed piece metered (see gateway.batch); idempotent."""
        if self.meter is None:
            return None
        self.comp.metrics.batch.flush()
        return self.meter.finish()

    def stream_tally(self) -> Tally | None:
        """`final_tally` of a streamed answer; None for a JSON one or with accounting off."""
        return self.final_tally() if isinstance(self.meter, StreamMeter) else None

    def finish(self, result: RelayResult) -> None:
        self.ctx.end = result.outcome
        if result.error is not None:
            self.fail(result.error)

    def fail(self, error: GatewayError) -> None:
        """An error after the client got its first bytes (it was sent as an SSE event)."""
        self.ctx.error_code = error.code
        if self.ctx.end == "completed":
            self.ctx.end = "upstream_error"
        if error.reason is not None:
            self.comp.metrics.upstream_errors.labels(self.ctx.upstream, error.reason).inc()

    # -- settlement ---------------------------------------------------------------------------

    async def settle(self) -> None:
        """Final tally, end-of-request metrics, and the limiter's unused reservation returned."""
        if self._settled:
            return
        self._settled = True
        tally = self.final_tally()
        if tally is not None:
            self._record(tally)
        self._record_stream_end()
        self._record_disconnect()
        used = self.ctx.prompt_tokens + self.ctx.completion_tokens
        for admission in self.admissions:
            await admission.settle(used if tally is not None else self.prompt_estimate)

    def _record(self, tally: Tally) -> None:
        ctx, metrics = self.ctx, self.comp.metrics
        ctx.prompt_tokens = tally.prompt_tokens
        ctx.completion_tokens = tally.completion_tokens
        ctx.reasoning_tokens = tally.reasoning_tokens
        ctx.usage_source = tally.usage_source
        ctx.chunks = tally.chunks
        ctx.finish_reason = tally.finish_reason
        tokens = metrics.tokens
        tokens.labels(ctx.team, ctx.model, "prompt").inc(tally.prompt_tokens)
        live_completion = self.live.completion if self.live else 0
        live_reasoning = self.live.reasoning if self.live else 0
        _inc_by_missing(
            tokens.labels(ctx.team, ctx.model, "completion"),
            tally.completion_tokens,
            live_completion,
        )
        _inc_by_missing(
            tokens.labels(ctx.team, ctx.model, "reasoning"), tally.reasoning_tokens, live_reasoning
        )
        for reason in tally.finish_reasons or (None,):
            metrics.finish_reasons.labels(ctx.model, finish_reason_label(reason)).inc()
        if tally.usage_source == "upstream":
            metrics.usage_estimated.labels(ctx.model).inc(tally.estimated_completion)
            metrics.usage_upstream.labels(ctx.model).inc(tally.completion_tokens)
        if tally.decode_errors:
            metrics.decode_errors.labels(ctx.model).inc(tally.decode_errors)

    def _record_stream_end(self) -> None:
        if self._gaps is not None:
            self._gaps.flush()
        if self._stream_started is None or not self.ctx.stream:
            return
        ctx, metrics = self.ctx, self.comp.metrics
        metrics.active_streams.labels(ctx.team, ctx.model).dec()
        duration = time.perf_counter() - ctx.started
        metrics.stream_duration.labels(ctx.model, ctx.upstream).observe(duration)

    def _record_disconnect(self) -> None:
        """A client that went away is counted whether or not its answer had begun: clients
        giving up on a slow first token are the disconnects an operator most needs to see."""
        if self.ctx.end == "client_disconnect":
            self.comp.metrics.client_disconnects.labels(self.ctx.team, self.ctx.model).inc()


class HeadWithFirstWrite(web.StreamResponse):
    """A streamed answer whose head waits for the first body write and leaves in the same
    `transport.write`: one TCP segment and one system call less per request.

    aiohttp buffers a prepared head and coalesces it with the first write when this class
    attribute is off, as it is for its own `web.Response`; a `StreamResponse` sends the head
    alone at `prepare()` by default.
    """

    _send_headers_immediately = False


def _inc_by_missing(counter: Counter, final: int, counted: int) -> None:
    """Counters only grow: add what the live count missed (an overcount stays, as drift)."""
    if final > counted:
        counter.inc(final - counted)


async def _estimate(doc: dict[str, Any] | None, body: bytes, tokenizer: Tokenizer) -> int:
    if doc is None:
        return 0
    if len(body) > ESTIMATE_IN_THREAD_BYTES:
        return await asyncio.to_thread(estimate_prompt_tokens, doc, tokenizer)
    return estimate_prompt_tokens(doc, tokenizer)


def _max_tokens(doc: dict[str, Any] | None, default: int) -> int:
    if doc is None:
        return 0
    for key in ("max_completion_tokens", "max_tokens"):
        value = doc.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return default


async def _admit_team(
    comp: Components,
    ctx: RequestContext,
    team: Team,
    match: RouteMatch,
    reserve: int,
    prompt_tokens: int,
) -> list[Admission]:
    """The team's limits, then the team's limits for this model, if any; all or nothing."""
    specs = [(f"team:{team.name}", team.limits)]
    model_limits = team.model_limits.get(match.label)
    if model_limits is not None:
        specs.append((f"team:{team.name}:model:{match.label}", model_limits))
    admissions: list[Admission] = []
    try:
        for key, limits in specs:
            spec = LimitSpec(
                requests_per_minute=limits.requests_per_minute,
                tokens_per_minute=limits.tokens_per_minute,
                concurrent_streams=limits.concurrent_streams,
            )
            admissions.append(
                await comp.limiter.admit(
                    key, spec, reserve, ctx.stream, prompt_tokens=prompt_tokens
                )
            )
    except RateLimited as limited:
        await _release(admissions)
        comp.metrics.rate_limited.labels(ctx.team, limited.limit).inc()
        ctx.end = "limit"
        raise RateLimitExceeded(str(limited), headers=limited.headers) from None
    except BackendUnavailable:
        await _release(admissions)
        ctx.end = "limit"
        raise ServiceUnavailable(
            "The shared limits backend is unreachable.",
            code="limits_unavailable",
            headers={"Retry-After": "1"},
        ) from None
    return admissions


async def _release(admissions: list[Admission]) -> None:
    for admission in admissions:
        await admission.settle(0)
