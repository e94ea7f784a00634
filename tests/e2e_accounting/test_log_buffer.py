"""JSON log lines leave in few writes: a request's line is not a system call of its own.

Info lines wait up to `FLUSH_S`, then go out together in writes of whole lines of at most
`WRITE_BYTES` (PIPE_BUF: several workers' lines on one pipe never interleave mid-line); a
warning goes out at once, after what waited; outside the event loop nothing waits.
"""

from __future__ import annotations

import asyncio
import os

from gateway.logs import FLUSH_S, WRITE_BYTES, LineBuffer


class Pipe:
    """The write end of a real pipe, counting the writes that reach it."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)  # a test's pipe is read after: 64 KiB is plenty
        self.writes: list[int] = []

    def write(self, data: bytes) -> int:
        self.writes.append(len(data))
        return os.write(self._write, data)

    def flush(self) -> None:
        pass

    def read(self) -> bytes:
        out = b""
        while True:
            try:
                out += os.read(self._read, 1 << 16)
            except BlockingIOError:
                return out


def line(n: int, size: int = 100) -> bytes:
    return b'{"event":"request","n":%d,"pad":"%s"}' % (n, b"x" * size)


async def test_lines_of_one_moment_leave_together_within_the_flush_delay() -> None:
    pipe = Pipe()
    log = LineBuffer(pipe)
    for n in range(5):
        log.info(line(n))
    assert pipe.writes == []
    await asyncio.sleep(FLUSH_S * 2)
    assert len(pipe.writes) == 1
    assert pipe.read() == b"".join(line(n) + b"\n" for n in range(5))


async def test_no_write_is_larger_than_pipe_buf_nor_splits_a_line() -> None:
    pipe = Pipe()
    log = LineBuffer(pipe)
    lines = [line(n, size=200 + n % 7 * 50) for n in range(100)]
    for one in lines:
        log.info(one)
    log.flush()
    assert max(pipe.writes) <= WRITE_BYTES
    assert len(pipe.writes) < len(lines) / 5
    out = pipe.read()
    assert out == b"".join(one + b"\n" for one in lines)


async def test_a_longer_line_than_a_write_goes_whole_and_alone() -> None:
    pipe = Pipe()
    log = LineBuffer(pipe)
    log.info(line(1))
    log.info(line(2, size=WRITE_BYTES * 2))
    log.flush()
    assert pipe.read() == line(1) + b"\n" + line(2, size=WRITE_BYTES * 2) + b"\n"
    assert pipe.writes[1] > WRITE_BYTES


async def test_a_warning_goes_out_at_once_after_what_waited() -> None:
    pipe = Pipe()
    log = LineBuffer(pipe)
    log.info(line(1))
    log.warning(line(2))
    assert pipe.read() == line(1) + b"\n" + line(2) + b"\n"


def test_outside_an_event_loop_nothing_waits() -> None:
    pipe = Pipe()
    log = LineBuffer(pipe)
    log.info(line(1))
    assert pipe.read() == line(1) + b"\n"


def test_a_loop_that_ended_with_lines_waiting_does_not_hold_back_the_next_loops() -> None:
    pipe = Pipe()
    log = LineBuffer(pipe)

    async def log_and_leave() -> None:
        log.info(line(1))  # its timer would be due after the loop has gone

    async def log_and_wait() -> None:
        log.info(line(2))
        await asyncio.sleep(FLUSH_S * 2)

    asyncio.run(log_and_leave())
    asyncio.run(log_and_wait())
    assert pipe.read() == line(1) + b"\n" + line(2) + b"\n"
