"""SIGHUP: read the configuration file again and apply it to new requests.

    load and validate the file     ConfigError: logged as `reload_rejected`, the old one stays
      -> build what it needs       tokenizers (in a thread), clients for new or changed
                                   upstreams (simulators started), a limiter if the `limits`
                                   backend changed, a gate if max_inflight/queue_timeout_s did;
                                   any failure here rejects the file as well
                                   a spend store if its backend or state file changed
      -> swap, with no await       settings, router, auth, tokenizers, upstreams, limiter, gate,
                                   client timeouts; the balancer's tiers, weights, health and
                                   pacing settings; prices and budgets (spend so far is kept:
                                   a budget raised admits again at once, a key removed is
                                   refused at once)
      -> retire, later             clients of removed or changed upstreams and a replaced
                                   limiter close once the requests that started before the
                                   swap have ended

A request reads the configuration when it is admitted; one that is already streaming keeps its
route, its upstream connection and its limits admission, so a reload never drops a stream.
Team limits are looked up by team name, so a team's budget so far is kept. The balancer keeps
its state by upstream name: in-flight counts and cooldowns of the upstreams the new file keeps
survive, a changed one included (its pool is new; its health is not reset: a cooldown in
progress ends, and its trial request tells, as for any other). What needs a
restart: `listen` (the socket is bound; the new file's value is ignored).

The client timeouts: `client_body_timeout_s` applies to every request that starts reading its
body after the swap. `client_idle_timeout_s` applies to connections accepted after the swap; a
connection already open keeps the idle timeout it was accepted with until it closes (aiohttp
copies it into each connection's handler when the connection is made). aiohttp has no public
way to change it on a running server: `aiohttp_private.set_idle_timeout` writes the one
private attribute it reads it from, and if a release removes that attribute the reload logs
`reload_partial` and the new idle timeout applies from the next restart.

Removed upstreams stay in `Components.upstreams` until they are retired: a request that was
routed by the old configuration may still look its upstream up by name, and no new route can
name it (the configuration check says so).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import structlog
from aiohttp import web

from .aiohttp_private import set_idle_timeout
from .app import SIM_RUNNERS, start_upstream
from .app_state import COMPONENTS, ClientTimeouts, Components
from .auth import Authenticator
from .config import ConfigError, Settings, load_settings
from .limits import InflightGate, Limiter, create_limiter
from .periods import Periods
from .routing import Router
from .spend import create_store, store_params
from .spend_store import LocalStore, SpendStore
from .tokens import Tokenizer, load_tokenizer
from .upstream import UpstreamClient

log = structlog.get_logger("gateway")


@dataclass(slots=True)
class _Built:
    """What a new configuration needs that the running one does not have."""

    settings: Settings
    tokenizers: dict[str, Tokenizer] = field(default_factory=dict)
    clients: dict[str, UpstreamClient] = field(default_factory=dict)
    sims: list[web.AppRunner] = field(default_factory=list)
    limiter: Limiter | None = None
    gate: InflightGate | None = None
    store: SpendStore | None = None
    periods: Periods | None = None

    async def discard(self) -> None:
        """The file was rejected after all: close what was started for it."""
        for client in self.clients.values():
            await client.aclose()
        for runner in self.sims:
            await runner.cleanup()
        if self.limiter is not None:
            await self.limiter.aclose()
        if self.store is not None:
            await self.store.aclose()


@dataclass(slots=True)
class _Retiring:
    """What a swap replaced, closed once the requests that may still use it have ended."""

    clients: list[UpstreamClient]
    limiter: Limiter | None
    store: SpendStore | None = None


class Reloader:
    """Reloads `path` into the running app's Components; SIGHUP calls `trigger`.

    Reloads run one at a time: a SIGHUP during a reload runs one more after it, so the last
    signal always sees the file as it was when it was sent.
    """

    def __init__(self, runner: web.AppRunner, path: str | Path) -> None:
        self.runner, self.app, self.path = runner, runner.app, Path(path)
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._retiring: dict[asyncio.Task[None], _Retiring] = {}

    def trigger(self) -> None:
        """Start a reload, or queue one behind the reload in progress."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            await self.reload()
            if not self._again:
                return

    async def reload(self) -> bool:
        """Load, validate and apply the file; False (and logged) when it was rejected."""
        comp = self.app[COMPONENTS]
        if comp.lifecycle.draining:
            log.warning("reload_ignored", reason="the gateway is shutting down")
            return False
        try:
            settings = await asyncio.to_thread(load_settings, self.path)
        except ConfigError as exc:
            log.error("reload_rejected", path=str(self.path), error=str(exc))
            return False
        settings = msgspec.structs.replace(settings, listen=comp.settings.listen)
        built = _Built(settings)
        try:
            await _build(comp, built)
        except BaseException as exc:
            await built.discard()
            if isinstance(exc, Exception):
                log.error("reload_rejected", path=str(self.path), error=repr(exc))
                return False
            raise
        self._swap(comp, built)
        return True

    def _swap(self, comp: Components, built: _Built) -> None:
        """Apply `built` at once (no await), then retire what it replaced in the background."""
        old, new = comp.settings, built.settings
        before = comp.lifecycle.running()
        replaced = [comp.upstreams[name] for name in built.clients if name in comp.upstreams]
        removed = {
            name: comp.upstreams[name] for name in old.upstreams if name not in new.upstreams
        }
        comp.settings = new
        comp.router = Router(new)
        comp.auth = Authenticator(new)
        comp.tokenizers.update(built.tokenizers)
        comp.upstreams.update(built.clients)
        self.app[SIM_RUNNERS].extend(built.sims)
        old_limiter = comp.limiter if built.limiter is not None else None
        comp.limiter = built.limiter or comp.limiter
        comp.inflight = built.gate or comp.inflight
        self._apply_timeouts(comp, ClientTimeouts.of(new))
        comp.balancer.configure(new)
        old_store = comp.spend.store if built.store is not None else None
        comp.spend.store = built.store or comp.spend.store
        comp.spend.periods = built.periods or comp.spend.periods
        comp.spend.configure(new)
        retiring = _Retiring(replaced, old_limiter, old_store)
        task = asyncio.create_task(self._retire(comp, before, removed, retiring))
        self._retiring[task] = retiring
        task.add_done_callback(self._retiring.pop)
        log.info(
            "reloaded",
            path=str(self.path),
            upstreams_added=sorted(set(new.upstreams) - set(old.upstreams)),
            upstreams_changed=sorted(client.name for client in replaced),
            upstreams_removed=sorted(removed),
            routes=len(new.routes),
            teams=len(new.teams),
            requests_in_flight=len(before),
        )
        if not new.auth_enabled:
            log.warning("auth_disabled", reason="no teams configured: every request is anonymous")

    def _apply_timeouts(self, comp: Components, timeouts: ClientTimeouts) -> None:
        """The body timeout for new requests; the idle timeout for new connections."""
        changed = timeouts.idle_s != comp.timeouts.idle_s
        comp.timeouts = timeouts
        if changed and not set_idle_timeout(self.runner.server, timeouts.idle_s):
            log.warning(
                "reload_partial",
                key="client_idle_timeout_s",
                reason="this aiohttp cannot change it on a running server: applies on restart",
            )

    async def _retire(
        self,
        comp: Components,
        before: frozenset[asyncio.Task[Any]],
        removed: dict[str, UpstreamClient],
        retiring: _Retiring,
    ) -> None:
        """Once every request that started before the swap has ended, close what it used."""
        await comp.lifecycle.wait(before, None)
        for name, client in removed.items():
            if comp.upstreams.get(name) is client:  # not re-added by a later reload
                del comp.upstreams[name]
            retiring.clients.append(client)
        await self._close(retiring)

    async def _close(self, retiring: _Retiring) -> None:
        for client in retiring.clients:
            await client.aclose()
            await self._stop_sim(client)
        retiring.clients.clear()
        if retiring.limiter is not None:
            await retiring.limiter.aclose()
            retiring.limiter = None
        if retiring.store is not None:
            await retiring.store.aclose()
            retiring.store = None

    async def _stop_sim(self, client: UpstreamClient) -> None:
        """The in-process simulator behind a retired client, if it was one."""
        sims = self.app[SIM_RUNNERS]
        for runner in list(sims):
            if client.base_url.host == "127.0.0.1" and runner.addresses[0][1] == (
                client.base_url.port
            ):
                sims.remove(runner)
                await runner.cleanup()

    async def cancel(self) -> None:
        """Stop a reload in progress (before a drain)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def aclose(self) -> None:
        """After the drain: close whatever is still waiting to be retired."""
        await self.cancel()
        for task, retiring in list(self._retiring.items()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._close(retiring)


async def _build(comp: Components, built: _Built) -> None:
    """Tokenizers, clients, limiter and gate the new settings need and the old lack."""
    new, old = built.settings, comp.settings
    for tokenizer in {route.tokenizer for route in new.routes} - set(comp.tokenizers):
        built.tokenizers[tokenizer] = await asyncio.to_thread(load_tokenizer, tokenizer)
    for name, upstream in new.upstreams.items():
        if old.upstreams.get(name) != upstream:
            runner, client = await start_upstream(name, upstream)
            built.clients[name] = client
            if runner is not None:
                built.sims.append(runner)
    limits, was = new.limits, old.limits
    backend = (limits.backend, limits.redis_url, limits.on_backend_error)
    if backend != (was.backend, was.redis_url, was.on_backend_error):
        built.limiter = create_limiter(*backend)
    if (limits.max_inflight, limits.queue_timeout_s) != (was.max_inflight, was.queue_timeout_s):
        built.gate = InflightGate(limits.max_inflight, limits.queue_timeout_s)
    await _build_store(comp, built)
    if limits.budget_timezone != was.budget_timezone:
        built.periods = Periods(await asyncio.to_thread(ZoneInfo, limits.budget_timezone))


async def _build_store(comp: Components, built: _Built) -> None:
    """A new spend store when the backend changed; the local one keeps its memory and, when
    the first budget appears, starts keeping it in the state file."""
    kind, where = store_params(built.settings)
    store = comp.spend.store
    if kind == "local" and isinstance(store, LocalStore):
        if where is not None and not await store.attach(Path(str(where))):
            log.warning("state_file_unchanged", reason="a new state_file needs a restart")
        return
    if store_params(built.settings) != store_params(comp.settings):
        built.store = create_store(built.settings)
        await built.store.start()
