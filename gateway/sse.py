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
    """

    __slots__ = (
        "_bom_pending",
        "_data",
        "_done",
        "_event",
        "_fast_ok",
        "_last_id",
        "_pending",
        "_retry",
        "_skip_lf",
    )

    def __init__(self) -> None:
        self._pending = b""  # bytes fed since the last frame ended
        self._done = 0  # how many of them are complete lines (the rest is a partial line)
        self._skip_lf = False  # the last line ended with CR: a LF next is part of that end
        self._bom_pending = True  # the spec strips one BOM at the very start of the stream
        self._fast_ok = False  # no partial frame, no CR pending, BOM question settled
        self._data: list[bytes] = []
        self._event: str | None = None
        self._retry: int | None = None
        self._last_id: str | None = None

    @property
    def pending_raw(self) -> bytes:
        """Bytes fed that are not yet part of a complete frame (a partial event)."""
        return self._pending

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
        tail = self._pending[self._done :]
        if tail:
            self._line(tail)
        self._done = len(self._pending)
        self._fast_ok = False
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

    def _frames(self, chunk: bytes) -> list[Frame]:
        """General path: cut lines, run the field machine, cut frames at blank lines."""
        if not chunk:
            return []
        buf = self._pending + chunk if self._pending else chunk
        cursor = self._done
        if self._skip_lf and buf[cursor : cursor + 1] == b"\n":
            cursor += 1
        self._skip_lf = False
        frames: list[Frame] = []
        start = 0
        for line in buf[cursor:].splitlines(keepends=True):
            if line[-1] not in _LINE_ENDS:
                break  # a partial line: it stays pending until its end arrives
            cursor += len(line)
            self._skip_lf = line[-1] == 0x0D
            content = line.rstrip(_LINE_ENDS)
            if content:
                self._line(content)
            else:
                frames.append((buf[start:cursor], self._dispatch()))
                start = cursor
        self._pending = buf[start:]
        self._done = cursor - start
        self._fast_ok = not self._pending and not self._skip_lf and not self._bom_pending
        return frames

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
