"""gateway.upstream_http against raw asyncio servers on 127.0.0.1 that write scripted bytes.

The servers control the framing exactly: where each write starts and ends, when the
connection closes (FIN or RST), what never comes. Each test checks what the client did
with those bytes: the body it delivered byte for byte, the connections the server saw
opened and closed, the error it raised, the bytes it put on the wire.

Every test runs twice, on the default asyncio loop and on uvloop (`on_both_loops`).
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import hashlib
import inspect
import ipaddress
import random
import socket
import ssl
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
import uvloop
from multidict import CIMultiDictProxy

from gateway.upstream_http import (
    HEAD_LIMIT,
    HIGH_WATER,
    ConnectFailed,
    Disconnected,
    H1Error,
    IdleTimeout,
    Pool,
    ProtocolViolation,
    Response,
    environment_proxy,
)
from tests.support.connect_proxy import tunnel_proxy

# -- running each test on both loops -------------------------------------------------------

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
TEST_TIMEOUT_S = 10.0


def on_both_loops(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Turn an async test into a sync one run once per event loop in LOOPS.

    The fixtures and parametrize marks of `test` carry over; a hung test fails after
    TEST_TIMEOUT_S instead of waiting for pytest-timeout.
    """

    def run(*args: Any, loop_kind: str, **kwargs: Any) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(TEST_TIMEOUT_S):
                await test(*args, **kwargs)

        with asyncio.Runner(loop_factory=LOOPS[loop_kind]) as runner:
            runner.run(bounded())

    signature = inspect.signature(test)
    loop_param = inspect.Parameter("loop_kind", inspect.Parameter.KEYWORD_ONLY)
    run.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), loop_param]
    )
    run.__name__ = test.__name__
    run.__qualname__ = test.__qualname__
    run.__doc__ = test.__doc__
    run.__dict__.update(test.__dict__)  # marks applied before this decorator
    marked: Callable[..., None] = pytest.mark.parametrize("loop_kind", list(LOOPS))(run)
    return marked


# -- the scripted server --------------------------------------------------------------------


@dataclass
class Request:
    """One request as the server read it off the wire."""

    raw_head: bytes
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class Peer:
    """The server side of one accepted connection."""

    def __init__(
        self,
        index: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        requests: list[Request],
    ) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.received = bytearray()  # every byte the client sent on this connection
        self.requests: list[Request] = []
        self.client_closed = asyncio.Event()  # EOF or reset seen while reading
        self._all_requests = requests
        self._buf = bytearray()

    async def _fill(self) -> bool:
        try:
            data = await self.reader.read(1 << 16)
        except ConnectionError:
            data = b""
        if not data:
            self.client_closed.set()
            return False
        self._buf += data
        self.received += data
        return True

    async def read_request(self) -> Request | None:
        """The next request, or None when the client closed the connection first."""
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if not await self._fill():
                return None
        raw_head = bytes(self._buf[: end + 4])
        del self._buf[: end + 4]
        request_line, *lines = raw_head[:-4].decode("latin-1").split("\r\n")
        method, target, version = request_line.split(" ")
        headers = []
        for line in lines:
            name, colon, value = line.partition(":")
            assert colon and name == name.strip(), f"malformed header line {line!r}"
            headers.append((name, value.strip(" \t")))
        request = Request(raw_head, method, target, version, headers, b"")
        assert not request.values("Transfer-Encoding"), "the client must send Content-Length"
        length = int(request.values("Content-Length")[0]) if request.values("Content-Length") else 0
        while len(self._buf) < length:
            if not await self._fill():
                raise AssertionError("the client closed inside a request body")
        request.body = bytes(self._buf[:length])
        del self._buf[:length]
        self.requests.append(request)
        self._all_requests.append(request)
        return request

    async def send(self, *pieces: bytes, pause_s: float = 0.0) -> None:
        """Each piece with its own write and drain, `pause_s` before each but the first."""
        for i, piece in enumerate(pieces):
            if pause_s and i:
                await asyncio.sleep(pause_s)
            self.writer.write(piece)
            await self.writer.drain()

    async def until_client_closes(self) -> None:
        while await self._fill():
            pass

    def close(self, *, reset: bool = False) -> None:
        """FIN, or with `reset` an RST (SO_LINGER 0)."""
        if reset:
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()
        else:
            self.writer.close()


Handler = Callable[[Peer], Awaitable[None]]


@dataclass
class Server:
    handler: Handler
    port: int = 0
    scheme: str = "http"
    host: str = "127.0.0.1"
    peers: list[Peer] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)  # all connections, in arrival order
    errors: list[BaseException] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def accepted(self) -> int:
        return len(self.peers)

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer = Peer(len(self.peers), reader, writer, self.requests)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            return  # the test is over
        except Exception as exc:
            self.errors.append(exc)
        if not writer.is_closing():
            writer.close()


