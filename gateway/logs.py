"""structlog in its production setup: orjson, a buffered bytes logger, cached loggers.

One canonical line per request (see gateway.app.request_context); no line per chunk, never a
key or prompt text.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
from typing import Any, Literal, Protocol

import orjson
import structlog

LogFormat = Literal["json", "console"]

#: the longest an info line waits in the buffer
FLUSH_S = 0.05
#: the largest write: at most PIPE_BUF, so that the lines of several workers sharing one pipe
#: never interleave in the middle of a line
WRITE_BYTES = 4096


class Output(Protocol):
    def write(self, data: bytes, /) -> object: ...
    def flush(self) -> object: ...


class LineBuffer:
    """structlog's logger for JSON lines: a request's line is not a system call of its own.

    Info lines collect for up to `FLUSH_S` and leave in writes of whole lines, at most
    `WRITE_BYTES` each (a longer line goes alone). A warning or an error goes out at once,
    after what waits. Outside the event loop's thread (startup, a worker thread, exit) every
    line goes out at once, and what waits at exit is written by an `atexit` hook; only a
    process killed outright loses the lines of its last `FLUSH_S`.
    """

    def __init__(self, file: Output) -> None:
        self._file = file
        self._lines: list[bytes] = []
        self._size = 0
        #: the loop whose timer will write what waits (never cancelled: a timer that finds
        #: nothing writes nothing, and no thread but the loop's touches it)
        self._timer_on: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        atexit.register(self.flush)

    def msg(self, message: bytes) -> None:
        line = message + b"\n"
        with self._lock:
            if self._size + len(line) > WRITE_BYTES:
                self._write_out()
            self._lines.append(line)
            self._size += len(line)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._write_out()
                return
            if self._timer_on is not loop:  # none yet, or one on a loop that has ended
                self._timer_on = loop
                loop.call_later(FLUSH_S, self._on_timer)

    def urgent(self, message: bytes) -> None:
        self.msg(message)
        self.flush()

    log = debug = info = msg
    warn = warning = err = error = critical = exception = failure = fatal = urgent

    def flush(self) -> None:
        with self._lock:
            self._write_out()

    def _on_timer(self) -> None:
        with self._lock:
            self._timer_on = None
            self._write_out()

    def _write_out(self) -> None:
        if self._lines:
            data = b"".join(self._lines)
            self._lines.clear()
            self._size = 0
            self._file.write(data)
            self._file.flush()


def _line_buffer(*_: Any) -> LineBuffer:
    global _buffer
    if _buffer is None:
        _buffer = LineBuffer(sys.stdout.buffer)
    return _buffer


_buffer: LineBuffer | None = None


def configure_logging(fmt: LogFormat = "json", level: int = logging.INFO) -> None:
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=orjson.dumps),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=_line_buffer,
            cache_logger_on_first_use=True,
        )
    else:
        structlog.configure(
            processors=[*shared, structlog.dev.ConsoleRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(level),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
            cache_logger_on_first_use=True,
        )
    # aiohttp and asyncio speak through stdlib logging: keep their warnings, drop access logs
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
    logging.getLogger("aiohttp.access").disabled = True
