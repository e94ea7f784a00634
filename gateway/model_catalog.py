"""What `GET /v1/models` lists: the routes' exact names, and each pattern route's real models.

A pattern (`sim-*`) is not a model a picker can offer, so the gateway asks each upstream of a
pattern route for its own `GET /v1/models` (through that upstream's pool, with its api key,
within FETCH_TIMEOUT_S) and lists the ids that match the pattern (`Router.listed_models`). An
upstream's list is kept CACHE_TTL_S, and so is a failure: an unreachable upstream contributes
nothing, is logged once per failed fetch, and is not asked again (nor waited for) until then.
Concurrent listings share one fetch per upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import structlog

from . import upstream_http
from .routing import Router
from .upstream import UpstreamClient

FETCH_TIMEOUT_S = 2.0
CACHE_TTL_S = 60.0
#: an upstream's model list larger than this is not read (and counts as a failure)
MAX_LIST_BYTES = 4 << 20

log = structlog.get_logger("gateway")


@dataclass(slots=True)
class _Entry:
    models: tuple[str, ...]
    expires: float


@dataclass(slots=True)
class ModelCatalog:
    """The upstreams' model lists, cached per upstream (by name and address)."""

    ttl_s: float = CACHE_TTL_S
    timeout_s: float = FETCH_TIMEOUT_S
    clock: Callable[[], float] = time.monotonic
    _cache: dict[tuple[str, str], _Entry] = field(default_factory=dict)
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    async def listed(self, router: Router, upstreams: dict[str, UpstreamClient]) -> list[str]:
        names = [n for n in router.pattern_upstreams() if n in upstreams]
        found = await asyncio.gather(*(self._models(upstreams[n]) for n in names))
        lists = dict(zip(names, found, strict=True))
        return router.listed_models(lambda name: lists.get(name, ()))

    async def _models(self, client: UpstreamClient) -> tuple[str, ...]:
        key = (client.name, str(client.base_url))
        entry = self._cache.get(key)
        if entry is not None and entry.expires > self.clock():
            return entry.models
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one fetch per upstream; the others wait for it, then read the cache
            entry = self._cache.get(key)
            if entry is None or entry.expires <= self.clock():
                entry = _Entry(await self._fetch(client), self.clock() + self.ttl_s)
                self._cache[key] = entry
            return entry.models

    async def _fetch(self, client: UpstreamClient) -> tuple[str, ...]:
        try:
            async with asyncio.timeout(self.timeout_s):
                return _model_ids(await _get_models(client))
        except (TimeoutError, upstream_http.H1Error, OSError, ValueError) as exc:
            log.warning("upstream_models_unavailable", upstream=client.name, error=_why(exc))
            return ()


async def _get_models(client: UpstreamClient) -> bytes:
    """The body of the upstream's `GET /v1/models`; ValueError unless it answered 200."""
    headers = client.headers_for({}, "gateway-models")
    async with client.slots:
        response = await client.pool.request("GET", client.target_for("models", ""), headers)
        try:
            if response.status != 200:
                raise ValueError(f"status {response.status}")
            body = bytearray()
            while piece := await response.read_any():
                body += piece
                if len(body) > MAX_LIST_BYTES:
                    raise ValueError("model list too large")
        except BaseException:
            response.close()
            raise
        response.release()
        return bytes(body)


def _model_ids(body: bytes) -> tuple[str, ...]:
    """The `id`s of an OpenAI model list (`{"data": [{"id": ...}, ...]}`); ValueError if none."""
    data = orjson.loads(body).get("data") if body.startswith(b"{") else None
    if not isinstance(data, list):
        raise ValueError("not a model list")
    return tuple(m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str))


def _why(exc: BaseException) -> str:
    """What went wrong, without the upstream's address (it may be internal)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ValueError) and not isinstance(exc, orjson.JSONDecodeError):
        return str(exc)
    return exc.__class__.__name__
