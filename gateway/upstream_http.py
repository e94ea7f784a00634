"""A lean HTTP/1.1 client for upstreams: pooled keep-alive connections and httptools' parser.

Why not aiohttp's client: per relayed SSE event, aiohttp's response protocol runs about seven
Python calls (the protocol's `data_received`, a timer re-arm, chunk begin/end hooks, the body
reader's `feed_data`) between the socket read and our code, and per request it builds a
`ClientRequest`, a `ClientResponse`, a connection wrapper and a timer set. Here a socket read
is one Python call (`Connection.data_received`) into llhttp (httptools, the parser uvicorn
uses), which calls `Response.on_body` with the decoded body bytes; a tapped response hands
them straight to its sink.

What it does, and nothing more:

* one `Pool` per upstream origin: idle connections kept `keepalive_s` and reused last-in
  first-out; `Pool.request` retries once on a new connection when a reused one closes before
  any byte of the answer (the upstream dropped an idle keep-alive connection);
* TCP or TLS connect within `connect_timeout_s` (the lookup, every attempt and the TLS
  handshake together); a host name's addresses are looked up once per `DNS_TTL_S` (one
  lookup shared by a burst of new connections), then tried with Happy Eyeballs (RFC 8305,
  the loop's own `staggered_race`, as `loop.create_connection(happy_eyeballs_delay=...)`):
  address families interleaved, the next address tried `HAPPY_EYEBALLS_DELAY_S` after the
  previous one started or at once when it failed, the first to connect wins;
* an HTTP proxy (`proxy`, e.g. from `environment_proxy`): the connection is a CONNECT
  tunnel through it, for http and https upstreams alike (TLS runs inside the tunnel), with
  `Proxy-Authorization: Basic` from the proxy URL's user and password;
* bodies framed by Content-Length, chunked, or the connection's close; HEAD, 1xx, 204 and
  304 answers; gzip and deflate bodies decoded;
* one idle deadline per exchange (`idle_timeout_s` without a byte, for the head or the body),
  checked against the last read by one sweep per pool every quarter of the timeout (at most
  1 s): no timer per exchange or per read, and a timeout fires within a quarter of its
  length; time the consumer holds the upstream back (`pause_reading`) is not the upstream's
  silence;
* backpressure: a body nobody reads pauses the socket past `HIGH_WATER` buffered bytes; a
  tapped body is paused by its consumer;
* bounds: the status line and headers at most `HEAD_LIMIT` bytes; no upgrades.

The pool's size is bounded by the caller (`UpstreamClient.slots`).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import socket
import ssl
import urllib.request
import zlib
from asyncio.staggered import staggered_race
from collections.abc import Callable, Iterable
from typing import Any

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

HEAD_LIMIT = 64 * 1024
HIGH_WATER = 64 * 1024
KEEPALIVE_S = 30.0
#: how long a host name's addresses are reused for new connections (aiohttp's default too)
DNS_TTL_S = 10.0
#: Happy Eyeballs: how long one address has before the next is tried too (RFC 8305's and
#: aiohttp's connector's 250 ms)
HAPPY_EYEBALLS_DELAY_S = 0.25
#: methods whose request carries a Content-Length even when the body is empty
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_NO_BODY_STATUS = frozenset({204, 304})
#: a request body below this size goes out in the same write as the head
_JOINED_BODY_BYTES = 16 * 1024
#: at most this many (method, target) request lines are kept (a query string varies)
START_LINE_ENTRIES = 256

Sink = Callable[[bytes], None]
#: an address to connect to: (family, socket address)
Address = tuple[int, tuple[Any, ...]]
OnEnd = Callable[[BaseException | None], None]


class H1Error(Exception):
    """An exchange with the upstream failed."""


class ConnectFailed(H1Error):
    """The TCP or TLS connect failed or took longer than the connect timeout."""


class Disconnected(H1Error):
    """The connection closed or reset before the answer was complete."""


class ProtocolViolation(H1Error):
    """The upstream's answer could not be parsed, or broke a bound."""


