"""Live accounting of one request: what the relay meters, counted into the metrics and charged
to the limiter while the answer runs, then settled once it ended.

A `Ledger` is opened once the request is admitted. When the upstream answered, `plan` builds
the relay's whole plan (the meter behind the batch, the live counters and budget charge, the
gap histogram, the budget cut, the check that a completion stream was not cut short). `settle`
takes the final tally (the upstream's usage when it sent one), records the metrics that only
the end knows, and returns the unused token reservation. Metric children are looked up once per
label values (`metrics.RequestChildren`): a request reaches them with one subscript, never per
chunk. A stream's meter is fed through the process's `MeterBatch`
(gateway.meter_batch): pieces are metered a few milliseconds after they went out, many streams
at once, and `final_tally` meters what still waits before it reads the counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from .admission import Admitted
from .context import RequestContext
from .errors import GatewayError, UpstreamError, stream_error_event
from .limits import Admission
from .meter import MAX_EVENT_BYTES, JsonMeter, ResponsesMeter, StreamMeter, Tally
from .metrics import BatchedObserver, RequestChildren
from .relay import Observer, RelayPlan
from .routing import RouteMatch
from .spend import Bill
from .sse import ends_frame

if TYPE_CHECKING:
    from .app_state import Components
    from .upstream import Opened

#: streams that end with `finish_reason` or `[DONE]`: one that ends with neither was cut short
COMPLETION_ENDPOINTS = frozenset({"chat/completions", "completions"})
#: the Responses API's create endpoint: typed events, ending with a terminal one
RESPONSES = "responses"
#: the start of a Responses API stream, whatever path it came on
_RESPONSES_STREAM = b"event: response."


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


class Ledger:
    __slots__ = (
        "_gaps",
        "_settled",
        "_stream_started",
        "_tally",
        "admitted",
        "bill",
        "children",
        "comp",
        "ctx",
        "live",
        "match",
        "meter",
        "responses",
    )

    def __init__(
        self,
        comp: Components,
        ctx: RequestContext,
        match: RouteMatch,
        admitted: Admitted,
        tail: str,
    ) -> None:
        self.comp, self.ctx, self.match, self.admitted = comp, ctx, match, admitted
        #: whether the answer speaks the Responses API's events (the path after /v1/ says so,
        #: or the stream's first event: see `plan`)
        self.responses = tail == RESPONSES
        self.meter: StreamMeter | ResponsesMeter | JsonMeter | None = None
        self.live: LiveCount | None = None
        self._stream_started: float | None = None
        self._gaps: BatchedObserver | None = None
        self._settled = False
        self.bill: Bill | None = None
        #: the final tally, once taken (see `final_tally`)
        self._tally: Tally | None = None
        #: the metric children of this request's labels, once it has its upstream (`plan`)
        self.children: RequestChildren | None = None

    # -- the answer ---------------------------------------------------------------------------

    def plan(
        self,
        opened: Opened,
        transport: asyncio.WriteTransport | None,
        tail: str,
        injected: bool,
    ) -> RelayPlan:
        """The relay's plan for the upstream answer `opened`, whole: the one place it is built.

        `injected`: the request asked `usage: inject` upstreams for the include_usage the
        client did not ask for. If this upstream got it, the relay writes whole frames and
        hides the usage-only event; a client that asked for usage gets the stream unchanged.
        """
        comp, ctx = self.comp, self.ctx
        children = comp.metrics.children[ctx.team, ctx.model, opened.upstream.name]
        self.children = children
        content_type = opened.response.headers.get("Content-Type", "")
        sse = content_type.startswith("text/event-stream")
        ctx.stream = sse
        now = time.perf_counter()
        ctx.ttft_ms = (now - ctx.started) * 1000.0
        self._stream_started = now
        plan = RelayPlan(observer=None, write_stall_s=comp.settings.limits.write_stall_timeout_s)
        plan.sse = sse
        plan.client_transport = transport
        if sse:
            children.ttft.observe(ctx.ttft_ms / 1000)
            children.active_streams.inc()
            self._gaps = children.gaps
            plan.on_chunk_gap = self._gaps.observe
            # a Responses API stream, by its path or by its first event (once per request)
            self.responses = self.responses or opened.first_chunk.startswith(_RESPONSES_STREAM)
            plan.error_event = self.error_event
        if not self.match.route.accounting or tail.startswith("responses/"):
            return plan  # (reading a stored response again is not a new answer to count)
        self.live = LiveCount(
            children.completion_tokens, children.reasoning_tokens, self.admitted.admissions
        )
        admitted = self.admitted
        self.bill = comp.spend.open(
            self.live,
            admitted.prompt_estimate,
            admitted.rates,
            admitted.subjects,
            (ctx.team, ctx.model),
        )
        tokenizer = comp.tokenizers[self.match.route.tokenizer]
        estimate = self.admitted.prompt_estimate
        if not sse:
            self.meter = plan.observer = JsonMeter(tokenizer, estimate)
            return plan
        if self.responses:
            meter: StreamMeter | ResponsesMeter
            meter = ResponsesMeter(tokenizer, self.live, estimate, self._remember_response)
            plan.observer = comp.metrics.batch.defer(meter.feed)
        else:
            meter = StreamMeter(tokenizer, self.live, estimate)
            if injected and opened.upstream.settings.usage == "inject":
                plan.frame_filter = meter
            else:
                plan.observer = comp.metrics.batch.defer(meter.feed)
        self.meter = meter
        cut = comp.settings.limits.on_token_budget_exceeded == "cut"
        if cut and (self.admitted.admissions or any(s.caps for s in self.admitted.subjects)):
            plan.over_budget = self._cut_check(plan)
        if tail in COMPLETION_ENDPOINTS or self.responses:
            plan.end_check = self.cut_short
        return plan

    def error_event(self, error: GatewayError) -> bytes:
        """The event that ends this stream with `error`, in its endpoint's shape (a Responses
        API stream's carries the sequence number after the last event relayed)."""
        sequence = 0
        if isinstance(self.meter, ResponsesMeter):
            self.comp.metrics.batch.flush()
            sequence = self.meter.next_sequence_number
        return stream_error_event(error, self.responses, sequence)

    def _remember_response(self, response_id: str) -> None:
        """The upstream answering created this response: requests about it go there."""
        self.comp.responses.remember(response_id, self.ctx.upstream, self.comp.limiter)

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

    def cut_short(self) -> GatewayError | None:
        """A completion stream that ended with no finish_reason, no [DONE] and no error event
        was cut short: without a word, the client would take half an answer for a whole one.

        A stream with a finish_reason but no [DONE] is whole (some upstreams never send it).
        """
        tally = self.stream_tally()  # idempotent: settle() takes the same tally
        if (
            tally is None
            or tally.saw_done
            or tally.finish_reasons
            or tally.upstream_error is not None
            or tally.oversized_events  # (too large to read: it may have been the last one)
        ):
            return None
        missing = "no terminal event" if self.responses else "no finish_reason, no [DONE]"
        return UpstreamError(
            f"The upstream ended the stream before it was complete ({missing}).",
            code="upstream_truncated",
            reason="truncated",
        )

    def upstream_error_event(self) -> GatewayError | None:
        """The upstream ended its stream with its own `data: {"error": ...}` event: relayed as
        it is, and the request counts as an upstream error rather than a completed stream."""
        tally = self.stream_tally()
        error = tally.upstream_error if tally is not None else None
        if error is None:
            return None
        code = error.get("code")
        return UpstreamError(
            "The upstream ended the stream with an error event.",
            code=code if isinstance(code, str) and code else "upstream_error_event",
            reason="error_event",
        )

    def final_tally(self) -> Tally | None:
        """The meter's tally, every relayed piece metered (see gateway.meter_batch).

        Taken once, when the answer ended (the end check, the error-event check and `settle`
        all ask): nothing is fed to the meter after that, so the first tally is the final one.
        """
        tally = self._tally
        if tally is None and self.meter is not None:
            self.comp.metrics.batch.flush()
            tally = self._tally = self.meter.finish()
        return tally

    def stream_tally(self) -> Tally | None:
        """`final_tally` of a streamed answer; None for a JSON one or with accounting off."""
        streamed = isinstance(self.meter, (StreamMeter, ResponsesMeter))
        return self.final_tally() if streamed else None

    # -- settlement ---------------------------------------------------------------------------

    async def settle(self) -> None:
        """Final tally, end-of-request metrics, and the limiter's unused reservation returned."""
        if self._settled:
            return
        self._settled = True
        tally = self.final_tally()
        if tally is not None:
            self._record(tally)
            if tally.response_id is not None and isinstance(self.meter, JsonMeter):
                self._remember_response(tally.response_id)
        self._record_stream_end()
        ctx = self.ctx
        used = ctx.prompt_tokens + ctx.completion_tokens
        await self.admitted.settle(used if tally is not None else self.admitted.prompt_estimate)
        if self.bill is not None:
            cached = (tally.cached_prompt_tokens or 0) if tally is not None else 0
            cost = await self.comp.spend.settle(
                self.bill, ctx.prompt_tokens, cached, ctx.completion_tokens
            )
            ctx.cost_usd = round(cost, 12)

    def _record(self, tally: Tally) -> None:
        ctx, children = self.ctx, self.children
        assert children is not None  # a meter is planned with the children (`plan`)
        ctx.prompt_tokens = tally.prompt_tokens
        ctx.completion_tokens = tally.completion_tokens
        ctx.reasoning_tokens = tally.reasoning_tokens
        ctx.usage_source = tally.usage_source
        ctx.chunks = tally.chunks
        ctx.metered_finish = tally.finish_reason
        children.prompt_tokens.inc(tally.prompt_tokens)
        live_completion = self.live.completion if self.live else 0
        live_reasoning = self.live.reasoning if self.live else 0
        # an overcount is paid off later (gateway.debt)
        children.completion_tokens.settle(tally.completion_tokens, live_completion)
        children.reasoning_tokens.settle(tally.reasoning_tokens, live_reasoning)
        if self.admitted.rates is None:
            unpriced = tally.prompt_tokens + tally.completion_tokens
            children.unpriced_tokens.inc(unpriced)
        for reason in tally.finish_reasons or (None,):
            children.finish_reasons[reason].inc()
        if tally.usage_source == "upstream":
            children.usage_estimated.inc(tally.estimated_completion)
            children.usage_upstream.inc(tally.completion_tokens)
        if tally.decode_errors:
            children.decode_errors.inc(tally.decode_errors)
        if tally.cached_prompt_tokens is not None:
            ctx.cached_prompt_tokens = tally.cached_prompt_tokens
            children.cached_prompt_tokens.inc(tally.cached_prompt_tokens)
        if tally.oversized_events:
            structlog.get_logger("gateway").error(
                "sse_event_too_large",
                events=tally.oversized_events,
                max_bytes=MAX_EVENT_BYTES,
                detail="relayed unchanged but not counted; the tally may miss its usage",
            )

    def _record_stream_end(self) -> None:
        if self._gaps is not None:
            self._gaps.flush()
        children = self.children
        if self._stream_started is None or not self.ctx.stream or children is None:
            return
        children.active_streams.dec()
        children.stream_duration.observe(time.perf_counter() - self.ctx.started)
