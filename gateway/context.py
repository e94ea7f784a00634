"""What the gateway learns about one request, filled in as it crosses the data path.

The first middleware creates it. Modules on the way report *facts* on it (the error the client
was told about, the status of the answer that went out, the client leaving, the upstream's own
refusal) and what they counted; none of them decides how the request ended. In `finally`, the
same middleware has `gateway.outcome` decide that once, then records the request's metrics and
its one canonical log line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .errors import GatewayError

End = Literal[
    "completed", "client_disconnect", "upstream_error", "upstream_refused", "limit", "rejected"
]


@dataclass(slots=True)
class RequestContext:
    request_id: str
    started: float  # time.perf_counter() at arrival (uvloop's loop.time() is in whole ms)
    team: str = "anonymous"
    key: str | None = None  # the configured name of the key (None: a plain string key)
    model: str = "other"  # the bounded metric label, see routing.RouteMatch.label
    #: the model the client asked for, verbatim (the log line only: never a metric label)
    requested_model: str | None = None
    upstream: str = "none"
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    usage_source: Literal["upstream", "estimate"] = "estimate"
    ttft_ms: float | None = None
    chunks: int = 0
    #: how many times the request was sent upstream (retries and failover included)
    attempts: int = 0
    #: prompt tokens the upstream read from its cache (a subset of prompt_tokens), if it said
    cached_prompt_tokens: int | None = None
    cost_usd: float | None = None  # at the `pricing` table (None: nothing was metered)

    # -- facts, reported by the modules that saw them ------------------------------------------
    #: the error the client was told about: a JSON answer, or the SSE event that ended a stream
    error: GatewayError | None = None
    #: the status of the answer whose head went out (0: none did)
    sent_status: int = 0
    #: the client went away before its answer ended (or began)
    client_left: bool = False
    #: the upstream's own non-2xx answer was passed on: its OpenAI error code, if it named one
    upstream_refused: bool = False
    upstream_code: str | None = None
    #: the finish reason the meter read from the stream (None: none, or nothing metered)
    metered_finish: str | None = None

    # -- the outcome: written by `outcome.conclude` only ----------------------------------------
    status: int = 0
    end: End = "completed"
    error_code: str | None = None
    finish_reason: str | None = None

    def log_fields(self, duration_ms: float) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "team": self.team,
            "model": self.model,
            "requested_model": self.requested_model,
            "upstream": self.upstream,
            "status": self.status,
            "stream": self.stream,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "usage_source": self.usage_source,
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 3),
            "duration_ms": round(duration_ms, 3),
            "chunks": self.chunks,
            "finish_reason": self.finish_reason,
            "end": self.end,
            "error_code": self.error_code,
            "attempts": self.attempts,
            "key": self.key,
            "cost_usd": self.cost_usd,
        }