class IdleTimeout(H1Error):
    """The upstream sent no byte for the idle timeout."""


class Pool:
    """Keep-alive connections to one origin (scheme, host, port)."""

    def __init__(
        self,
        base_url: str | URL,
        *,
        connect_timeout_s: float,
        idle_timeout_s: float | None,
        keepalive_s: float = KEEPALIVE_S,
        ssl_context: ssl.SSLContext | None = None,
        proxy: str | URL | None = None,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"not an http(s) URL: {base_url}")
        self.host = url.host
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = None
        if url.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
        default_port = url.port is None or url.is_default_port()
        host = f"[{url.host}]" if ":" in url.host else url.host
        self._host_line = f"Host: {host}" if default_port else f"Host: {host}:{self.port}"
        #: request and Host lines by (method, target), see `_start`
        self._starts: dict[tuple[str, str], str] = {}
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s or None
        self.keepalive_s = keepalive_s
        self._idle: list[Connection] = []
        self._live: set[Connection] = set()
        self.closed = False
        #: what a connection dials: the upstream, or the proxy that tunnels to it
        self._tunnel: bytes | None = None
        dial_host, dial_port = self.host, self.port
        if proxy is not None:
            proxy_url = URL(proxy)
            if proxy_url.scheme != "http" or not proxy_url.host:
                raise ValueError(f"not an http:// proxy URL: {proxy_url.with_password(None)}")
            dial_host, dial_port = proxy_url.host, proxy_url.port or 80
            self._tunnel = _connect_head(url.host, self.port, proxy_url)
        self._dial = (dial_host, dial_port)
        #: the dialled host's addresses: fixed for an IP literal, else looked up (_addresses)
        literal = _ip_address(dial_host, dial_port)
        self._addresses_until = float("inf") if literal is not None else 0.0
        self._address_list: list[Address] = [literal] if literal is not None else []
        self._lookup: asyncio.Task[list[Address]] | None = None
        #: exchanges whose idle deadline runs, and the sweep that checks them
        self._watched: set[Response] = set()
        self._sweep_handle: asyncio.TimerHandle | None = None

    @property
    def open_connections(self) -> int:
        return len(self._live)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes = b""
    ) -> Response:
        """Send one request; return once the answer's status line and headers arrived."""
        if self.closed:
            raise RuntimeError("the pool is closed")
        head = self._head(method, target, headers, body)
        conn = self._take_idle()
        if conn is not None:
            try:
                return await conn.exchange(method, head, body)
            except Disconnected:
                if conn.answered_bytes:
                    raise
                # a stale keep-alive connection: the upstream closed it while it was idle
        conn = await self._connect()
        return await conn.exchange(method, head, body)

    async def aclose(self) -> None:
        self.closed = True
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        for conn in list(self._live):
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks

    # -- the connections ----------------------------------------------------------------------

    def _head(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> bytes:
        start = self._starts.get((method, target)) or self._start(method, target)
        lines = [f"{name}: {value}\r\n" for name, value in headers]
        fields, count = "".join(lines), len(lines)
        if fields.count("\n") != count or fields.count("\r") != count:
            raise ValueError("a header name or value contains CR or LF")
        if body or method in _BODY_METHODS:
            return f"{start}{fields}Content-Length: {len(body)}\r\n\r\n".encode(
                "utf-8", "surrogateescape"
            )
        return f"{start}{fields}\r\n".encode("utf-8", "surrogateescape")

    def _start(self, method: str, target: str) -> str:
        """The request line and the Host line, kept for the next request with the same method
        and target (nearly every request is one of a handful)."""
        start = f"{method} {target} HTTP/1.1\r\n{self._host_line}\r\n"
        if start.count("\n") != 2 or start.count("\r") != 2:
            raise ValueError("the method or the target contains CR or LF")
        if len(self._starts) < START_LINE_ENTRIES:
            self._starts[method, target] = start
        return start

    def _take_idle(self) -> Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            conn.leave_pool()
            if conn.usable:
                return conn
            conn.close()
        return None

    async def _connect(self) -> Connection:
        """A new connection: Happy Eyeballs over the dialled host's addresses, the proxy's
        tunnel if any, then TLS if the upstream is https, all within the connect timeout."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                sock = await self._dial_any(await self._addresses())
                try:
                    if self._tunnel is not None:
                        await self._open_tunnel(sock)
                    _, conn = await loop.create_connection(
                        lambda: Connection(self),
                        sock=sock,
                        ssl=self._ssl,
                        server_hostname=self.host if self._ssl is not None else None,
                    )
                except BaseException:
                    sock.close()
                    raise
                return conn
        except TimeoutError:
            raise ConnectFailed(
                f"connect to {self.host}:{self.port} took over {self.connect_timeout_s} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"connect to {self.host}:{self.port} failed: {exc!r}") from exc

    async def _dial_any(self, addresses: list[Address]) -> socket.socket:
        """A connected socket to the first address that takes it (RFC 8305's race)."""
        if len(addresses) == 1:
            return await _dial(*addresses[0])
        ordered = _interleaved(addresses)
        sock, _, errors = await staggered_race(
            [functools.partial(_dial, *address) for address in ordered], HAPPY_EYEBALLS_DELAY_S
        )
        if sock is None:
            failed = [e for e in errors if e is not None]
            raise failed[-1] if failed else OSError(f"no address of {self._dial[0]} connected")
        return sock  # type: ignore[no-any-return]

    async def _open_tunnel(self, sock: socket.socket) -> None:
        """CONNECT through the proxy: its answer must be 2xx, and nothing after its head."""
        assert self._tunnel is not None
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, self._tunnel)
        answer = b""
        while b"\r\n\r\n" not in answer:
            if len(answer) > HEAD_LIMIT:
                raise ConnectFailed(f"the proxy's answer to CONNECT is over {HEAD_LIMIT} bytes")
            piece = await loop.sock_recv(sock, HEAD_LIMIT)
            if not piece:
                raise ConnectFailed("the proxy closed the connection instead of answering CONNECT")
            answer += piece
        status_line = answer.partition(b"\r\n")[0].decode("latin-1")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ConnectFailed(f"the proxy's answer to CONNECT is not HTTP: {status_line!r}")
        if not 200 <= int(code) < 300:
            raise ConnectFailed(
                f"the proxy refused to CONNECT to {self.host}:{self.port}: {rest.strip()}"
            )
        if not answer.endswith(b"\r\n\r\n"):  # the upstream cannot have spoken yet
            raise ConnectFailed("the proxy sent bytes after its answer to CONNECT")

    async def _addresses(self) -> list[Address]:
        """The dialled host's addresses, looked up at most once per DNS_TTL_S by all connects."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._addresses_until:
            return self._address_list
        if self._lookup is None or self._lookup.done():
            self._lookup = loop.create_task(self._look_up())
            self._lookup.add_done_callback(_retrieve)
        # shielded: a connect that gives up does not cancel the others' lookup
        return await asyncio.shield(self._lookup)

    async def _look_up(self) -> list[Address]:
        loop = asyncio.get_running_loop()
        host, port = self._dial
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found = list(dict.fromkeys((int(info[0]), tuple(info[4])) for info in infos))
        if not found:
            raise OSError(f"no address for {host}")
        self._address_list, self._addresses_until = found, loop.time() + DNS_TTL_S
        return found

    # -- idle deadlines -------------------------------------------------------------------------

    def watch(self, response: Response) -> None:
        self._watched.add(response)
        if self._sweep_handle is None:
            self._arm_sweep()

    def unwatch(self, response: Response) -> None:
        self._watched.discard(response)

    def _sweep(self) -> None:
        self._sweep_handle = None
        now = asyncio.get_running_loop().time()
        for response in list(self._watched):  # a timeout takes the response out of the set
            response.check_idle(now)
        if self._watched:
            self._arm_sweep()

    def _arm_sweep(self) -> None:
        if self.idle_timeout_s is not None:
            every = min(self.idle_timeout_s / 4, 1.0)
            self._sweep_handle = asyncio.get_running_loop().call_later(every, self._sweep)

    def _joined(self, conn: Connection) -> None:
        self._live.add(conn)

    def _put_back(self, conn: Connection) -> None:
        if self.closed or not conn.usable:
            conn.close()
            return
        self._idle.append(conn)
        conn.enter_pool(self.keepalive_s)

    def _gone(self, conn: Connection) -> None:
        self._live.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; carries one exchange at a time."""

    __slots__ = (
        "_clock",
        "_expiry",
        "_feed",
        "_pool",
        "_response",
        "answered_bytes",
        "last_read",
        "lost",
        "reusable",
        "transport",
    )

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self._response: Response | None = None
        #: the current answer's parser, once its head is in: a body read goes straight to it
        self._feed: Callable[[bytes], None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._clock = asyncio.get_running_loop().time
        #: when the last byte arrived (the idle deadline's reference)
        self.last_read = self._clock()
        self.lost = False
        #: whether the current exchange got any byte of its answer (a stale connection got none)
        self.answered_bytes = False
        self.reusable = True

    @property
    def usable(self) -> bool:
        return (
            self.reusable
            and not self.lost
            and self.transport is not None
            and not (self.transport.is_closing())
        )

    async def exchange(self, method: str, head: bytes, body: bytes) -> Response:
        assert self.transport is not None and self._response is None
        response = Response(self, method, self._pool.idle_timeout_s)
        self._response, self.answered_bytes = response, False
        if len(body) < _JOINED_BODY_BYTES:
            self.transport.write(head + body)  # one syscall: copying a small body costs less
        else:
            self.transport.write(head)
            self.transport.write(body)
        response.watch_idle()
        await response.head_done()
        return response

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._pool._joined(self)

    def data_received(self, data: bytes) -> None:
        self.last_read = self._clock()
        feed = self._feed
        if feed is not None:  # the body: one call into the parser, which calls on_body
            try:
                feed(data)
            except _PARSE_ERRORS as exc:
                assert self._response is not None
                self._response.parse_failed(exc)
            return
        response = self._response
        if response is None:  # bytes nobody asked for: the connection cannot be trusted
            self.reusable = False
            self.close()
            return
        self.answered_bytes = True
        response.received(data)

    def reading_body(self, feed: Callable[[bytes], None] | None) -> None:
        """The current answer's head is in (`feed`: its parser), or its body ended (None)."""
        self._feed = feed

    def eof_received(self) -> bool:
        return False  # close the transport: HTTP/1.1 has no half-closed use here

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._pool._gone(self)
        response = self._end_exchange()
        if response is not None:
            response.connection_lost(exc)

    # -- the pool's side ----------------------------------------------------------------------

    def finished(self, response: Response, reuse: bool) -> None:
        """The exchange is over: back to the pool when `reuse`, else closed."""
        if self._response is not response:
            return
        self._end_exchange()
        if reuse and self.usable:
            self._pool._put_back(self)
        else:
            self.close()

    def _end_exchange(self) -> Response | None:
        """No answer is current any more; the one that was lets go of its parser."""
        response, self._response, self._feed = self._response, None, None
        if response is not None:
            response.detach()
        return response

    def enter_pool(self, keepalive_s: float) -> None:
        loop = asyncio.get_running_loop()
        self._expiry = loop.call_later(keepalive_s, self.close)

    def leave_pool(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Response:
    """One answer: its head, then its body, read (`read_any`) or tapped (`tap`)."""

    __slots__ = (
        "_conn",
        "_decoder",
        "_error",
        "_framed",
        "_head_bytes",
        "_head_waiter",
        "_idle_s",
        "_loop",
        "_method",
        "_on_end",
        "_parser",
        "_paused",
        "_pieces",
        "_raw_headers",
        "_sink",
        "_size",
        "_unparsed_head",
        "_waiter",
        "at_eof",
        "headers",
        "status",
    )

    def __init__(self, conn: Connection, method: str, idle_s: float | None) -> None:
        self._conn = conn
        self._method = method
        self._loop = asyncio.get_running_loop()
        #: dropped when the exchange is over: it holds this response's bound callbacks, a
        #: cycle the garbage collector would otherwise have to find
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        #: the head's header names and values in turn, as parsed (None once it is whole)
        self._raw_headers: list[bytes] | None = []
        #: the head's bytes: its status line as parsed (its header lines are counted when it
        #: is whole), and every read while it is not whole
        self._head_bytes = self._unparsed_head = 0
        self._head_waiter: asyncio.Future[None] | None = self._loop.create_future()
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        #: the body ends where its framing says (length or chunked), not at the close
        self._framed = True
        self._decoder: Any = None
        #: body bytes nobody read yet (a list, not a deque: they are always taken together,
        #: and an empty deque is half a kilobyte per stream)
        self._pieces: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._sink: Sink | None = None
        self._on_end: OnEnd | None = None
        self._error: H1Error | None = None
        self.at_eof = False
        self._paused = False
        self._idle_s = idle_s

    # -- reading ------------------------------------------------------------------------------

    async def head_done(self) -> None:
        waiter = self._head_waiter
        if waiter is not None:
            try:
                await waiter
            except BaseException:
                self.close()
                raise

    async def read_any(self) -> bytes:
        """The next body bytes (everything buffered), b"" at the end."""
        while not self._pieces:
            if self._error is not None:
                raise self._error
            if self.at_eof:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        pieces, self._pieces = self._pieces, []
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._size = 0
        if self._paused and self._sink is None:
            self.resume_reading()
        return data

    def tap(self, sink: Sink, on_end: OnEnd) -> list[bytes]:
        """Hand every body piece to `sink` from now on (see the module notes); returns what
        was buffered before. `on_end` is called once, never from inside this call."""
        buffered, self._pieces = self._pieces, []
        self._size = 0
        self._sink, self._on_end = sink, on_end
        if self.at_eof or self._error is not None:
            self._loop.call_soon(self._end_tap)
        elif self._paused:
            self.resume_reading()
        return buffered

    def pause_reading(self) -> None:
        if not self._paused and not self.at_eof and self._conn.transport is not None:
            self._paused = True
            self._conn.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._conn.last_read = self._loop.time()  # the idle deadline counts from here again
            if self._conn.transport is not None and not self._conn.lost:
                self._conn.transport.resume_reading()

    def forget_headers(self) -> None:
        """The caller has what it needed of the headers: a stream that lasts minutes does not
        keep them."""
        self.headers = _NO_HEADERS

    def release(self) -> None:
        """Back to the pool if the body was read to its end (and keep-alive holds)."""
        self._stop_idle()
        self._conn.finished(self, self.at_eof and self._error is None and self._reusable())

    def close(self) -> None:
        """Give up on this answer (its caller is gone): the connection closes, and a tap on
        it hears nothing more; it holds the tap's callbacks no longer, a reference cycle
        (the tap holds this answer) that only the garbage collector could break."""
        self._stop_idle()
        self._sink = self._on_end = None
        self._conn.finished(self, False)

    # -- the connection's callbacks -----------------------------------------------------------

    def received(self, data: bytes) -> None:
        """A read before the head was whole (the body's reads go to the parser directly), or
        after the body ended."""
        if self.at_eof or self._error is not None:  # bytes past the answer's end
            self._conn.close()
            return
        self._unparsed_head += len(data)
        parser = self._parser
        if parser is None:
            return
        try:
            parser.feed_data(data)
        except _PARSE_ERRORS as exc:
            self.parse_failed(exc)
        else:  # a head not whole yet: bound what the parser may hold of it
            if self._raw_headers is not None and self._unparsed_head > HEAD_LIMIT:
                self._fail(_head_too_large())

    def detach(self) -> None:
        """The exchange is over: nothing more is parsed for this answer."""
        self._parser = None

    def parse_failed(self, exc: Exception) -> None:
        if isinstance(exc, httptools.HttpParserUpgrade):
            self._fail(ProtocolViolation("the upstream switched protocols"))
        elif isinstance(exc.__context__, ProtocolViolation):  # raised by on_headers_complete
            self._fail(exc.__context__)
        else:
            self._fail(ProtocolViolation(f"the upstream's answer is not HTTP/1.1: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.at_eof or self._error is not None:
            return
        if self._raw_headers is None and not self._framed:
            self._complete()  # a body delimited by the connection's close
            return
        where = "before the answer's head" if self._raw_headers is not None else "mid-body"
        detail = f": {exc!r}" if exc is not None else ""
        self._fail(Disconnected(f"the upstream closed the connection {where}{detail}"))

    # -- httptools' callbacks -----------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._head_bytes += len(reason) + 16  # the status line's reason, version and code

    def on_header(self, name: bytes, value: bytes) -> None:
        raw = self._raw_headers
        if raw is not None:  # (None: a chunked body's trailers, not kept)
            raw += (name, value)  # their size is counted once, when the head is whole

    def on_headers_complete(self) -> None:
        parser, raw = self._parser, self._raw_headers
        assert parser is not None  # called by that parser
        status = parser.get_status_code()
        if status == 101 or parser.should_upgrade():
            raise ProtocolViolation("the upstream switched protocols")
        if 100 <= status < 200:  # an interim answer: wait for the final one
            self._raw_headers, self._head_bytes, self._unparsed_head = [], 0, 0
            return
        assert raw is not None
        if self._head_bytes + len(b"".join(raw)) + 2 * len(raw) > HEAD_LIMIT:  # ": ", CRLF
            raise _head_too_large()
        self._raw_headers = None
        headers: CIMultiDict[str] = CIMultiDict(
            [
                (k.decode("latin-1"), v.decode("utf-8", "surrogateescape"))
                for k, v in zip(raw[::2], raw[1::2], strict=True)
            ]
        )
        self.status, self.headers = status, CIMultiDictProxy(headers)
        te = headers.get("Transfer-Encoding", "").lower()
        self._framed = "chunked" in te or "Content-Length" in headers
        encoding = headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
        if not parser.should_keep_alive():
            self._conn.reusable = False
        if self._method == "HEAD" or status in _NO_BODY_STATUS:
            # no body, whatever the headers announce; the next answer gets a parser of its own
            self._framed = True
            self._complete()
        else:
            self._conn.reading_body(parser.feed_data)
        self._wake_head()

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            body = self._decoder.decompress(body)
            if not body:
                return
        sink = self._sink
        if sink is not None:
            sink(body)
            return
        self._pieces.append(body)
        self._size += len(body)
        if self._size > HIGH_WATER:
            self.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._raw_headers is not None:  # the end of an interim answer
            return
        if not self.at_eof:
            self._complete()

    # -- the ends -----------------------------------------------------------------------------

    def _complete(self) -> None:
        decoder, self._decoder = self._decoder, None
        if decoder is not None:
            if rest := decoder.flush():
                self.on_body(rest)
            if not decoder.eof:
                self._fail(ProtocolViolation("the compressed body ends before its end"))
                return
        self.at_eof = True
        self._conn.reading_body(None)
        self.resume_reading()  # the connection reads again: the next answer may come on it
        self._stop_idle()
        self._wake()
        if self._sink is not None:
            self._end_tap()

    def _fail(self, error: H1Error) -> None:
        if self.at_eof or self._error is not None:
            return
        self._error = error
        self._stop_idle()
        self._conn.reading_body(None)
        self._conn.reusable = False
        self._conn.close()
        waiter = self._head_waiter
        if waiter is not None:
            self._head_waiter = None
            if not waiter.done():
                waiter.set_exception(error)
            return
        self._wake()
        if self._sink is not None:
            self._end_tap()

    def _end_tap(self) -> None:
        # the sink is a bound method of the tap, which holds this response: let go of it, so
        # that the stream's tap, meter and the rest are freed by reference counting
        on_end, self._on_end, self._sink = self._on_end, None, None
        if on_end is not None:
            on_end(self._error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_head(self) -> None:
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _reusable(self) -> bool:
        return self._framed and self._conn.reusable

    # -- the idle deadline --------------------------------------------------------------------

    def watch_idle(self) -> None:
        if self._idle_s is not None:
            self._conn.last_read = self._loop.time()
            self._conn._pool.watch(self)

    def check_idle(self, now: float) -> None:
        """The pool's sweep: time out if nothing came for the idle timeout (paused time, held
        back by the consumer, does not count: resuming restarts the deadline)."""
        idle_s = self._idle_s
        if idle_s is None or self.at_eof or self._error is not None:
            self._stop_idle()
        elif not self._paused and now - self._conn.last_read >= idle_s:
            where = "the answer's head" if self._raw_headers is not None else "more of the body"
            error = IdleTimeout(f"the upstream sent no byte for {idle_s} s, waiting for {where}")
            self._fail(error)

    def _stop_idle(self) -> None:
        self._conn._pool.unwatch(self)


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_PARSE_ERRORS = (httptools.HttpParserError, httptools.HttpParserUpgrade)


def _ip_address(host: str, port: int) -> Address | None:
    """The address of an IP literal (None for a host name)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)


def _interleaved(addresses: list[Address]) -> list[Address]:
    """RFC 8305 4: the first address's family first, then the families in turn."""
    by_family: dict[int, list[Address]] = {}
    for address in addresses:
        by_family.setdefault(address[0], []).append(address)
    queues = list(by_family.values())
    out: list[Address] = []
    while queues:
        out += [queue.pop(0) for queue in queues]
        queues = [queue for queue in queues if queue]
    return out


async def _dial(family: int, sockaddr: tuple[Any, ...]) -> socket.socket:
    """A TCP socket connected to `sockaddr` (closed again if that fails or is cancelled)."""
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setblocking(False)
        # what create_connection(host, port) sets: small writes (events) go out at once
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect_head(host: str, port: int, proxy: URL) -> bytes:
    """The CONNECT request that opens a tunnel to host:port through `proxy`."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.user is not None:
        credentials = f"{proxy.user}:{proxy.password or ''}".encode()
        lines.append(f"Proxy-Authorization: Basic {base64.b64encode(credentials).decode()}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def environment_proxy(base_url: str | URL) -> URL | None:
    """The proxy the process environment names for `base_url` (`HTTPS_PROXY` for https,
    `HTTP_PROXY` for http, none when `NO_PROXY` lists its host), urllib's rules. Read once,
    when a pool is made: the environment is not consulted per request."""
    url = URL(base_url)
    proxy = urllib.request.getproxies().get(url.scheme)
    if not proxy or not url.host or urllib.request.proxy_bypass(url.host):
        return None
    return URL(proxy if "://" in proxy else f"http://{proxy}")


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A lookup nobody awaits any more must not log "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


def _head_too_large() -> ProtocolViolation:
    return ProtocolViolation(f"the answer's head is over {HEAD_LIMIT} bytes")
