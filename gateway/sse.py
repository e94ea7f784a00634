"""Server-sent events, decoded from a copy of the bytes the relay forwards.

Two layers, as openai-python splits them, and no JSON:

* lines: the stream is cut at CR, LF or CRLF, wherever the network split it (a CR that
  ends one chunk and the LF that starts the next are one line end);
* fields: each complete line feeds the WHATWG event-stream state machine
  (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
  `data`, `event`, `id`, `retry`, comments, and a blank line dispatches.

`data` stays bytes, so a UTF-8 character split across chunks needs no care and the JSON
layer can parse it without a decode. Where this module departs from the spec, it says so.

The relay writes every upstream chunk before it hands it here; nothing in this module can
change what the client receives, except through `feed_frames`, where the relay chooses
which frames to write (the `usage: inject` mode drops one event).
"""

from __future__ import annotations

from dataclasses import dataclass

_BOM = b"\xef\xbb\xbf"
_LINE_ENDS = b"\r\n"


@dataclass(slots=True, frozen=True)
class ServerSentEvent:
    """One dispatched event.

    `data` holds the `data:` lines joined with a LF, each without the one space the spec
    allows after the colon. `id` is the last event id seen on the stream, as the spec
    carries it from event to event; `retry` is the `retry:` value sent within this event.
    """

    event: str | None
    data: bytes
    id: str | None
    retry: int | None


#: the byte sequences that complete an empty line, i.e. end an SSE frame (lines end with LF,
#: CR or CRLF, so the empty line after `...\n` may be `\n`, `\r` or `\r\n`)
FRAME_ENDS = (b"\n\n", b"\r\r", b"\n\r", b"\n\r\n", b"\r\r\n")


def ends_frame(data: bytes) -> bool:
    """Whether bytes that end with `data` stop exactly at the end of an SSE frame."""
    return data.endswith(FRAME_ENDS)


Frame = tuple[bytes, ServerSentEvent | None]
"""The raw bytes of one frame (up to and including its blank line) and what it dispatched."""


