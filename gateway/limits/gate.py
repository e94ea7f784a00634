"""The process-wide ``max_inflight`` gate: a short, bounded wait instead of a 429.

Unlike the per-team limits, which refuse at once, the gate absorbs a brief spike: a request
that finds ``max_inflight`` requests in flight waits, first come first served, for at most
``queue_timeout_s``, then gets ``QueueTimeout`` (503 with ``Retry-After``). The wait queue
itself is bounded by ``max_waiting``: past it a request gets ``QueueFull`` (a
``QueueTimeout``) at once, so a flood costs a fixed amount of memory, never more.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from types import TracebackType

from gateway.limits.errors import QueueFull, QueueTimeout


class InflightGate:
    """Admit up to ``max_inflight`` holders at a time; queue a bounded few, briefly.

    A leaving holder hands its place straight to the oldest waiter, so a request arriving
    just then cannot overtake the queue.

    :param max_inflight: holders at a time.
    :param queue_timeout_s: the longest a request waits for a place.
    :param max_waiting: the most requests waiting at once (default: ``max_inflight``).
    :param retry_after_s: the ``Retry-After`` advertised on refusal.
    """

    def __init__(
        self,
        max_inflight: int,
        queue_timeout_s: float,
        *,
        max_waiting: int | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self.max_inflight = max_inflight
        self.queue_timeout_s = queue_timeout_s
        self.max_waiting = max_inflight if max_waiting is None else max_waiting
        self.retry_after_s = retry_after_s
        self._inflight = 0
        self._waiters: OrderedDict[asyncio.Future[None], None] = OrderedDict()

    @property
    def inflight(self) -> int:
        """Requests holding a place now."""
        return self._inflight

    @property
    def waiting(self) -> int:
        """Requests waiting for a place now (never more than ``max_waiting``)."""
        return len(self._waiters)

    async def __aenter__(self) -> None:
        """Take a place, waiting at most ``queue_timeout_s``; raise ``QueueTimeout`` if not."""
        if self._inflight < self.max_inflight and not self._waiters:
            self._inflight += 1
            return
        if self.queue_timeout_s <= 0 or len(self._waiters) >= self.max_waiting:
            raise QueueFull(
                f"server busy: {self._inflight} requests in flight, {len(self._waiters)} waiting",
                self.retry_after_s,
            )
        await self._wait_for_handover()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Give the place to the oldest waiter, or free it."""
        self._release()

    async def _wait_for_handover(self) -> None:
        """Queue until a leaving holder hands over its place, or the timeout passes."""
        place: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[place] = None
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await place
        except TimeoutError:
            if self._handed_over(place):
                return  # the place arrived as the clock ran out: keep it
            raise QueueTimeout(
                f"server busy: no capacity within {self.queue_timeout_s}s", self.retry_after_s
            ) from None
        except BaseException:
            if self._handed_over(place):
                self._release()  # cancelled after being handed a place: pass it on
            raise

    def _handed_over(self, place: asyncio.Future[None]) -> bool:
        """Whether ``place`` holds a place; if not, leave the queue."""
        if place.done() and not place.cancelled():
            return True
        self._waiters.pop(place, None)
        place.cancel()
        return False

    def _release(self) -> None:
        """Hand the place to the oldest waiter still waiting, else free it."""
        while self._waiters:
            place, _ = self._waiters.popitem(last=False)
            if not place.done():
                place.set_result(None)
                return
        self._inflight -= 1
