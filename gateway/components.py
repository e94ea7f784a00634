"""What the application holds for its lifetime, under typed `web.AppKey`s.

No module-level singletons: sessions, limiters, tokenizers and metrics are created in the
app's `cleanup_ctx` (see app.py) and reached from a request through `request.app[COMPONENTS]`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from .auth import Authenticator
from .config import Settings, Team
from .context import RequestContext
from .errors import ServiceUnavailable
from .limits import InflightGate, Limiter, QueueTimeout
from .metrics import GatewayMetrics
from .routing import Router
from .tokens import Tokenizer
from .upstream import UpstreamClient


@dataclass(slots=True)
class Lifecycle:
    """Readiness: false from the moment a drain starts (SIGTERM)."""

    draining: bool = False


@dataclass(slots=True)
class Components:
    settings: Settings
    metrics: GatewayMetrics
    router: Router
    auth: Authenticator
    tokenizers: dict[str, Tokenizer]
    upstreams: dict[str, UpstreamClient]
    limiter: Limiter
    inflight: InflightGate
    lifecycle: Lifecycle = field(default_factory=Lifecycle)

    @contextlib.asynccontextmanager
    async def gate(self, ctx: RequestContext) -> AsyncIterator[None]:
        """The process-wide max_inflight bound: a bounded wait, then 503."""
        try:
            await self.inflight.__aenter__()
        except QueueTimeout as exc:
            self.metrics.rate_limited.labels(ctx.team, "inflight").inc()
            ctx.end = "limit"
            retry = str(max(1, round(exc.retry_after_s)))
            raise ServiceUnavailable(
                "The gateway is at capacity; retry shortly.",
                code="gateway_overloaded",
                headers={"Retry-After": retry},
            ) from None
        self.metrics.inflight.inc()
        try:
            yield
        finally:
            self.metrics.inflight.dec()
            await self.inflight.__aexit__(None, None, None)


COMPONENTS = web.AppKey("components", Components)
CTX = web.RequestKey("ctx", RequestContext)
TEAM = web.RequestKey("team", Team)
__all__ = ["COMPONENTS", "CTX", "TEAM", "Components", "Lifecycle", "Team"]