class SSEDecoder:
    """Incremental decoder for one stream; use one instance per stream, in one mode.

    `feed` returns the events a chunk completes. `feed_frames` returns, in addition, the
    exact bytes of each frame, so that the relay can drop one frame and write every other
    byte unchanged. Both share one implementation, so `pending_raw` is right in both.

    Bytes of a partial line are kept as a list of the pieces fed and joined once, when the
    line ends: a 512 KiB event that arrives in a thousand reads costs one copy, not a
    thousand (each read would otherwise copy and scan everything pending again).

    `max_event_bytes` (feed mode only; a meter's copy): a frame that grows past it is
    dropped, not buffered: the decoder skips to the frame's end and counts it in
    `oversized`. (A read that is exactly one event takes the one-event shortcuts whatever
    its size: it is already in memory, and the transport bounds a read far below any cap.)
    The relay's own frame mode never drops bytes and takes no bound.
    """

    __slots__ = (
        "_bom_pending",
        "_data",
        "_event",
        "_fast_ok",
        "_frame_len",
        "_last_id",
        "_max",
        "_partial",
        "_raw",
        "_retry",
        "_skip_lf",
        "_skip_tail",
        "_skipping",
        "oversized",
    )

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._raw: list[bytes] = []  # complete lines of the frame in progress, as fed
        self._partial: list[bytes] = []  # the pieces of the line in progress (no line end)
        self._frame_len = 0  # bytes in _raw and _partial
        self._skip_lf = False  # the last line ended with CR: a LF next is part of that end
        self._bom_pending = True  # the spec strips one BOM at the very start of the stream
        self._fast_ok = False  # no partial frame, no CR pending, BOM question settled
        self._data: list[bytes] = []
        self._event: str | None = None
        self._retry: int | None = None
        self._last_id: str | None = None
        self._max = max_event_bytes
        self._skipping = False  # dropping an oversized frame up to its blank line
        self._skip_tail = b""  # the last bytes seen while skipping (a blank line split)
        #: frames dropped for being larger than max_event_bytes
        self.oversized = 0

    @property
    def pending_raw(self) -> bytes:
        """Bytes fed that are not yet part of a complete frame (a partial event)."""
        return b"".join(self._raw) + b"".join(self._partial)

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Return the events that `chunk` completes, in order."""
        data = self.whole_event_data(chunk)
        if data is not None:
            return [ServerSentEvent(None, data, self._last_id, None)]
        return [event for _, event in self._frames(chunk) if event is not None]

    def feed_frames(self, chunk: bytes) -> list[Frame]:
        """Return every frame that `chunk` completes, with the event each dispatched.

        A frame is the bytes up to and including a blank line. Its event is None when
        the frame dispatched nothing (only comments, or fields without `data`). Every
        frame's bytes, in order, followed by `pending_raw`, are exactly the bytes fed.

        A CRLF split after its CR puts the LF at the start of the next frame. Dropping
        either frame is still safe: the CR alone already ended the line for any client,
        and a lone LF is only an empty line that dispatches nothing.
        """
        data = self.whole_event_data(chunk)
        if data is not None:
            return [(chunk, ServerSentEvent(None, data, self._last_id, None))]
        return self._frames(chunk)

    def flush(self) -> list[ServerSentEvent]:
        """End of stream: dispatch an event whose final blank line never came.

        The spec discards such an event, but some upstreams end the body right after
        the last `data:` line (or without its newline at all), and that last event is
        often the one with `usage` or `[DONE]`. Losing it would lose the tally, so the
        decoder is lenient here. `pending_raw` still holds those bytes afterwards.
        """
        self._fast_ok = False
        if self._skipping:
            return []
        if self._partial:
            tail = b"".join(self._partial)
            self._partial = []
            self._raw.append(tail)
            self._line(tail)
        event = self._dispatch()
        return [] if event is None else [event]

    def whole_event_data(self, chunk: bytes) -> bytes | None:
        """The data of `chunk` if it is one whole `data:` event and nothing else, else None.

        Upstreams write one token per event and the network usually delivers each event in
        one read, so this is true of nearly every chunk: a handful of byte scans in C, and
        the general line machinery is skipped. Data it returns is that of a dispatched event
        (one with no `event` or `retry` field, whose id is the stream's last one); when it
        returns None the chunk must go to `feed` or `feed_frames`.
        """
        if not (self._fast_ok and chunk.startswith(b"data:") and chunk.endswith(b"\n\n")):
            return None
        end = len(chunk) - 2
        # find(), not `in`: on CPython 3.11 `bytes in bytes` first tries the operand as an
        # int and formats a TypeError it then drops, twice the cost of the scan
        if chunk.find(b"\n", 5) != end or chunk.find(b"\r") >= 0:
            return None
        return chunk[6 if chunk[5:6] == b" " else 5 : end]

    def whole_typed_event(self, chunk: bytes) -> tuple[bytes, bytes] | None:
        """(type, data) if `chunk` is exactly one `event: <type>` line, one `data:` line and
        the blank line, else None: the shape of nearly every Responses API read, decoded
        without the line machinery, as `whole_event_data` does for chat.

        The event dispatched carries the stream's last id and no retry, as the general path
        would give it; the caller gets the same (type, data) it would read from that event.
        """
        if not (self._fast_ok and chunk.startswith(b"event:") and chunk.endswith(b"\n\n")):
            return None
        first = chunk.find(b"\n", 6)
        end = len(chunk) - 2
        if (
            chunk.find(b"data:", first + 1, first + 6) != first + 1
            or chunk.find(b"\n", first + 1) != end
            or chunk.find(b"\r") >= 0
        ):
            return None
        name = chunk[7 if chunk[6:7] == b" " else 6 : first]
        start = first + 1 + (6 if chunk[first + 6 : first + 7] == b" " else 5)
        return name, chunk[start:end]

    def _frames(self, chunk: bytes) -> list[Frame]:
        """General path: cut lines, run the field machine, cut frames at blank lines."""
        if self._skipping:
            chunk = self._skip(chunk)
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":  # the LF of a CRLF split after its CR
                self._raw.append(b"\n")
                self._frame_len += 1
                chunk = chunk[1:]
                if not chunk:
                    return []
        if chunk.find(b"\n") < 0 and chunk.find(b"\r") < 0:  # no line ends: keep the piece
            self._partial.append(chunk)
            self._frame_len += len(chunk)
            self._fast_ok = False
            return self._bounded([])
        if self._partial:
            self._partial.append(chunk)
            buf = b"".join(self._partial)
            self._partial = []
            self._frame_len -= len(buf) - len(chunk)
        else:
            buf = chunk
        frames: list[Frame] = []
        start = cursor = 0
        for line in buf.splitlines(keepends=True):
            if line[-1] not in _LINE_ENDS:
                break  # a partial line: it stays pending until its end arrives
            cursor += len(line)
            content = line.rstrip(_LINE_ENDS)
            if content:
                self._line(content)
            else:
                raw = buf[start:cursor]
                if self._raw:
                    raw = b"".join(self._raw) + raw
                    self._raw = []
                event = self._dispatch()
                if self._max is not None and len(raw) > self._max and event is not None:
                    self.oversized += 1  # whole in one read, but too large all the same
                    event = None
                frames.append((raw, event))
                start = cursor
                self._frame_len = 0
        self._skip_lf = cursor == len(buf) and buf[-1] == 0x0D  # (a LF may follow next)
        if start < cursor:
            self._raw.append(buf[start:cursor])
        if cursor < len(buf):
            self._partial.append(buf[cursor:])
        self._frame_len += len(buf) - start
        self._fast_ok = not self._raw and not self._partial and not self._skip_lf
        self._fast_ok = self._fast_ok and not self._bom_pending
        return self._bounded(frames)

    def _bounded(self, frames: list[Frame]) -> list[Frame]:
        """Past max_event_bytes, drop the frame in progress and skip to its end."""
        if self._max is None or self._frame_len <= self._max:
            return frames
        tail = (b"".join(self._raw[-1:]) + b"".join(self._partial[-3:]))[-3:]
        self._raw, self._partial, self._data = [], [], []
        self._event = self._retry = None
        self._frame_len = 0
        self._skipping, self._skip_tail = True, tail
        self._skip_lf = self._fast_ok = False
        self.oversized += 1
        return frames

    def _skip(self, chunk: bytes) -> bytes:
        """Skipping an oversized frame: the bytes after its blank line (b"" until it comes)."""
        seen = self._skip_tail + chunk
        ends = [i for i in (seen.find(e) for e in (b"\n\n", b"\r\r", b"\n\r")) if i >= 0]
        if not ends:
            self._skip_tail = seen[-3:]
            return b""
        end = min(ends) + 2 - len(self._skip_tail)  # just after the blank line's end
        self._skipping, self._skip_tail = False, b""
        self._skip_lf = seen[min(ends) + 1] == 0x0D
        return chunk[max(end, 0) :]

    def _line(self, line: bytes) -> None:
        """Apply one non-empty line (without its line end) to the field state."""
        if self._bom_pending:
            self._bom_pending = False
            line = line.removeprefix(_BOM)
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:  # the spec ignores an id holding NUL
            self._last_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():  # ASCII digits only, as the spec says
            self._retry = int(value)
        # Anything else, a comment (empty name) included, is ignored by the spec.

    def _dispatch(self) -> ServerSentEvent | None:
        """Blank line: emit the event gathered so far, if it has any `data` line.

        The spec dispatches nothing without data (openai-python differs and emits
        data-less events); `event` and `retry` are reset either way, `id` persists.
        """
        self._bom_pending = False
        event = None
        if self._data:
            event = ServerSentEvent(self._event, b"\n".join(self._data), self._last_id, self._retry)
            self._data = []
        self._event = None
        self._retry = None
        return event
