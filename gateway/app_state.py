"""What the application holds for its lifetime, under typed `web.AppKey`s.

No module-level singletons: sessions, limiters, tokenizers and metrics are created in the
app's `cleanup_ctx` (see app.py) and reached from a request through `request.app[COMPONENTS]`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .auth import Authenticator, Caller
from .balancer import Balancer
from .config import Settings
from .context import RequestContext
from .limits import InflightGate, Limiter
from .logs import request_logger
from .metrics import GatewayMetrics
from .response_routes import ResponseRoutes
from .routing import Router
from .spend import SpendBook
from .tokens import Tokenizer
from .upstream import UpstreamClient

#: ClientTimeouts' defaults are the configuration's (config.Settings), not a second copy
_DEFAULTS = Settings()


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """How long a client may take to send a request (slowloris bounds).

    `idle_s` is aiohttp's keep-alive timeout: it closes a connection that has no request in
    progress for that long, which bounds both an idle kept-alive connection and one whose
    request head never completes (the server is still waiting for the message). Keep it above
    the idle timeout of any load balancer in front (60 s for most). `body_s` bounds reading the
    whole request body; past it the client gets 408. Built from the configuration
    (`ClientTimeouts.of`), and again by each SIGHUP reload (reload.py says what applies when).
    """

    idle_s: float = _DEFAULTS.client_idle_timeout_s
    body_s: float = _DEFAULTS.client_body_timeout_s

    @classmethod
    def of(cls, settings: Settings) -> ClientTimeouts:
        """The timeouts a configuration sets (`client_idle_timeout_s`, `client_body_timeout_s`)."""
        return cls(idle_s=settings.client_idle_timeout_s, body_s=settings.client_body_timeout_s)


@dataclass(slots=True)
class Lifecycle:
    """Readiness, and the requests in flight, for the SIGTERM drain and the SIGHUP reload.

    `draining` is true from the moment a drain starts: `/readyz` answers 503 and new requests
    on kept-alive connections get 503. Each request's task is tracked while it runs, so that
    the drain can wait for the streams in flight and cut those that outlive the grace period,
    and a reload can wait for the requests that started under the old configuration.
    """

    draining: bool = False
    _running: set[asyncio.Task[Any]] = field(default_factory=set)
    _cut: set[asyncio.Task[Any]] = field(default_factory=set)

    def track(self) -> asyncio.Task[Any]:
        """Track the current task (one request) until `untrack`; returns it."""
        task = asyncio.current_task()
        assert task is not None  # a request handler always runs in a task
        self._running.add(task)
        return task

    def untrack(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        self._cut.discard(task)

    def running(self) -> frozenset[asyncio.Task[Any]]:
        """The requests in flight now."""
        return frozenset(self._running)

    async def wait(self, tasks: Collection[asyncio.Task[Any]], timeout_s: float | None) -> bool:
        """Wait up to timeout_s (None: as long as it takes) for `tasks` to end; whether they all
        did."""
        pending = [task for task in tasks if not task.done()]
        if not pending:
            return True
        _, still = await asyncio.wait(pending, timeout=timeout_s)
        return not still

    def cut(self) -> int:
        """Cancel every request still in flight (the drain's grace ran out); how many."""
        for task in self._running:
            self._cut.add(task)
            task.cancel()
        return len(self._running)

    def was_cut(self) -> bool:
        """Whether the current request was cancelled by `cut`, not by its client leaving."""
        return asyncio.current_task() in self._cut


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
    #: which upstream serves each request; its state (in-flight, health) outlives reloads
    balancer: Balancer
    #: spend per team and key and period, charged in batches, stored (gateway.spend)
    spend: SpendBook
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    #: which upstream created each Responses API response the gateway relayed
    responses: ResponseRoutes = field(default_factory=ResponseRoutes)
    #: the logger of the request line, resolved once, after logging was configured
    #: (gateway.logs.request_logger)
    request_log: Any = field(default_factory=request_logger)


COMPONENTS = web.AppKey("components", Components)
CTX = web.RequestKey("ctx", RequestContext)
#: who sent the request, when the gateway has teams (gateway.auth)
CALLER = web.RequestKey("caller", Caller)
#: the app's COMPONENTS, fetched once by the first middleware for the rest of the request
#: (`request.app[COMPONENTS]` is three calls through aiohttp's properties each time)
REQUEST_COMPONENTS = web.RequestKey("components", Components)
__all__ = [
    "CALLER",
    "COMPONENTS",
    "CTX",
    "REQUEST_COMPONENTS",
    "ClientTimeouts",
    "Components",
    "Lifecycle",
]
