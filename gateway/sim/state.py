"""What the simulator saw, for tests and benchmarks: `app[SIM_STATE]`.

    state.requests            the last requests received (bounded), oldest first
    state.requests_received   every request so far
    state.active_requests     handlers running now: 0 once every client has gone

(The simulator's own /sim/* paths are neither recorded nor counted.)
    state.connections_opened  TCP connections accepted, and closed, from either side
    state.connections_closed
    state.responses           the last Responses API answers, by id (bounded): what
                              GET /v1/responses/{id} and `previous_response_id` find

Connections are counted at the server's own hooks (`web.Server.connection_made` and
`connection_lost`), which `watch` wraps; `start_sim` does that for you. Under another runner
(pytest-aiohttp's `aiohttp_client`), call `state.watch(client.server.runner.server)` before the
first request. `wait_for` lets a test await a condition instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    query_string: str
    headers: CIMultiDictProxy[str]
    body: bytes
    #: the client's "host:port": two requests with the same peer shared a connection
    peer: str | None

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(eq=False, slots=True)
class SimState:
    requests: deque[RecordedRequest]
    requests_received: int = 0
    active_requests: int = 0
    connections_opened: int = 0
    connections_closed: int = 0
    responses: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    #: how many responses `responses` keeps (the oldest goes first)
    responses_limit: int = 256
    #: in every response id this simulator makes, so that two simulators' ids never collide
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @classmethod
    def new(cls, record_limit: int) -> SimState:
        return cls(requests=deque(maxlen=record_limit))

    def store_response(self, response: dict[str, Any]) -> None:
        self.responses[response["id"]] = response
        while len(self.responses) > self.responses_limit:
            self.responses.popitem(last=False)

    @property
    def connections_open(self) -> int:
        return self.connections_opened - self.connections_closed

    def next_id(self) -> int:
        return next(self._ids)

    def record(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        self.requests_received += 1
        self._changed()

    def handler_started(self) -> None:
        self.active_requests += 1
        self._changed()

    def handler_ended(self) -> None:
        self.active_requests -= 1
        self._changed()

    def watch(self, server: web.Server) -> None:
        """Count the connections `server` accepts and loses."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            self.connections_opened += 1
            self._changed()
            made(handler, transport)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self.connections_closed += 1
            self._changed()
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    async def wait_for(self, condition: Callable[[SimState], bool]) -> None:
        """Return once `condition(state)` holds; bound it with `async with asyncio.timeout(...)`."""
        while not condition(self):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter

    def snapshot(self) -> dict[str, int]:
        return {
            "requests_received": self.requests_received,
            "active_requests": self.active_requests,
            "connections_opened": self.connections_opened,
            "connections_closed": self.connections_closed,
            "connections_open": self.connections_open,
        }

    def _changed(self) -> None:
        if not self._waiters:
            return
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


SIM_STATE = web.AppKey("sim_state", SimState)
