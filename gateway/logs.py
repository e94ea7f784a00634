"""structlog in its production setup: orjson, a buffered bytes logger, cached loggers.

One canonical line per request (see gateway.app.request_context); no line per chunk, never a
key or prompt text.

The request line is the one line every request writes, so it has a logger of its own
(`request_logger`), resolved once, with the shortest chain that writes the same line: the
level and the timestamp in one processor, then the renderer. It skips what the other lines
need: the request id from the context (the line carries it in its fields) and
`format_exc_info` (it has no exception). Every other line, logged during a request or not,
gets the request id from `REQUEST_ID`, set by the first middleware.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import logging
import sys
import threading
from contextvars import ContextVar
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


#: the id of the request being handled, on every line logged during it (`add_request_id`)
REQUEST_ID: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)
#: the method names structlog's add_log_level renames
_LEVELS = {"warn": "warning", "exception": "error"}
_UTC = datetime.UTC


def add_request_id(_: Any, __: str, event_dict: structlog.typing.EventDict) -> Any:
    """The request id of the request being handled, unless the line names one."""
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
    return event_dict


def add_level_and_time(_: Any, method_name: str, event_dict: structlog.typing.EventDict) -> Any:
    """structlog's `add_log_level` and `TimeStamper(fmt="iso", utc=True)` in one call: the
    same `level` and `timestamp`."""
    event_dict["level"] = _LEVELS.get(method_name, method_name)
    stamp = datetime.datetime.now(tz=_UTC).isoformat()
    event_dict["timestamp"] = stamp.replace("+00:00", "Z")
    return event_dict


#: what `request_logger` builds its logger from: set by configure_logging
_request_setup: tuple[Any, list[structlog.typing.Processor], Any] | None = None


def configure_logging(fmt: LogFormat = "json", level: int = logging.INFO) -> None:
    global _request_setup
    shared: list[structlog.typing.Processor] = [
        add_request_id,
        structlog.contextvars.merge_contextvars,
        add_level_and_time,
    ]
    wrapper_class = structlog.make_filtering_bound_logger(level)
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        structlog.configure(
            processors=[*shared, structlog.processors.format_exc_info, renderer],
            wrapper_class=wrapper_class,
            logger_factory=_line_buffer,
            cache_logger_on_first_use=True,
        )
        _request_setup = (_line_buffer, [add_level_and_time, renderer], wrapper_class)
    else:
        renderer = structlog.dev.ConsoleRenderer()
        factory = structlog.PrintLoggerFactory(file=sys.stdout)
        structlog.configure(
            processors=[*shared, renderer],
            wrapper_class=wrapper_class,
            logger_factory=factory,
            cache_logger_on_first_use=True,
        )
        _request_setup = (factory, [add_level_and_time, renderer], wrapper_class)
    # aiohttp and asyncio speak through stdlib logging: keep their warnings, drop access logs
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(message)s")
    logging.getLogger("aiohttp.access").disabled = True


def request_logger() -> Any:
    """The logger of the request line, resolved now (after configure_logging): keep it.

    Under configure_logging, a bound logger with the request line's short chain (see the
    module's docstring). Where logging was not configured so (tests, which capture
    structlog's events with `capture_logs`), structlog's lazy proxy: it follows every
    later `structlog.configure`."""
    if _request_setup is None:
        return structlog.get_logger("gateway")
    factory, processors, wrapper_class = _request_setup
    return structlog.wrap_logger(
        factory(), processors=processors, wrapper_class=wrapper_class
    ).bind()
