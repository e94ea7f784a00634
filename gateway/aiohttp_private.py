"""Every private aiohttp internal the gateway relies on, in one place.

Tested with aiohttp 3.14.5 (`constraints.txt`); `tests/core/test_private_api.py` checks each
name below on real objects of a real request and fails by name when a release removes or
renames one. Where aiohttp offers a public way, the fallback takes it:

- `StreamResponse._payload_writer`: the prepared response's connection `StreamWriter`, and
  on it `_compress`, `_headers_buf`, `_on_chunk_sent` (private) with `length`,
  `on_body_write`, `chunked`, `output_size`, `transport`, `protocol` and `drain()`
  (public names of an internal class): whether its framing is the plain one
  `gateway.relay_tap` reproduces. `plain_writer` checks that they exist once per writer
  class (with the protocol's class) and their values once per stream; when any is missing or
  not plain it returns None and the relay keeps its awaited loop (`StreamResponse.write`, the
  public way).
- `BaseProtocol._paused` (what the `writing_paused` property returns): the client
  transport's flow control. `plain_writer` checks it exists (once per protocol class);
  `relay_tap.Tap.deliver` then reads it once per event as a plain attribute (the property
  costs a Python call per event: about 90 ns here, most of the fast path's saving). It is
  the one read of an aiohttp private outside this module.
- `StreamResponse._send_headers_immediately` (class attribute, True on `StreamResponse`):
  off, the prepared head waits and leaves with the first body write, as for aiohttp's own
  `web.Response`. `head_with_first_write` turns it off only where it exists; without it the
  head goes out alone at `prepare()` (one more segment, the same bytes).
- `web.Server._kwargs["keepalive_timeout"]`: what each new connection's idle timeout is
  taken from; `set_idle_timeout` changes it for a SIGHUP reload (no public way exists; without
  it the new value applies at restart).
- `aiohttp.web_response.SERVER_SOFTWARE`: the `Server` header of the answers aiohttp writes
  itself (a request it cannot parse); `name_own_answers` replaces it (without it those few
  answers keep aiohttp's default).
- `StreamReader._buffer` and `_http_chunk_splits` (slots): `park_buffer` swaps a fully read
  request body's empty deques for one shared `PARKED` deque. Without them it does nothing
  (about 1.5 KB more per long stream).
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import StreamReader, web
from aiohttp.http_writer import StreamWriter

#: the response's connection writer (set by `StreamResponse.prepare`)
PAYLOAD_WRITER = "_payload_writer"
#: StreamWriter attributes and the value each must have for plain framing: no compression,
#: no declared length, the head already sent, no hooks on the written bytes
PLAIN_WRITER: dict[str, Any] = {
    "_compress": None,
    "length": None,
    "_headers_buf": None,
    "_on_chunk_sent": None,
    "on_body_write": None,
}
#: StreamWriter attributes the tap reads or writes, any value
WRITER_USED = ("chunked", "output_size", "transport", "protocol", "drain")
#: the client protocol's flow control flag, read by `relay_tap.Tap.deliver`
PROTOCOL_PAUSED = "_paused"
#: the StreamResponse class attribute that holds the head until the first write
SEND_HEADERS_IMMEDIATELY = "_send_headers_immediately"
#: the StreamReader slots `park_buffer` replaces
READER_BUFFERS = ("_buffer", "_http_chunk_splits")

R = TypeVar("R", bound=type[web.StreamResponse])


def plain_writer(resp: web.StreamResponse) -> StreamWriter | None:
    """The prepared response's `StreamWriter` when the fast path can write past it (plain
    framing, a transport, the flow-control flag there), else None: use `resp.write`.

    Whether the attributes exist is checked on the first writer with a protocol of its class
    (aiohttp sets them all in `__init__`); per stream, only the values that say plain framing."""
    writer = getattr(resp, PAYLOAD_WRITER, None)
    if type(writer) is not StreamWriter:
        return None
    protocol = type(getattr(writer, "protocol", None))
    plain = _CHECKED[protocol] if protocol in _CHECKED else _check(protocol, writer)
    if plain is None or writer.transport is None:
        return None
    read, values = plain
    return writer if all(map(operator.is_, read(writer), values)) else None


#: PLAIN_WRITER's attributes of a writer (read in one call), and the values of plain framing
Plain = tuple[Callable[[Any], tuple[Any, ...]], tuple[Any, ...]]
#: what `plain_writer` found on the first StreamWriter with a protocol of each class: Plain, or
#: None when one of the attributes it needs is missing
_CHECKED: dict[type, Plain | None] = {}


def _check(protocol: type, writer: StreamWriter) -> Plain | None:
    plain: Plain | None = None
    complete = all(hasattr(writer, name) for name in (*PLAIN_WRITER, *WRITER_USED))
    if complete and hasattr(writer.protocol, PROTOCOL_PAUSED):
        get = operator.attrgetter(*PLAIN_WRITER)  # a tuple for several names, else the value
        read = get if len(PLAIN_WRITER) > 1 else lambda obj: (get(obj),)
        plain = read, tuple(PLAIN_WRITER.values())
    _CHECKED[protocol] = plain
    return plain


def head_with_first_write(cls: R) -> R:
    """Class decorator: `cls`'s prepared head leaves with the first body write (where aiohttp
    still has the switch; otherwise unchanged, the head goes out alone)."""
    if hasattr(web.StreamResponse, SEND_HEADERS_IMMEDIATELY):
        setattr(cls, SEND_HEADERS_IMMEDIATELY, False)
    return cls


class _Parked(collections.deque[bytes]):
    """An empty buffer shared by every request body read to its end: growing it is a bug."""

    __slots__ = ()

    def append(self, item: bytes) -> None:
        raise RuntimeError("a parked reader buffer cannot take data")

    appendleft = append


PARKED = _Parked()


def park_buffer(reader: StreamReader) -> None:
    """Free the empty buffers of a request body read to its end: a stream that lasts minutes
    keeps its request object, and these deques are about 1.5 KB of it.

    Other readers (aiohttp's shared `EMPTY_PAYLOAD` for a body-less request) are left alone,
    and so is every reader when aiohttp no longer has these slots.
    """
    if type(reader) is not StreamReader:
        return
    buffer_name, splits_name = READER_BUFFERS
    buffer = getattr(reader, buffer_name, None)
    if type(buffer) is not collections.deque or buffer or not hasattr(reader, splits_name):
        return
    setattr(reader, buffer_name, PARKED)
    setattr(reader, splits_name, None)


def set_idle_timeout(server: web.Server | None, idle_s: float) -> bool:
    """Make connections that `server` accepts from now on close after idle_s with no request.

    aiohttp's public API sets the keep-alive timeout once, when the runner is built: each new
    connection's `RequestHandler` takes it from the keyword arguments the `web.Server` keeps in
    its private `_kwargs`. Whether that is still so is pinned by a canary test
    (tests/reliability/test_reload.py); False when it is not (nothing was changed).
    """
    kwargs = getattr(server, "_kwargs", None)
    if not isinstance(kwargs, dict) or "keepalive_timeout" not in kwargs:
        return False
    kwargs["keepalive_timeout"] = idle_s
    return True


def name_own_answers(name: str) -> bool:
    """`Server: <name>` on the answers aiohttp writes itself, not only the app's.

    Every answer of the app gets it from app._stamp_answer (`on_response_prepare`); a
    request aiohttp cannot parse is answered (400) before any route matched, so no hook of the
    app runs and aiohttp's default names Python's version and its own. That default is the
    private module global `aiohttp.web_response.SERVER_SOFTWARE`, replaced here for the
    process; False (nothing changed) when a release no longer has it, which
    tests/core/test_server_header.py notices.
    """
    from aiohttp import web_response

    if not isinstance(getattr(web_response, "SERVER_SOFTWARE", None), str):
        return False
    web_response.SERVER_SOFTWARE = name  # type: ignore[attr-defined]
    return True
