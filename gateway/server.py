"""Running the app: one process, or N processes sharing the port, and the SIGTERM drain.

SIGTERM (or SIGINT): readiness turns false at once, the listening socket closes, idle kept-alive
connections close, requests on busy ones get 503 `draining`, in-flight streams get
`shutdown_grace_s` to finish, then whatever still runs is cut (a stream ends with an SSE error
event, `error_code` gateway_shutdown; every request is still logged and counted) and the
process exits 0.

SIGHUP (when the server knows its configuration file): the file is read again and applied to
new requests, see reload.py; a stream in flight is not touched.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Coroutine
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from .aiohttp_private import name_own_answers
from .app import SERVER_NAME, create_app
from .app_state import COMPONENTS, ClientTimeouts
from .config import Settings
from .reload import Reloader

log = structlog.get_logger("gateway")
#: after the grace period, how long cut requests get to write their last event and be logged
CUT_WAIT_S = 5.0
#: the collector's thresholds once serving, against Python's default (700, 10, 10): young
#: collections about 70 times rarer, full ones 10 times rarer still; see `settle_heap`
GC_THRESHOLDS = (50_000, 20, 100)


async def start_server(
    settings: Settings,
    *,
    reuse_port: bool = False,
    registry: CollectorRegistry | None = None,
    exposition: CollectorRegistry | None = None,
    timeouts: ClientTimeouts | None = None,
) -> web.AppRunner:
    """Build the app and listen; the bound port is `bound_port(runner)` (the config may say 0)."""
    timeouts = timeouts or ClientTimeouts.of(settings)
    name_own_answers(SERVER_NAME)
    app = create_app(settings, registry, exposition)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=settings.shutdown_grace_s,
        keepalive_timeout=timeouts.idle_s,
    )
    await runner.setup()
    app[COMPONENTS].timeouts = timeouts
    host, port = settings.listen.host, settings.listen.port
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_port=reuse_port or None)
    await site.start()
    log.info("listening", host=host, port=bound_port(runner), upstreams=sorted(settings.upstreams))
    return runner


def bound_port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


async def drain(runner: web.AppRunner, grace_s: float) -> None:
    """Readiness false, stop listening, give in-flight requests grace_s, cut the rest, stop.

    aiohttp's own shutdown would wait `shutdown_timeout` twice (once for the handlers, once
    more after cancelling them) and cancel streams without a word to their clients; here the
    grace is one period, and a cut stream ends with an SSE error event (proxy.py).
    """
    lifecycle = runner.app[COMPONENTS].lifecycle
    lifecycle.draining = True
    log.info("draining", grace_s=grace_s, in_flight=len(lifecycle.running()))
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()  # idle kept-alive connections close now, busy ones after
    if not await lifecycle.wait(lifecycle.running(), grace_s):
        log.warning("drain_grace_expired", cut=lifecycle.cut())
        await lifecycle.wait(lifecycle.running(), CUT_WAIT_S)
    await runner.cleanup()
    log.info("stopped")


async def serve(
    settings: Settings,
    *,
    reuse_port: bool = False,
    registry: CollectorRegistry | None = None,
    exposition: CollectorRegistry | None = None,
    stop: asyncio.Event | None = None,
    config_path: str | None = None,
) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives, then drain and return.

    With `config_path`, SIGHUP reloads that file (reload.Reloader).
    """
    runner = await start_server(
        settings, reuse_port=reuse_port, registry=registry, exposition=exposition
    )
    settle_heap()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = [signal.SIGTERM, signal.SIGINT]
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    reloader = Reloader(runner, config_path) if config_path is not None else None
    # without a file to read, SIGHUP is logged and ignored (its default action would kill us)
    loop.add_signal_handler(signal.SIGHUP, reloader.trigger if reloader else _no_reload)
    signals.append(signal.SIGHUP)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if reloader is not None:
            await reloader.cancel()
        await drain(runner, runner.app[COMPONENTS].settings.shutdown_grace_s)
        if reloader is not None:
            await reloader.aclose()  # what a reload replaced, once its last stream ended


def run_loop(main_coro: Coroutine[Any, Any, None]) -> None:
    """Run `main_coro` (`serve(...)`) to the end on uvloop, or asyncio's loop without it."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(main_coro)
    else:
        uvloop.run(main_coro)


def settle_heap() -> None:
    """Keep the cyclic garbage collector off the streams' backs once the process serves.

    A collection stops every stream while it runs, and a full one walks every object of
    every stream in flight: about 150 ms at 5,000 streams. At Python's default thresholds the
    bench's slow-stream ramp had seven of them, 630 ms in all, and a young collection every
    two requests or so. The gateway's requests leave no reference cycles, completed or ended
    by an error (tests/core/test_fast_path.py holds them to that), so the collector finds
    next to nothing. What startup built (modules, configuration, tokenizers, the app) is
    frozen, never scanned again. Young collections wait for 50,000 new objects instead of
    700 (a count that only grows while streams are being opened: objects freed by reference
    counting take theirs back), middle ones for 20 young ones, full ones for 100 middle
    ones. The price: garbage that only the collector frees (a cycle on a path no test
    covers) waits longer for it.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _no_reload() -> None:
    log.warning("reload_ignored", reason="started without --config: there is no file to reload")
