"""What the gateway learns about one request, filled in as it crosses the data path.

The first middleware creates it; handlers and the relay fill it in; the same middleware turns
it into the request's metrics and its one canonical log line, in `finally`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

End = Literal["completed", "client_disconnect", "upstream_error", "limit", "rejected"]


@dataclass(slots=True)
class RequestContext:
    request_id: str
    started: float  # time.perf_counter() at arrival (uvloop's loop.time() is in whole ms)
    team: str = "anonymous"
    model: str = "other"  # the bounded metric label, see routing.Router.model_label
    upstream: str = "none"
    status: int = 0
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    usage_source: Literal["upstream", "estimate"] = "estimate"
    ttft_ms: float | None = None
    chunks: int = 0
    finish_reason: str | None = None
    end: End = "completed"
    error_code: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def log_fields(self, duration_ms: float) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "team": self.team,
            "model": self.model,
            "upstream": self.upstream,
            "status": self.status,
            "stream": self.stream,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "usage_source": self.usage_source,
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 3),
            "duration_ms": round(duration_ms, 3),
            "chunks": self.chunks,
            "finish_reason": self.finish_reason,
            "end": self.end,
            "error_code": self.error_code,
            **self.extra,
        }
