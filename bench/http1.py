"""Just enough HTTP/1.1 framing for the bench's own two ends.

The bench upstream and load generator talk plain HTTP/1.1 over raw asyncio protocols, so
that neither costs more than the proxy it measures. They only need message heads and the two
body framings a proxy may choose (chunked, or Content-Length); anything else is an error the
bench reports rather than guesses around.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

HEAD_END = b"\r\n\r\n"
MAX_HEAD = 65536


class FramingError(Exception):
    """The peer sent bytes that are not the HTTP/1.1 the bench expects."""


@dataclass(frozen=True, slots=True)
class Head:
    """A parsed request or status line with its header fields (names lower-cased)."""

    start: tuple[str, ...]
    headers: dict[str, str]

    def keep_alive(self) -> bool:
        """Whether the connection may carry another message (HTTP/1.1 default: yes)."""
        return "close" not in self.headers.get("connection", "").lower()


def parse_head(raw: bytes) -> Head:
    """Parse the bytes before the blank line: start line, then `Name: value` fields."""
    lines = raw.decode("latin-1").split("\r\n")
    start = tuple(lines[0].split(" ", 2))
    if len(start) < 2:
        raise FramingError(f"bad start line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise FramingError(f"bad header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    return Head(start, headers)


class BodyDecoder(Protocol):
    """Turns the bytes after a head into body pieces; `done` once the body is complete."""

    done: bool
    tail: bytes

    def feed(self, data: bytes) -> list[bytes]:
        """Body pieces in `data`; bytes past the end of the body land in `tail`."""
        ...


class LengthDecoder:
    """A body framed by Content-Length."""

    def __init__(self, length: int) -> None:
        self._remaining = length
        self.done = length == 0
        self.tail = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Deliver up to the remaining length; keep any excess as `tail`."""
        if self.done:
            self.tail += data
            return []
        if len(data) <= self._remaining:
            self._remaining -= len(data)
            self.done = self._remaining == 0
            return [data]
        piece, self.tail = data[: self._remaining], data[self._remaining :]
        self._remaining = 0
        self.done = True
        return [piece]


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkedDecoder:
    """An incremental `Transfer-Encoding: chunked` decoder that accepts any split of its input.

    A proxy may re-chunk (nginx does), so chunk boundaries mean nothing; only the payload,
    concatenated, has to match.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._state = _SIZE
        self._remaining = 0
        self.done = False
        self.tail = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Decode what `data` completes; keep a partial size line for the next call."""
        if self.done:
            self.tail += data
            return []
        buf = self._pending + data if self._pending else data
        out: list[bytes] = []
        pos = 0
        while pos < len(buf) and not self.done:
            if self._state == _DATA:
                pos = self._take_data(buf, pos, out)
                continue
            step = self._take_framing(buf, pos)
            if step < 0:
                break
            pos = step
        self._pending = buf[pos:] if not self.done else b""
        if self.done:
            self.tail = buf[pos:]
        if len(self._pending) > MAX_HEAD:
            raise FramingError("chunk size line too long")
        return out

    def _take_data(self, buf: bytes, pos: int, out: list[bytes]) -> int:
        """Copy chunk payload out of `buf`; return the new position."""
        take = min(self._remaining, len(buf) - pos)
        out.append(buf[pos : pos + take] if pos or take != len(buf) else buf)
        self._remaining -= take
        if self._remaining == 0:
            self._state = _DATA_END
        return pos + take

    def _take_framing(self, buf: bytes, pos: int) -> int:
        """Consume one CRLF-terminated framing line; -1 when it has not fully arrived."""
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return -1
        line = buf[pos:end]
        if self._state == _DATA_END:
            if line:
                raise FramingError("chunk data longer than its size")
            self._state = _SIZE
        elif self._state == _SIZE:
            self._start_chunk(line)
        elif not line:  # _TRAILER: an empty line ends the message
            self.done = True
        return end + 2

    def _start_chunk(self, line: bytes) -> None:
        """Read a chunk-size line (extensions ignored); size 0 begins the trailer."""
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError:
            raise FramingError(f"bad chunk size {line[:40]!r}") from None
        if size == 0:
            self._state = _TRAILER
        else:
            self._remaining = size
            self._state = _DATA


def body_decoder(head: Head) -> BodyDecoder:
    """The decoder for a message's framing: chunked, else Content-Length, else an error."""
    if "chunked" in head.headers.get("transfer-encoding", "").lower():
        return ChunkedDecoder()
    length = head.headers.get("content-length")
    if length is None:
        raise FramingError("neither chunked nor Content-Length: the bench cannot frame it")
    return LengthDecoder(int(length))
