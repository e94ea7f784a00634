"""Running the app: one process, or N processes sharing the port, and the SIGTERM drain.

SIGTERM (or SIGINT): readiness turns false at once, the listening socket closes, requests on
kept-alive connections get 503 `draining`, in-flight streams get `shutdown_grace_s` to finish,
then whatever still runs is cancelled (and still logged and counted) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from .app import create_app
from .components import COMPONENTS
from .config import Settings

log = structlog.get_logger("gateway")


async def start_server(
    settings: Settings,
    *,
    reuse_port: bool = False,
    registry: CollectorRegistry | None = None,
    exposition: CollectorRegistry | None = None,
) -> web.AppRunner:
    """Build the app and listen; the bound port is `bound_port(runner)` (the config may say 0)."""
    app = create_app(settings, registry, exposition)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=settings.shutdown_grace_s,
    )
    await runner.setup()
    host, port = settings.listen.host, settings.listen.port
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_port=reuse_port or None)
    await site.start()
    log.info("listening", host=host, port=bound_port(runner), upstreams=sorted(settings.upstreams))
    return runner


def bound_port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


async def drain(runner: web.AppRunner, grace_s: float) -> None:
    """Readiness false, stop listening, give in-flight streams grace_s, then stop."""
    runner.app[COMPONENTS].lifecycle.draining = True
    log.info("draining", grace_s=grace_s)
    await runner.cleanup()
    log.info("stopped")


async def serve(
    settings: Settings,
    *,
    reuse_port: bool = False,
    registry: CollectorRegistry | None = None,
    exposition: CollectorRegistry | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives, then drain and return."""
    runner = await start_server(
        settings, reuse_port=reuse_port, registry=registry, exposition=exposition
    )
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await drain(runner, settings.shutdown_grace_s)
