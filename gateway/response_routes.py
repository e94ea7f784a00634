"""Which upstream holds a Responses API response, so that requests about it go there.

A response lives on the upstream that created it: `GET`/`DELETE /v1/responses/{id}`, its
`/cancel` and `/input_items`, and a `POST /v1/responses` continuing it (`previous_response_id`)
only work there. The gateway learns the pair when it relays the creation (the stream's
`response.created`, or the id of a JSON answer: see `gateway.meter`) and keeps it:

* in this process, in a bounded map (least recently used first out, `ENTRIES`);
* with `limits.backend: redis`, in that Redis too (one `SET` with a `TTL_S` expiry per
  response, in the background, never per event), so every replica finds it.

A request about a response the gateway never saw (or forgot) goes where it would go anyway:
its route's upstreams, the first one first. Redis being down only loses the sharing: the
local map still answers, and nothing waits longer than the limiter's own short timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import OrderedDict
from typing import Any

from redis.exceptions import RedisError

from .limits import Limiter, RedisLimiter

#: responses remembered per process
ENTRIES = 100_000
#: how long Redis keeps a response's upstream (OpenAI keeps stored responses 30 days)
TTL_S = 30 * 24 * 3600
KEY_PREFIX = "gw:resp:"
#: the longest a request waits for Redis to say where a response is
LOOKUP_TIMEOUT_S = 0.5
#: `responses/{id}`, `responses/{id}/cancel`, `responses/{id}/input_items`
_ABOUT = re.compile(r"responses/([^/]+)(?:/(?:cancel|input_items))?")
_BACKEND_ERRORS = (RedisError, OSError, TimeoutError)


def response_id_of(tail: str, doc: dict[str, Any] | None) -> str | None:
    """The id of the existing response a request is about, if it is about one."""
    if tail == "responses":
        previous = doc.get("previous_response_id") if doc is not None else None
        return previous if isinstance(previous, str) and previous else None
    if tail.startswith("responses/") and (found := _ABOUT.fullmatch(tail)) is not None:
        return found.group(1)
    return None


class ResponseRoutes:
    """Response id -> upstream name, bounded, shared through Redis when the limiter uses it."""

    def __init__(self, entries: int = ENTRIES) -> None:
        self._entries = entries
        self._local: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._local)

    def remember(self, response_id: str, upstream: str, limiter: Limiter) -> None:
        """`upstream` created `response_id`: remember it here, and in Redis in the background."""
        local = self._local
        local[response_id] = upstream
        local.move_to_end(response_id)
        if len(local) > self._entries:
            local.popitem(last=False)
        shared = _shared(limiter)
        if shared is not None:
            shared.spawn(_store(shared, response_id, upstream))

    async def find(self, response_id: str, limiter: Limiter) -> str | None:
        """The upstream that created `response_id`, if this process or Redis knows it."""
        local = self._local
        upstream = local.get(response_id)
        if upstream is not None:
            local.move_to_end(response_id)
            return upstream
        shared = _shared(limiter)
        if shared is None:
            return None
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                found = await shared.redis.get(KEY_PREFIX + response_id)
        except _BACKEND_ERRORS:
            return None
        return found.decode("utf-8", "replace") if isinstance(found, bytes) else None


def _shared(limiter: Limiter) -> RedisLimiter | None:
    """The limiter's Redis, when limits are shared and it is reachable."""
    if isinstance(limiter, RedisLimiter) and not limiter.degraded:
        return limiter
    return None


async def _store(limiter: RedisLimiter, response_id: str, upstream: str) -> None:
    with contextlib.suppress(*_BACKEND_ERRORS):
        async with asyncio.timeout(LOOKUP_TIMEOUT_S):
            await limiter.redis.set(KEY_PREFIX + response_id, upstream, ex=TTL_S)