@asynccontextmanager
async def serving(
    handler: Handler,
    *,
    ssl_context: ssl.SSLContext | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> AsyncIterator[Server]:
    srv = Server(handler, scheme="https" if ssl_context else "http", host=host)
    server = await asyncio.start_server(
        srv.on_connect, "127.0.0.1", port, ssl=ssl_context, limit=1 << 20
    )
    srv.port = server.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        server.close()
        for peer in srv.peers:
            peer.writer.transport.abort()
        for task in srv.tasks:
            task.cancel()
        await asyncio.gather(*srv.tasks, return_exceptions=True)
        await server.wait_closed()
    if srv.errors:
        raise srv.errors[0]


def answer_each(respond: Callable[[Request], bytes]) -> Handler:
    """A keep-alive server: answers every request with `respond(request)` until EOF."""

    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            await peer.send(respond(request))

    return handler


# -- answers --------------------------------------------------------------------------------


def head(
    status: str = "200 OK", headers: Sequence[tuple[str, str]] = (), version: str = "HTTP/1.1"
) -> bytes:
    lines = [f"{version} {status}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(
    body: bytes = b"",
    status: str = "200 OK",
    headers: Sequence[tuple[str, str]] = (),
    version: str = "HTTP/1.1",
) -> bytes:
    return head(status, [("Content-Length", str(len(body))), *headers], version) + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    """The chunked encoding of the pieces (empty ones skipped), terminating chunk included."""
    return b"".join(chunk(p) for p in pieces if p) + b"0\r\n" + trailer + b"\r\n"


def chunked_answer(
    *pieces: bytes, status: str = "200 OK", headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    return head(status, [("Transfer-Encoding", "chunked"), *headers]) + chunked(*pieces)


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def padded_head(total: int, body: bytes) -> bytes:
    """A status line plus headers exactly `total` bytes long (final CRLF included)."""
    start = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n".encode()
    lines = []
    size = len(start) + 2
    i = 0
    while total - size > 1100:
        line = b"X-Pad-%04d: %s\r\n" % (i, b"a" * 1000)
        lines.append(line)
        size += len(line)
        i += 1
    last = b"X-Last: "
    lines.append(last + b"b" * (total - size - len(last) - 2) + b"\r\n")
    out = start + b"".join(lines) + b"\r\n"
    assert len(out) == total
    return out + body


RNG = random.Random(20240501)
BODY = RNG.randbytes(200_000)
BIG = RNG.randbytes(24 << 20)  # well past what loopback kernel buffers hold (about 7 MiB)
BIG_CHUNKED = chunked(*split(BIG, 50_000))
WORDS = [b"alpha", b"beta", b"gamma", b"delta", b"\xc3\xa9t\xc3\xa9", b"{}", b"\n"]
TEXT = b" ".join(RNG.choice(WORDS) + str(RNG.randrange(10_000)).encode() for _ in range(40_000))


# -- client side helpers --------------------------------------------------------------------


@asynccontextmanager
async def pool_for(
    srv: Server,
    *,
    connect_timeout_s: float = 1.0,
    idle_timeout_s: float | None = 1.0,
    ssl_context: ssl.SSLContext | None = None,
    base_url: str | None = None,
    proxy: str | None = None,
) -> AsyncIterator[Pool]:
    pool = Pool(
        base_url or srv.base_url,
        connect_timeout_s=connect_timeout_s,
        idle_timeout_s=idle_timeout_s,
        ssl_context=ssl_context,
        proxy=proxy,
    )
    try:
        yield pool
    finally:
        await pool.aclose()


async def read_all(response: Response) -> bytes:
    out = bytearray()
    while piece := await response.read_any():
        out += piece
    return bytes(out)


async def read_at_least(response: Response, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        piece = await response.read_any()
        assert piece, f"the body ended after {len(out)} bytes, expected at least {n}"
        out += piece
    return bytes(out)


async def until(predicate: Callable[[], bool], within_s: float = 2.0) -> None:
    for _ in range(int(within_s / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in time")


async def closed_by_client(peer: Peer, within_s: float = 1.0) -> None:
    await asyncio.wait_for(peer.client_closed.wait(), within_s)


def digest(data: bytes) -> tuple[int, str]:
    return len(data), hashlib.sha256(data).hexdigest()


class Collector:
    """A tap's sink and on_end, keeping what they were given."""

    def __init__(self) -> None:
        self.early: list[bytes] = []  # what tap() returned
        self.pieces: list[bytes] = []  # what the sink received
        self.size = 0  # bytes the sink received
        self.end_calls: list[BaseException | None] = []
        self.ended: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )
        self.on_piece: Callable[[], None] | None = None
        self._in_tap = False
        self.called_inside_tap = False  # sink or on_end called from inside tap()

    def tap(self, response: Response) -> None:
        self._in_tap = True
        try:
            self.early = list(response.tap(self.sink, self.on_end))
        finally:
            self._in_tap = False

    def sink(self, data: bytes) -> None:
        if self._in_tap:
            self.called_inside_tap = True
        self.pieces.append(bytes(data))
        self.size += len(data)
        if self.on_piece is not None:
            self.on_piece()

    def on_end(self, exc: BaseException | None) -> None:
        if self._in_tap:
            self.called_inside_tap = True
        self.end_calls.append(exc)
        if not self.ended.done():
            self.ended.set_result(exc)

    @property
    def body(self) -> bytes:
        return b"".join(self.early + self.pieces)

    async def finished(self, within_s: float = 2.0) -> BaseException | None:
        exc = await asyncio.wait_for(asyncio.shield(self.ended), within_s)
        await asyncio.sleep(0.02)  # room for a second, wrong call
        assert len(self.end_calls) == 1, self.end_calls
        assert not self.called_inside_tap
        return exc


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# == 1. framing ==============================================================================


@pytest.mark.parametrize("writes", ["one_write", "split"])
@on_both_loops
async def test_content_length_body_arrives_exactly(writes: str) -> None:
    wire = answer(BODY, headers=[("X-Test", "yes")])
    head_len = len(wire) - len(BODY)

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        if writes == "one_write":
            await peer.send(wire)
        else:
            await peer.send(*split(wire[:head_len], 5), pause_s=0.001)
            await peer.send(*split(BODY, 4096))
        await peer.until_client_closes()

    async with serving(handler) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/body", [])
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(BODY))
        assert response.headers["x-test"] == "yes"
        assert not response.at_eof
        assert digest(await read_all(response)) == digest(BODY)
        assert response.at_eof
        assert await response.read_any() == b""
        assert await response.read_any() == b""


CHUNKED_CASES = {
    # every write one byte: size lines, CRLFs and the trailer all split everywhere
    "bytewise": (
        b"1\r\na\r\n"
        + b"b;name=value\r\nhello world\r\n"
        + chunk(b"\r\n0\r\n\r\n")
        + chunk(b"z" * 0x1F)
        + b"0\r\nX-Trailer: t\r\n\r\n",
        1,
        b"a" + b"hello world" + b"\r\n0\r\n\r\n" + b"z" * 0x1F,
    ),
    "seven_bytes": (
        chunked(bytes(range(256)), b"x" * 0x1F4, b"y", b"\r\n" * 20, b"q" * 0xAB),
        7,
        bytes(range(256)) + b"x" * 0x1F4 + b"y" + b"\r\n" * 20 + b"q" * 0xAB,
    ),
}


@pytest.mark.parametrize("case", sorted(CHUNKED_CASES))
@on_both_loops
async def test_chunked_body_split_across_small_writes(case: str) -> None:
    encoded, step, expected = CHUNKED_CASES[case]
    wire = head(headers=[("Transfer-Encoding", "chunked")]) + encoded

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(*split(wire, step), pause_s=0.001)
        while await peer.read_request() is not None:
            await peer.send(answer(b"next"))

    async with serving(handler) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/chunked", [])
        assert response.status == 200
        assert await read_all(response) == expected
        assert await response.read_any() == b""
        assert response.at_eof
        response.release()
        # the terminating chunk and trailer were consumed exactly: the connection is reusable
        again = await pool.request("GET", "/again", [])
        assert await read_all(again) == b"next"
        again.release()
    assert srv.accepted == 1


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
@on_both_loops
async def test_close_delimited_body_ends_at_eof(version: str) -> None:
    pieces = [b"first ", b"second ", b"third\r\n\r\n0\r\n\r\n"]

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(head(headers=[("Content-Type", "text/plain")], version=version))
        await peer.send(*pieces, pause_s=0.01)
        peer.close()

    async with serving(handler) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/", [])
        assert response.status == 200
        assert await read_all(response) == b"".join(pieces)
        assert await response.read_any() == b""
        assert response.at_eof
        response.release()
        assert pool.open_connections == 0
        assert pool.idle_connections == 0
        second = await pool.request("GET", "/", [])
        assert await read_all(second) == b"".join(pieces)
        second.release()
    assert srv.accepted == 2


@on_both_loops
async def test_response_headers_keep_names_and_decode_values() -> None:
    raw_head = (
        b"HTTP/1.1 201 Created\r\n"
        b"Content-Length: 2\r\n"
        b"X-Name-Case: A\r\n"
        b"Set-Cookie: a=1\r\n"
        b"Set-Cookie: b=2\r\n"
        b"X-Utf8: \xc3\xa9t\xc3\xa9\r\n"
        b"X-Raw: \xff!\r\n"
        b"X-Spaces: a  b\r\n"
        b"\r\n"
    )
    async with serving(answer_each(lambda _: raw_head + b"ok")) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/", [])
        assert response.status == 201
        assert isinstance(response.headers, CIMultiDictProxy)
        assert "X-Name-Case" in list(response.headers.keys())
        assert response.headers["x-name-case"] == "A"
        assert response.headers.getall("set-cookie") == ["a=1", "b=2"]
        assert response.headers["X-Utf8"] == "été"
        assert response.headers["X-Raw"] == "\udcff!"
        assert response.headers["X-Spaces"] == "a  b"
        assert await read_all(response) == b"ok"
        response.release()


# == 2. keep-alive ===========================================================================


@on_both_loops
async def test_a_finished_exchange_leaves_nothing_for_the_garbage_collector() -> None:
    """A response and its parser refer to each other while parsing; once the exchange is
    over they are freed by reference counting, not after the next full collection."""

    def parsers() -> int:
        return sum(type(o) is httptools.HttpResponseParser for o in gc.get_objects())

    async with serving(answer_each(lambda _: chunked_answer(b"abc", b"def"))) as srv:
        async with pool_for(srv) as pool:
            gc.collect()
            gc.disable()
            try:
                before = parsers()
                for consumer in ("read_any", "tap"):
                    response = await pool.request("GET", "/", [])
                    if consumer == "read_any":
                        assert await read_all(response) == b"abcdef"
                    else:
                        collector = Collector()
                        collector.tap(response)
                        assert await collector.finished() is None
                        del collector
                    response.release()
                    del response
                    assert parsers() == before, consumer
            finally:
                gc.enable()


@on_both_loops
async def test_a_burst_of_connections_to_a_host_name_looks_it_up_once() -> None:
    """The pool reuses a name's addresses for DNS_TTL_S (localhost may list ::1 first: the
    server listens on 127.0.0.1 only, so the next address is tried). Without the pool's own
    lookup the default loop's create_connection asks once per connection. uvloop's
    sock_connect passes each address it is given, an IP literal, through getaddrinfo: not a
    name lookup, not counted."""
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    real_getaddrinfo = loop.getaddrinfo

    async def counted(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_ip_literal(host):
            lookups.append(host)
        return await real_getaddrinfo(host, *args, **kwargs)

    loop.getaddrinfo = counted  # type: ignore[method-assign]
    try:
        async with (
            serving(answer_each(lambda _: answer(b"ok"))) as srv,
            pool_for(srv, base_url=f"http://localhost:{srv.port}") as pool,
        ):
            responses = await asyncio.gather(*(pool.request("GET", "/", []) for _ in range(20)))
            assert [await read_all(r) for r in responses] == [b"ok"] * 20
            for response in responses:
                response.release()
            assert srv.accepted == 20
    finally:
        del loop.getaddrinfo
    assert lookups == ["localhost"]


@on_both_loops
async def test_fifty_sequential_requests_use_one_connection() -> None:
    def respond(request: Request) -> bytes:
        n = int(request.target.rsplit("/", 1)[1])
        body = f"answer {n}".encode()
        if n % 3 == 0:
            return answer(body)
        if n % 3 == 1:
            return chunked_answer(body[:3], body[3:])
        return answer(body, headers=[("Connection", "keep-alive")])

    async with serving(answer_each(respond)) as srv, pool_for(srv) as pool:
        for n in range(50):
            response = await pool.request("GET", f"/n/{n}", [])
            assert response.status == 200
            assert await read_all(response) == f"answer {n}".encode()
            response.release()
            assert pool.open_connections == 1
            assert pool.idle_connections == 1
    assert srv.accepted == 1
    assert [r.target for r in srv.requests] == [f"/n/{n}" for n in range(50)]


@on_both_loops
async def test_concurrent_requests_each_get_their_own_answer() -> None:
    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request.target.startswith("/c/"):
                await asyncio.sleep(0.05)  # every connection stays busy while the others ask
            await peer.send(chunked_answer(request.target.encode(), b"|", request.body))

    async with serving(handler) as srv, pool_for(srv) as pool:
        responses = await asyncio.gather(
            *(pool.request("POST", f"/c/{i}", [], body=b"%d" % i) for i in range(8))
        )
        assert pool.open_connections == 8
        bodies = [await read_all(r) for r in responses]
        assert bodies == [b"/c/%d|%d" % (i, i) for i in range(8)]
        for response in responses:
            response.release()
        assert pool.idle_connections == 8
        for _ in range(8):
            response = await pool.request("POST", "/again", [], body=b"x")
            assert await read_all(response) == b"/again|x"
            response.release()
    assert srv.accepted == 8


@pytest.mark.parametrize(
    "wire",
    [
        answer(b"bye", headers=[("Connection", "close")]),
        answer(b"bye", version="HTTP/1.0"),
    ],
    ids=["connection_close", "http10"],
)
@on_both_loops
async def test_answer_that_forbids_keepalive_is_not_reused(wire: bytes) -> None:
    # the server itself would keep the connection open: only the client's reading closes it
    async with serving(answer_each(lambda _: wire)) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/", [])
        assert await read_all(response) == b"bye"
        response.release()
        await closed_by_client(srv.peers[0])
        assert pool.open_connections == 0
        assert pool.idle_connections == 0
        second = await pool.request("GET", "/", [])
        assert await read_all(second) == b"bye"
        second.release()
    assert srv.accepted == 2


@pytest.mark.parametrize("how", ["unread", "partly_read", "read_then_close"])
@on_both_loops
async def test_answer_released_before_its_end_closes_the_connection(how: str) -> None:
    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            if peer.index == 0 and how == "partly_read":
                await peer.send(head(headers=[("Content-Length", str(len(BODY)))]) + BODY[:1000])
            else:
                await peer.send(answer(BODY))

    async with serving(handler) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/", [])
        if how == "unread":
            await asyncio.sleep(0.05)  # the whole body is on the client side, unread
        elif how == "partly_read":
            assert BODY.startswith(await read_at_least(response, 1))
        else:
            assert await read_all(response) == BODY
        if how == "read_then_close":
            response.close()
        else:
            response.release()
        await closed_by_client(srv.peers[0])
        assert pool.open_connections == 0
        second = await pool.request("GET", "/", [])
        assert await read_all(second) == BODY
        second.release()
        assert pool.idle_connections == 1
    assert srv.accepted == 2
    assert len(srv.peers[0].requests) == 1


EXTRA = {
    "garbage_same_write": [answer(b"ok") + b"EXTRA GARBAGE\r\n\r\n"],
    "answer_same_write": [answer(b"ok") + answer(b"evil")],
    "answer_later": [answer(b"ok"), answer(b"evil")],
}


@pytest.mark.parametrize("case", sorted(EXTRA))
@on_both_loops
async def test_bytes_past_the_answer_are_never_taken_as_the_next_answer(case: str) -> None:
    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request.target == "/first":
                await peer.send(*EXTRA[case], pause_s=0.03)
            else:
                await peer.send(answer(b"mine"))

    async with serving(handler) as srv, pool_for(srv) as pool:
        first = await pool.request("GET", "/first", [])
        assert await read_all(first) == b"ok"
        first.release()
        await asyncio.sleep(0.1)  # the extra bytes are in
        second = await pool.request("GET", "/second", [])
        assert second.status == 200
        assert await read_all(second) == b"mine"
        second.release()
    assert [r.target for r in srv.requests] == ["/first", "/second"]


@on_both_loops
async def test_idle_connection_closes_after_keepalive_s() -> None:
    async with serving(answer_each(lambda _: answer(b"ok"))) as srv:
        pool = Pool(srv.base_url, connect_timeout_s=1.0, idle_timeout_s=1.0, keepalive_s=0.1)
        try:
            response = await pool.request("GET", "/", [])
            assert await read_all(response) == b"ok"
            response.release()
            assert pool.idle_connections == 1
            await closed_by_client(srv.peers[0])
            assert (pool.open_connections, pool.idle_connections) == (0, 0)
            response = await pool.request("GET", "/", [])
            assert await read_all(response) == b"ok"
            response.release()
        finally:
            await pool.aclose()
    assert srv.accepted == 2


# == 3. stale keep-alive =====================================================================


@pytest.mark.parametrize("how", ["closed_while_idle", "fin_on_next_request", "rst_on_next_request"])
@on_both_loops
async def test_stale_idle_connection_is_replaced(how: str) -> None:
    server_closed = asyncio.Event()

    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            await peer.send(answer(b"one"))
            if how != "closed_while_idle":
                assert await peer.read_request() is not None
            peer.close(reset=how == "rst_on_next_request")
            server_closed.set()
            return
        while await peer.read_request() is not None:
            await peer.send(answer(b"two"))

    async with serving(handler) as srv, pool_for(srv) as pool:
        first = await pool.request("POST", "/a", [("X-N", "1")], body=b"payload")
        assert await read_all(first) == b"one"
        first.release()
        if how == "closed_while_idle":
            await server_closed.wait()
        second = await pool.request("POST", "/b", [("X-N", "2")], body=b"again")
        assert second.status == 200
        assert await read_all(second) == b"two"
        second.release()
        assert pool.open_connections == 1
    assert srv.accepted == 2
    retried = srv.peers[1].requests[0]
    assert (retried.method, retried.target, retried.body) == ("POST", "/b", b"again")
    assert retried.values("X-N") == ["2"]
    if how != "closed_while_idle":
        lost = srv.peers[0].requests[1]
        assert lost.raw_head == retried.raw_head
        assert lost.body == retried.body


@on_both_loops
async def test_stale_retry_happens_once() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        if peer.index == 0:
            await peer.send(answer(b"one"))
            await peer.read_request()
        peer.close()

    async with serving(handler) as srv, pool_for(srv) as pool:
        first = await pool.request("GET", "/a", [])
        assert await read_all(first) == b"one"
        first.release()
        with pytest.raises(Disconnected):
            await pool.request("GET", "/b", [])
        await asyncio.sleep(0.05)
        assert pool.open_connections == 0
    assert srv.accepted == 2
    assert [r.target for r in srv.requests] == ["/a", "/b", "/b"]


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
@on_both_loops
async def test_fresh_connection_closing_before_answer_is_disconnected(reset: bool) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.close(reset=reset)

    async with serving(handler) as srv, pool_for(srv) as pool:
        with pytest.raises(Disconnected):
            await pool.request("GET", "/", [])
        await asyncio.sleep(0.05)
        assert pool.open_connections == 0
    assert srv.accepted == 1


@on_both_loops
async def test_reused_connection_closing_after_part_of_the_head_is_not_retried() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(answer(b"one"))
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")
        peer.close()

    async with serving(handler) as srv, pool_for(srv) as pool:
        first = await pool.request("GET", "/a", [])
        assert await read_all(first) == b"one"
        first.release()
        with pytest.raises(Disconnected):
            await pool.request("GET", "/b", [])
        await asyncio.sleep(0.05)
    assert srv.accepted == 1


# == 4. disconnect mid-body ==================================================================

PREFIX = bytes(range(200)) * 2  # 400 bytes
MID_BODY = {
    "content_length": (head(headers=[("Content-Length", "1000")]) + PREFIX, False),
    "content_length_rst": (head(headers=[("Content-Length", "1000")]) + PREFIX, True),
    "chunked_between_chunks": (
        head(headers=[("Transfer-Encoding", "chunked")]) + chunk(PREFIX),
        False,
    ),
    "chunked_inside_chunk": (
        head(headers=[("Transfer-Encoding", "chunked")]) + b"3e8\r\n" + PREFIX,
        False,
    ),
}


@pytest.mark.parametrize("consumer", ["read_any", "tap"])
@pytest.mark.parametrize("case", sorted(MID_BODY))
@on_both_loops
async def test_disconnect_mid_body(case: str, consumer: str) -> None:
    wire, reset = MID_BODY[case]
    go = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(wire)
        await go.wait()
        peer.close(reset=reset)

    async with serving(handler) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/", [])
        if consumer == "read_any":
            assert await read_at_least(response, len(PREFIX)) == PREFIX
            go.set()
            with pytest.raises(Disconnected):
                await response.read_any()
        else:
            collector = Collector()
            collector.tap(response)
            await until(lambda: len(collector.body) >= len(PREFIX))
            go.set()
            assert isinstance(await collector.finished(), Disconnected)
            assert collector.body == PREFIX
        assert not response.at_eof
        response.release()
        await until(lambda: pool.open_connections == 0)
    assert srv.accepted == 1


# == 5. backpressure =========================================================================


def big_server(framing: str, drained: asyncio.Event, peers: list[Peer]) -> Handler:
    if framing == "content_length":
        wire = head(headers=[("Content-Length", str(len(BIG)))]) + BIG
    else:
        wire = head(headers=[("Transfer-Encoding", "chunked")]) + BIG_CHUNKED

    async def handler(peer: Peer) -> None:
        peers.append(peer)
        await peer.read_request()
        peer.writer.write(wire)  # asyncio keeps what the socket does not take
        await peer.writer.drain()
        drained.set()
        await peer.until_client_closes()

    return handler


def unsent(peer: Peer) -> int:
    return peer.writer.transport.get_write_buffer_size()


@pytest.mark.parametrize("framing", ["content_length", "chunked"])
@on_both_loops
async def test_unread_body_stays_bounded_and_arrives_intact(framing: str) -> None:
    drained = asyncio.Event()
    peers: list[Peer] = []
    async with serving(big_server(framing, drained, peers)) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/big", [])
        await asyncio.sleep(0.2)  # nobody reads
        assert not drained.is_set(), "the server pushed all 24 MiB: nothing held the client back"
        assert unsent(peers[0]) > 0
        first = await response.read_any()
        assert len(first) <= HIGH_WATER + (1 << 20), "the client buffered past HIGH_WATER"
        body = first + await read_all(response)
        assert digest(body) == digest(BIG)
        assert drained.is_set()
        response.release()
        assert pool.idle_connections == 1


@pytest.mark.parametrize("when", ["tap_at_once", "tap_after_high_water"])
@pytest.mark.parametrize("framing", ["content_length", "chunked"])
@on_both_loops
async def test_tap_pause_and_resume_bound_the_sink(framing: str, when: str) -> None:
    drained = asyncio.Event()
    peers: list[Peer] = []
    async with serving(big_server(framing, drained, peers)) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/big", [])
        if when == "tap_after_high_water":
            await asyncio.sleep(0.1)  # reading stopped at HIGH_WATER; the tap must restart it
        collector = Collector()
        paused_at: list[int] = []

        def pause_after_a_mebibyte() -> None:
            if not paused_at and collector.size >= 1 << 20:
                response.pause_reading()
                paused_at.append(collector.size)

        collector.on_piece = pause_after_a_mebibyte
        collector.tap(response)
        assert sum(map(len, collector.early)) <= HIGH_WATER + (1 << 20)
        await until(lambda: bool(paused_at))
        await asyncio.sleep(0.15)
        assert collector.size - paused_at[0] < 1 << 20, "the sink kept receiving while paused"
        assert not drained.is_set()
        assert unsent(peers[0]) > 0
        response.resume_reading()
        assert await collector.finished(within_s=5.0) is None
        assert digest(collector.body) == digest(BIG)
        assert response.at_eof
        response.release()
        assert pool.idle_connections == 1


@on_both_loops
async def test_tap_after_the_body_ended_leaves_the_connection_usable() -> None:
    # the read that takes the buffer past HIGH_WATER is the one that ends the body
    body = BODY[: HIGH_WATER + 1]
    async with serving(answer_each(lambda _: answer(body))) as srv, pool_for(srv) as pool:
        for _ in range(2):
            response = await pool.request("GET", "/", [])
            await asyncio.sleep(0.05)  # the whole body is on the client side
            collector = Collector()
            collector.tap(response)
            assert await collector.finished() is None
            assert digest(collector.body) == digest(body)
            assert response.at_eof
            response.release()
            assert pool.idle_connections == 1
    assert srv.accepted == 1


# == 6. idle timeout =========================================================================


@on_both_loops
async def test_head_that_never_comes_is_idle_timeout() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.until_client_closes()

    async with serving(handler) as srv, pool_for(srv, idle_timeout_s=0.2) as pool:
        with pytest.raises(IdleTimeout, match=r"no byte for 0\.2 s, waiting for the answer's head"):
            await pool.request("GET", "/", [])
        await closed_by_client(srv.peers[0])
        assert pool.open_connections == 0


@pytest.mark.parametrize("consumer", ["read_any", "tap"])
@on_both_loops
async def test_body_that_stalls_is_idle_timeout(consumer: str) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(head(headers=[("Content-Length", "100")]) + b"0123456789")
        await peer.until_client_closes()

    async with serving(handler) as srv, pool_for(srv, idle_timeout_s=0.2) as pool:
        response = await pool.request("GET", "/", [])
        error: BaseException | None
        if consumer == "read_any":
            assert await read_at_least(response, 10) == b"0123456789"
            with pytest.raises(IdleTimeout) as raised:
                await response.read_any()
            error = raised.value
        else:
            collector = Collector()
            collector.tap(response)
            error = await collector.finished()
            assert collector.body == b"0123456789"
            assert collector.end_calls == [error]
        assert isinstance(error, IdleTimeout)
        assert "waiting for more of the body" in str(error)
        response.release()
        await closed_by_client(srv.peers[0])


@on_both_loops
async def test_slow_but_steady_body_is_not_idle_timeout() -> None:
    pieces = [b"piece %d;" % i for i in range(4)]

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await asyncio.sleep(0.07)
        await peer.send(head(headers=[("Transfer-Encoding", "chunked")]))
        await peer.send(*(chunk(p) for p in pieces), b"0\r\n\r\n", pause_s=0.07)
        await peer.until_client_closes()

    # the server's pauses (asyncio.sleep never returns early) add up to 0.35 s: longer than
    # idle_timeout_s in total, each shorter
    async with serving(handler) as srv, pool_for(srv, idle_timeout_s=0.2) as pool:
        response = await pool.request("GET", "/", [])
        assert await read_all(response) == b"".join(pieces)
        response.release()
        assert pool.idle_connections == 1


@on_both_loops
async def test_paused_longer_than_idle_timeout_does_not_time_out() -> None:
    a, b, c = b"A" * 100, b"B" * 100, b"C" * 100
    resumed = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(head(headers=[("Content-Length", "300")]) + a)
        await asyncio.sleep(0.05)
        await peer.send(b)  # arrives while the client is paused
        await resumed.wait()
        await asyncio.sleep(0.05)
        await peer.send(c)
        await peer.until_client_closes()

    async with serving(handler) as srv, pool_for(srv, idle_timeout_s=0.2) as pool:
        response = await pool.request("GET", "/", [])
        collector = Collector()

        paused: list[bool] = []

        def pause_after_a() -> None:
            if not paused and len(collector.body) >= len(a):
                response.pause_reading()
                paused.append(True)

        collector.on_piece = pause_after_a
        collector.tap(response)
        pause_after_a()  # when A came before the tap
        await until(lambda: len(collector.body) >= len(a))
        await asyncio.sleep(0.3)  # longer than idle_timeout_s
        assert not collector.ended.done(), collector.end_calls
        assert collector.body == a, "bytes reached the sink while paused"
        response.resume_reading()
        resumed.set()
        assert await collector.finished() is None
        assert collector.body == a + b + c
        response.release()
        assert pool.idle_connections == 1
    assert srv.accepted == 1


@on_both_loops
async def test_idle_timeout_runs_again_after_resume() -> None:
    """Resuming restarts the idle deadline from the resume, not from the last read (0.3 s
    before it): bytes the upstream sends half a timeout after the resume still arrive, and
    a silence after them is an idle timeout again."""
    resumed = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(head(headers=[("Content-Length", "100")]) + b"0123456789")
        await resumed.wait()
        await asyncio.sleep(0.1)  # half the idle timeout after the resume
        await peer.send(b"more")
        await peer.until_client_closes()

    async with serving(handler) as srv, pool_for(srv, idle_timeout_s=0.2) as pool:
        response = await pool.request("GET", "/", [])
        collector = Collector()
        collector.tap(response)
        await until(lambda: len(collector.body) == 10)
        response.pause_reading()
        await asyncio.sleep(0.3)  # longer than idle_timeout_s
        assert not collector.ended.done(), collector.end_calls
        response.resume_reading()
        resumed.set()
        assert isinstance(await collector.finished(), IdleTimeout)
        assert collector.body == b"0123456789more"
        response.release()
        await closed_by_client(srv.peers[0])


@on_both_loops
async def test_body_held_at_high_water_does_not_time_out() -> None:
    body = BIG[: 4 << 20]

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(answer(body))
        await peer.until_client_closes()

    async with serving(handler) as srv, pool_for(srv, idle_timeout_s=0.2) as pool:
        response = await pool.request("GET", "/", [])
        await asyncio.sleep(0.3)  # nobody reads: the client stops reading, the upstream is not idle
        assert digest(await read_all(response)) == digest(body)
        response.release()
        assert pool.idle_connections == 1


# == 7. TLS ==================================================================================


@dataclass(frozen=True)
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for localhost and 127.0.0.1, and contexts that use it."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return Tls(server=server, client=ssl.create_default_context(cafile=str(cert)))


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
@on_both_loops
async def test_tls_streams_chunked_and_reuses_the_connection(tls: Tls, host: str) -> None:
    pieces = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]

    async def handler(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(head(headers=[("Transfer-Encoding", "chunked")]))
            await peer.send(*(chunk(p) for p in pieces), b"0\r\n\r\n", pause_s=0.005)

    async with (
        serving(handler, ssl_context=tls.server, host=host) as srv,
        pool_for(srv, ssl_context=tls.client) as pool,
    ):
        for _ in range(3):
            response = await pool.request("POST", "/v1/chat/completions", [], body=b"{}")
            assert response.status == 200
            assert await read_all(response) == b"".join(pieces)
            response.release()
            assert pool.idle_connections == 1
    assert srv.accepted == 1
    assert [r.values("Host") for r in srv.requests] == [[f"{host}:{srv.port}"]] * 3


@on_both_loops
async def test_tls_close_delimited_body(tls: Tls) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(head(), b"to the ", b"end", pause_s=0.01)
        peer.close()

    async with (
        serving(handler, ssl_context=tls.server, host="localhost") as srv,
        pool_for(srv, ssl_context=tls.client) as pool,
    ):
        response = await pool.request("GET", "/", [])
        assert await read_all(response) == b"to the end"
        assert response.at_eof


@on_both_loops
async def test_tls_untrusted_certificate_is_connect_failed(tls: Tls) -> None:
    async with (
        serving(
            answer_each(lambda _: answer(b"no")), ssl_context=tls.server, host="localhost"
        ) as srv,
        pool_for(srv, ssl_context=None) as pool,
    ):
        with pytest.raises(ConnectFailed):
            await pool.request("GET", "/", [])
        assert pool.open_connections == 0
    assert srv.requests == []


@on_both_loops
async def test_tls_handshake_that_never_completes_is_connect_failed() -> None:
    async def handler(peer: Peer) -> None:
        await peer.until_client_closes()  # reads the ClientHello, never answers

    async with serving(handler) as srv:
        srv.scheme, srv.host = "https", "localhost"
        async with pool_for(srv, connect_timeout_s=0.3) as pool:
            with pytest.raises(ConnectFailed, match=r"took over 0\.3 s"):  # the timeout, no other
                await pool.request("GET", "/", [])
            await closed_by_client(srv.peers[0])
            assert pool.open_connections == 0


@on_both_loops
async def test_refused_connection_is_connect_failed() -> None:
    pool = Pool(f"http://127.0.0.1:{closed_port()}", connect_timeout_s=1.0, idle_timeout_s=1.0)
    try:
        # reported as the refusal it is, not waited out into the connect timeout
        with pytest.raises(ConnectFailed, match="ConnectionRefusedError"):
            await pool.request("GET", "/", [])
        assert pool.open_connections == 0
    finally:
        await pool.aclose()


# == 8. content encoding, bodiless answers, interim answers ===================================

ENCODERS: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "deflate": zlib.compress}


@pytest.mark.parametrize("consumer", ["read_any", "tap"])
@pytest.mark.parametrize("framing", ["content_length", "chunked"])
@pytest.mark.parametrize("encoding", sorted(ENCODERS))
@on_both_loops
async def test_compressed_body_is_delivered_decoded(
    encoding: str, framing: str, consumer: str
) -> None:
    encoded = ENCODERS[encoding](TEXT)
    assert len(encoded) < len(TEXT) // 2
    headers = [("Content-Encoding", encoding), ("Content-Type", "text/plain")]
    if framing == "content_length":
        wire = answer(encoded, headers=headers)
    else:
        wire = chunked_answer(*split(encoded, 777), headers=headers)

    async with serving(answer_each(lambda _: wire)) as srv, pool_for(srv) as pool:
        for _ in range(2):
            response = await pool.request("GET", "/", [])
            if consumer == "read_any":
                body = await read_all(response)
            else:
                collector = Collector()
                collector.tap(response)
                assert await collector.finished() is None
                body = collector.body
            assert digest(body) == digest(TEXT)
            response.release()
    assert srv.accepted == 1


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
@on_both_loops
async def test_corrupt_compressed_body_is_protocol_violation(encoding: str) -> None:
    wire = answer(b"this is not compressed at all", headers=[("Content-Encoding", encoding)])
    async with serving(answer_each(lambda _: wire)) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/", [])
        with pytest.raises(ProtocolViolation):
            await read_all(response)


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
@on_both_loops
async def test_truncated_compressed_body_is_protocol_violation(encoding: str) -> None:
    encoded = ENCODERS[encoding](TEXT)
    wire = answer(encoded[: len(encoded) // 2], headers=[("Content-Encoding", encoding)])
    async with serving(answer_each(lambda _: wire)) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/", [])
        with pytest.raises(ProtocolViolation):
            await read_all(response)


@pytest.mark.parametrize(
    "framing", [("Content-Length", "1234"), ("Transfer-Encoding", "chunked")], ids=["cl", "chunked"]
)
@on_both_loops
async def test_head_answer_has_no_body(framing: tuple[str, str]) -> None:
    def respond(request: Request) -> bytes:
        if request.method == "HEAD":
            return head(headers=[framing])
        return answer(b"after head")

    async with serving(answer_each(respond)) as srv, pool_for(srv, idle_timeout_s=None) as pool:
        response = await pool.request("HEAD", "/", [])
        assert response.status == 200
        assert response.headers[framing[0]] == framing[1]
        assert await asyncio.wait_for(response.read_any(), 1.0) == b""
        assert response.at_eof
        response.release()
        second = await pool.request("GET", "/", [])
        assert await asyncio.wait_for(read_all(second), 1.0) == b"after head"
        second.release()


@on_both_loops
async def test_head_answer_keeps_the_connection() -> None:
    """release(): back to the pool when the body was read to its end and keep-alive holds."""

    def respond(request: Request) -> bytes:
        if request.method == "HEAD":
            return head(headers=[("Content-Length", "1234")])
        return answer(b"after head")

    async with serving(answer_each(respond)) as srv, pool_for(srv) as pool:
        response = await pool.request("HEAD", "/", [])
        assert await response.read_any() == b""
        response.release()
        assert pool.idle_connections == 1
        second = await pool.request("GET", "/", [])
        assert await read_all(second) == b"after head"
        second.release()
    assert srv.accepted == 1


@pytest.mark.parametrize(
    "wire",
    [
        head("204 No Content"),
        head("304 Not Modified", [("Content-Length", "50"), ("ETag", '"x"')]),
        answer(b""),
    ],
    ids=["204", "304_with_length", "200_empty"],
)
@on_both_loops
async def test_bodiless_answer_is_empty_and_keeps_the_connection(wire: bytes) -> None:
    def respond(request: Request) -> bytes:
        return wire if request.target == "/first" else answer(b"next")

    async with serving(answer_each(respond)) as srv, pool_for(srv, idle_timeout_s=None) as pool:
        response = await pool.request("GET", "/first", [])
        assert await asyncio.wait_for(response.read_any(), 1.0) == b""
        assert response.at_eof
        response.release()
        second = await pool.request("GET", "/second", [])
        assert await asyncio.wait_for(read_all(second), 1.0) == b"next"
        second.release()
    assert srv.accepted == 1


FINAL = answer(b"final", headers=[("X-Final", "1")])
INTERIM = {
    "100_same_write": [b"HTTP/1.1 100 Continue\r\n\r\n" + FINAL],
    "100_separate_writes": [b"HTTP/1.1 100 Continue\r\n\r\n", FINAL],
    "103_with_headers": [b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n", FINAL],
    "two_interims": [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + FINAL[:20],
        FINAL[20:],
    ],
}


@pytest.mark.parametrize("case", sorted(INTERIM))
@on_both_loops
async def test_interim_answers_are_skipped(case: str) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(*INTERIM[case], pause_s=0.01)
        while await peer.read_request() is not None:
            await peer.send(answer(b"second"))

    async with serving(handler) as srv, pool_for(srv) as pool:
        response = await pool.request("POST", "/", [], body=b"x")
        assert response.status == 200
        assert response.headers["X-Final"] == "1"
        assert "Link" not in response.headers
        assert await read_all(response) == b"final"
        response.release()
        second = await pool.request("GET", "/", [])
        assert second.status == 200
        assert await read_all(second) == b"second"
        second.release()
    assert srv.accepted == 1


# == 9. protocol errors ======================================================================

GARBAGE = {
    "ssh_banner": b"SSH-2.0-OpenSSH_9.6\r\n",
    "words": b"hello world\r\n\r\n",
    "bad_status": b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
    "header_without_colon": b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
    "bad_content_length": b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
    "two_content_lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
@on_both_loops
async def test_unparsable_answer_is_protocol_violation(case: str) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(GARBAGE[case])
        await peer.until_client_closes()

    async with serving(handler) as srv, pool_for(srv) as pool:
        with pytest.raises(ProtocolViolation):
            await pool.request("GET", "/", [])
        await closed_by_client(srv.peers[0])
        assert pool.open_connections == 0
    assert srv.accepted == 1


@on_both_loops
async def test_bad_chunk_size_mid_body_is_protocol_violation() -> None:
    go = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(head(headers=[("Transfer-Encoding", "chunked")]) + chunk(b"hello"))
        await go.wait()
        await peer.send(b"zz\r\nworld\r\n0\r\n\r\n")
        await peer.until_client_closes()

    async with serving(handler) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/", [])
        assert await read_at_least(response, 5) == b"hello"
        go.set()
        with pytest.raises(ProtocolViolation):
            await response.read_any()
        response.release()
        await closed_by_client(srv.peers[0])


@on_both_loops
async def test_head_just_under_the_limit_is_accepted() -> None:
    wire = padded_head(HEAD_LIMIT - 1024, b"ok")
    async with serving(answer_each(lambda _: wire)) as srv, pool_for(srv) as pool:
        response = await pool.request("GET", "/", [])
        assert response.status == 200
        assert response.headers["X-Pad-0000"] == "a" * 1000
        assert response.headers["X-Last"].startswith("b")
        assert await read_all(response) == b"ok"
        response.release()


@pytest.mark.parametrize(("total", "accepted"), [(HEAD_LIMIT + 1, True), (HEAD_LIMIT + 2, False)])
@on_both_loops
async def test_the_head_limit_counts_the_status_line_and_every_header_line(
    total: int, accepted: bool
) -> None:
    """The bound, to the byte: the status line and header lines count (the status line one
    byte over, a fixed 16 besides the reason), the blank line that ends the head does not."""
    wire = padded_head(total, b"ok")
    async with serving(answer_each(lambda _: wire)) as srv, pool_for(srv) as pool:
        if not accepted:
            with pytest.raises(ProtocolViolation, match="head is over"):
                await pool.request("GET", "/", [])
            return
        response = await pool.request("GET", "/", [])
        assert await read_all(response) == b"ok"
        response.release()


@pytest.mark.parametrize("writes", ["one_write", "8k_writes", "long_reason"])
@on_both_loops
async def test_head_over_the_limit_is_protocol_violation(writes: str) -> None:
    if writes == "long_reason":  # the status line counts too
        wire = b"HTTP/1.1 200 " + b"R" * HEAD_LIMIT + b"\r\nContent-Length: 2\r\n\r\nok"
    else:
        wire = padded_head(HEAD_LIMIT + 1024, b"ok")

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(*split(wire, 8192 if writes == "8k_writes" else len(wire)), pause_s=0.002)
        await peer.until_client_closes()

    async with serving(handler) as srv, pool_for(srv) as pool:
        with pytest.raises(ProtocolViolation):
            await pool.request("GET", "/", [])
        await closed_by_client(srv.peers[0])


ENDLESS = {
    "headers": (b"HTTP/1.1 200 OK\r\n", b"X-Pad: " + b"h" * 1000 + b"\r\n"),
    "one_value": (b"HTTP/1.1 200 OK\r\nX-Big: ", b"v" * 1024),
    "status_line": (b"HTTP/1.1 200 ", b"r" * 1024),
}


@pytest.mark.parametrize("case", sorted(ENDLESS))
@on_both_loops
async def test_endless_head_is_cut_off(case: str) -> None:
    start, unit = ENDLESS[case]
    block = unit * (65536 // len(unit))
    cap = 32 << 20
    outcome: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        sent = 0
        try:
            await peer.send(start)
            while sent < cap:
                await peer.send(block)
                sent += len(block)
        except ConnectionError:
            outcome.set_result(("cut off", sent))
        else:
            outcome.set_result(("sent everything", sent))

    async with serving(handler) as srv, pool_for(srv) as pool:
        with pytest.raises(ProtocolViolation, match=f"over {HEAD_LIMIT} bytes"):
            await pool.request("GET", "/", [])
        how, sent = await asyncio.wait_for(outcome, 2.0)
        assert how == "cut off"
        assert sent < 16 << 20
        assert srv.accepted == 1


@on_both_loops
async def test_switching_protocols_is_protocol_violation() -> None:
    upgrade = head("101 Switching Protocols", [("Upgrade", "websocket"), ("Connection", "Upgrade")])

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(upgrade + b"\x81\x05hello")
        await peer.until_client_closes()

    async with serving(handler) as srv, pool_for(srv) as pool:
        with pytest.raises(ProtocolViolation):
            await pool.request("GET", "/ws", [("Upgrade", "websocket"), ("Connection", "Upgrade")])
        await closed_by_client(srv.peers[0])
        assert pool.open_connections == 0


# == 10. the request on the wire =============================================================


@on_both_loops
async def test_request_goes_on_the_wire_as_given() -> None:
    given = [
        ("Authorization", "Bearer k-123"),
        ("Content-Type", "application/json"),
        ("X-Dup", "1"),
        ("x-lower", "v"),
        ("X-Dup", "2"),
        ("X-Spaces", "a  b"),
    ]
    body = b'{"model": "m", "stream": true}'
    async with serving(answer_each(lambda _: answer(b"ok"))) as srv, pool_for(srv) as pool:
        response = await pool.request("POST", "/v1/chat/completions?x=1&y=%20", given, body=body)
        assert await read_all(response) == b"ok"
        response.release()
    [request] = srv.requests
    assert request.raw_head.startswith(b"POST /v1/chat/completions?x=1&y=%20 HTTP/1.1\r\n")
    assert request.values("Host") == [f"127.0.0.1:{srv.port}"]
    names = {name for name, _ in given}
    assert [(k, v) for k, v in request.headers if k in names] == given
    assert request.values("Content-Length") == [str(len(body))]
    assert request.body == body
    assert srv.peers[0].received == request.raw_head + body  # nothing more was sent


@pytest.mark.parametrize(
    ("method", "body", "length"),
    [
        ("GET", b"", None),
        ("POST", b"", "0"),
        ("PUT", b"", "0"),
        ("PATCH", b"", "0"),
        ("DELETE", b"abc", "3"),
        ("POST", b"\x00" * 70_000, "70000"),
    ],
)
@on_both_loops
async def test_content_length_is_added(method: str, body: bytes, length: str | None) -> None:
    async with serving(answer_each(lambda _: answer(b"ok"))) as srv, pool_for(srv) as pool:
        response = await pool.request(method, "/", [], body=body)
        assert await read_all(response) == b"ok"
        response.release()
    [request] = srv.requests
    assert request.method == method
    assert request.values("Content-Length") == ([] if length is None else [length])
    assert request.body == body


@pytest.mark.parametrize(("scheme", "port"), [("http", 80), ("https", 443)])
@on_both_loops
async def test_host_header_omits_the_default_port(tls: Tls, scheme: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            pytest.skip(f"cannot listen on 127.0.0.1:{port}: {exc}")
    async with serving(
        answer_each(lambda _: answer(b"ok")),
        ssl_context=tls.server if scheme == "https" else None,
        port=port,
    ) as srv:
        for base_url in (f"{scheme}://127.0.0.1:{port}", f"{scheme}://127.0.0.1"):
            async with pool_for(srv, base_url=base_url, ssl_context=tls.client) as pool:
                response = await pool.request("GET", "/", [])
                assert await read_all(response) == b"ok"
                response.release()
    assert [r.values("Host") for r in srv.requests] == [["127.0.0.1"], ["127.0.0.1"]]


@on_both_loops
async def test_a_repeated_request_line_goes_out_as_the_same_bytes() -> None:
    sent = [
        ("POST", "/v1/chat?x=1", [("X-N", "1")], b"{}"),
        ("POST", "/v1/chat?x=1", [("X-N", "2"), ("X-M", "3")], b"{}"),
        ("GET", "/v1/chat?x=1", [], b""),
        ("POST", "/v1/chat?x=1", [], b""),
        ("POST", "/v1/models", [("X-N", "1")], b"{}"),
    ]
    async with serving(answer_each(lambda _: answer(b"ok"))) as srv, pool_for(srv) as pool:
        for method, target, headers, body in sent:
            response = await pool.request(method, target, headers, body)
            assert await read_all(response) == b"ok"
            response.release()
    host = f"Host: {srv.host}:{srv.port}".encode()
    assert [r.raw_head for r in srv.requests] == [
        b"POST /v1/chat?x=1 HTTP/1.1\r\n%s\r\nX-N: 1\r\nContent-Length: 2\r\n\r\n" % host,
        b"POST /v1/chat?x=1 HTTP/1.1\r\n%s\r\nX-N: 2\r\nX-M: 3\r\nContent-Length: 2\r\n\r\n" % host,
        b"GET /v1/chat?x=1 HTTP/1.1\r\n%s\r\n\r\n" % host,
        b"POST /v1/chat?x=1 HTTP/1.1\r\n%s\r\nContent-Length: 0\r\n\r\n" % host,
        b"POST /v1/models HTTP/1.1\r\n%s\r\nX-N: 1\r\nContent-Length: 2\r\n\r\n" % host,
    ]


@on_both_loops
async def test_cr_or_lf_in_the_target_is_value_error_every_time_and_nothing_is_sent() -> None:
    async with serving(answer_each(lambda _: answer(b"ok"))) as srv, pool_for(srv) as pool:
        for _ in range(2):  # a refused request line is not kept for the next request
            with pytest.raises(ValueError):  # noqa: PT011 - the contract names only the type
                await pool.request("GET", "/bad\r\nEvil: 1", [])
        response = await pool.request("GET", "/good", [])
        assert await read_all(response) == b"ok"
        response.release()
    assert [r.target for r in srv.requests] == ["/good"]


BAD_HEADERS = {
    "value_cr": ("X-A", "a\rb"),
    "value_lf": ("X-A", "a\nb"),
    "value_injection": ("X-A", "a\r\nEvil: 1"),
    "name_lf": ("X-A\nEvil", "1"),
    "name_cr": ("X-A\r", "1"),
}


@pytest.mark.parametrize("connection", ["fresh", "reused"])
@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
@on_both_loops
async def test_cr_or_lf_in_a_header_is_value_error_and_nothing_is_sent(
    case: str, connection: str
) -> None:
    async with serving(answer_each(lambda _: answer(b"ok"))) as srv, pool_for(srv) as pool:
        if connection == "reused":
            first = await pool.request("GET", "/first", [])
            assert await read_all(first) == b"ok"
            first.release()
        sent_before = sum(len(p.received) for p in srv.peers)
        with pytest.raises(ValueError):  # noqa: PT011 - the contract names only the type
            await pool.request("GET", "/bad", [("X-Ok", "1"), BAD_HEADERS[case]])
        await asyncio.sleep(0.02)
        assert sum(len(p.received) for p in srv.peers) == sent_before
        response = await pool.request("GET", "/good", [("X-Ok", "1")])
        assert await read_all(response) == b"ok"
        response.release()
    assert [r.target for r in srv.requests][-1] == "/good"
    assert "/bad" not in [r.target for r in srv.requests]
    assert all(not r.values("Evil") for r in srv.requests)
    if connection == "reused":
        assert srv.accepted == 1


# == 11. aclose ==============================================================================


@pytest.mark.parametrize("consumer", ["read_any", "tap"])
@on_both_loops
async def test_aclose_closes_idle_and_busy_connections(consumer: str) -> None:
    async def handler(peer: Peer) -> None:
        while (request := await peer.read_request()) is not None:
            if request.target == "/busy":
                await peer.send(head(headers=[("Content-Length", "1000")]) + b"b" * 100)
                await peer.until_client_closes()
                return
            await peer.send(answer(b"idle"))

    async with serving(handler) as srv:
        pool = Pool(srv.base_url, connect_timeout_s=1.0, idle_timeout_s=2.0)
        try:
            await check_aclose(srv, pool, consumer)
        finally:
            if not pool.closed:
                await pool.aclose()


async def check_aclose(srv: Server, pool: Pool, consumer: str) -> None:
    """One busy connection (a body under way) and one idle; aclose() ends both."""
    busy = await pool.request("GET", "/busy", [])
    collector = Collector()
    if consumer == "read_any":
        assert await read_at_least(busy, 100) == b"b" * 100
    else:
        collector.tap(busy)
        await until(lambda: len(collector.body) == 100)
    idle = await pool.request("GET", "/idle", [])
    assert await read_all(idle) == b"idle"
    idle.release()
    assert (pool.open_connections, pool.idle_connections) == (2, 1)
    assert srv.accepted == 2
    await pool.aclose()
    assert pool.closed
    assert (pool.open_connections, pool.idle_connections) == (0, 0)
    for peer in srv.peers:
        await closed_by_client(peer)
    if consumer == "read_any":
        with pytest.raises(Disconnected):
            await busy.read_any()
    else:
        assert isinstance(await collector.finished(), Disconnected)
        assert isinstance(collector.end_calls[0], H1Error)


# == 12. Happy Eyeballs ======================================================================


@contextmanager
def blackhole() -> Iterator[int]:
    """A port on 127.0.0.1 that never answers a SYN: a listener that accepts nothing, its
    backlog already full (Linux drops the SYNs a full accept queue cannot take)."""
    with socket.socket() as listener, ExitStack() as fillers:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        for _ in range(3):
            filler = fillers.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        yield port


@contextmanager
def resolving(name: str, *ports: int) -> Iterator[list[str]]:
    """`name` resolves to 127.0.0.1 with each of `ports` in turn (a host with several
    addresses, as a real name with IPv6 and IPv4 ones); yields the names looked up."""
    loop = asyncio.get_running_loop()
    real_getaddrinfo = loop.getaddrinfo
    lookups: list[str] = []

    async def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != name:
            return await real_getaddrinfo(host, port, *args, **kwargs)
        lookups.append(host)
        kind, proto = socket.SOCK_STREAM, socket.IPPROTO_TCP
        return [(socket.AF_INET, kind, proto, "", ("127.0.0.1", p)) for p in ports]

    loop.getaddrinfo = fake  # type: ignore[method-assign]
    try:
        yield lookups
    finally:
        del loop.getaddrinfo


@pytest.mark.parametrize("first", ["blackholed", "refused"])
@on_both_loops
async def test_a_dead_first_address_is_overtaken_by_the_next(first: str) -> None:
    """Happy Eyeballs: the second address is tried while the first still hangs, so a
    blackholed first address costs the delay, not the connect timeout (tried in series
    under one timeout, the connect would fail)."""
    async with serving(answer_each(lambda _: answer(b"served"))) as srv:
        with ExitStack() as stack:
            dead = stack.enter_context(blackhole()) if first == "blackholed" else closed_port()
            lookups = stack.enter_context(resolving("upstream.test", dead, srv.port))
            base_url = f"http://upstream.test:{srv.port}"
            async with pool_for(srv, base_url=base_url, connect_timeout_s=3.0) as pool:
                response = await pool.request("GET", "/", [])
                assert await read_all(response) == b"served"
                response.release()
                assert pool.open_connections == 1
            assert lookups == ["upstream.test"]
    assert srv.accepted == 1
    assert srv.requests[0].values("Host") == [f"upstream.test:{srv.port}"]


@on_both_loops
async def test_every_address_dead_is_connect_failed_within_the_connect_timeout() -> None:
    with blackhole() as first, blackhole() as second, resolving("upstream.test", first, second):
        pool = Pool(f"http://upstream.test:{first}", connect_timeout_s=0.6, idle_timeout_s=1.0)
        try:
            with pytest.raises(ConnectFailed, match=r"took over 0\.6 s"):
                await pool.request("GET", "/", [])
            assert pool.open_connections == 0
        finally:
            await pool.aclose()


@on_both_loops
async def test_every_address_refusing_is_connect_failed_naming_the_refusal() -> None:
    with resolving("upstream.test", closed_port(), closed_port()):
        pool = Pool("http://upstream.test:81", connect_timeout_s=2.0, idle_timeout_s=1.0)
        try:
            with pytest.raises(ConnectFailed, match="ConnectionRefusedError"):
                await pool.request("GET", "/", [])
        finally:
            await pool.aclose()


# == 13. through an HTTP proxy ===============================================================


@on_both_loops
async def test_http_upstream_through_a_proxy_is_tunnelled_and_reused() -> None:
    async with (
        serving(answer_each(lambda r: answer(r.target.encode()))) as srv,
        tunnel_proxy() as proxy,
        pool_for(srv, proxy=f"http://alice:s%3Acret@127.0.0.1:{proxy.port}") as pool,
    ):
        for n in range(3):
            response = await pool.request("GET", f"/v1/{n}", [])
            assert await read_all(response) == f"/v1/{n}".encode()
            response.release()
    assert proxy.connects == [f"127.0.0.1:{srv.port}"]  # one tunnel, kept alive
    # base64 of "alice:s:cret": the user and the percent-decoded password
    assert proxy.authorizations == ["Basic YWxpY2U6czpjcmV0"]
    assert [r.target for r in srv.requests] == ["/v1/0", "/v1/1", "/v1/2"]  # origin-form
    assert srv.requests[0].values("Host") == [f"127.0.0.1:{srv.port}"]


@on_both_loops
async def test_https_upstream_through_a_proxy_runs_tls_inside_the_tunnel(tls: Tls) -> None:
    async with (
        serving(
            answer_each(lambda _: answer(b"secret")), ssl_context=tls.server, host="localhost"
        ) as srv,
        tunnel_proxy() as proxy,
        pool_for(srv, ssl_context=tls.client, proxy=proxy.url) as pool,
    ):
        response = await pool.request("GET", "/", [])
        assert await read_all(response) == b"secret"
        response.release()
    assert proxy.connects == [f"localhost:{srv.port}"]  # the proxy resolves the name
    assert proxy.authorizations == [None]


@pytest.mark.parametrize("refusal", ["407 Proxy Authentication Required", "403 Forbidden"])
@on_both_loops
async def test_a_proxy_refusing_connect_is_connect_failed_naming_its_answer(
    refusal: str,
) -> None:
    async with (
        serving(answer_each(lambda _: answer(b"never"))) as srv,
        tunnel_proxy(refuse=refusal) as proxy,
        pool_for(srv, proxy=proxy.url) as pool,
    ):
        with pytest.raises(ConnectFailed, match=f"refused to CONNECT.*{refusal}"):
            await pool.request("GET", "/", [])
        assert pool.open_connections == 0
    assert srv.accepted == 0


PROXY = "http://proxy.test:3128"


@pytest.mark.parametrize(
    ("env", "for_http", "for_https"),
    [
        ({"HTTP_PROXY": PROXY}, PROXY, None),
        ({"http_proxy": "proxy.test:3128"}, PROXY, None),  # no scheme: http:// is meant
        ({"HTTPS_PROXY": PROXY}, None, PROXY),
        ({"HTTP_PROXY": PROXY, "HTTPS_PROXY": PROXY, "NO_PROXY": "upstream.test"}, None, None),
        ({"HTTP_PROXY": PROXY, "HTTPS_PROXY": PROXY, "NO_PROXY": ".test"}, None, None),
        ({"HTTP_PROXY": PROXY, "NO_PROXY": "other.test,localhost"}, PROXY, None),
        ({}, None, None),
    ],
)
def test_environment_proxy_follows_the_proxy_variables(
    env: dict[str, str],
    for_http: str | None,
    for_https: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    found = {
        scheme: environment_proxy(f"{scheme}://upstream.test:8000/v1")
        for scheme in ("http", "https")
    }
    assert {k: str(v) if v is not None else None for k, v in found.items()} == {
        "http": for_http,
        "https": for_https,
    }


@pytest.mark.parametrize(
    "proxy", ["https://u:secret@proxy.test:443", "socks5://u:secret@proxy.test"]
)
def test_a_proxy_other_than_http_is_refused_without_its_password(proxy: str) -> None:
    with pytest.raises(ValueError, match="not an http:// proxy URL") as raised:
        Pool("https://upstream.test", connect_timeout_s=1.0, idle_timeout_s=1.0, proxy=proxy)
    assert "secret" not in str(raised.value)
