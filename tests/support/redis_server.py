"""A real ``redis-server`` for tests: loopback only, no persistence, always stopped.

Use the fixtures from any test folder by importing them into that folder's ``conftest.py``::

    from tests.support.redis_server import redis_server, redis_url, private_redis_server

- ``redis_server`` (session): one server shared by the session; do not stop it.
- ``redis_url`` (function): the shared server's URL, flushed before each test.
- ``private_redis_server`` (function): a server of the test's own, which the test may
  ``stop()``/``start()`` (same port, so clients reconnect to the same URL). From async code
  use ``await server.astop()`` / ``await server.astart()``, which run the blocking process
  work in a thread, away from the event loop.

The binary is ``$REDIS_SERVER`` or ``redis-server`` on ``PATH``; without it the tests that
need it are skipped, except under ``CI`` where they fail, since CI installs it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0


def find_redis_server() -> str:
    """Path of the ``redis-server`` binary, or skip (fail under CI) when there is none."""
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if binary is None:
        for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server"):
            if Path(candidate).exists():
                binary = candidate
    if binary is None:
        message = "redis-server not installed"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, in a temporary directory.

    ``start()`` picks a free port the first time and keeps it for every restart.
    """

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = 0
        self._dir = tempfile.TemporaryDirectory(prefix="redis-test-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server (on a new free port the first time) and wait until it answers."""
        if self.running:
            return
        attempts = 1 if self.port else 3
        for attempt in range(attempts):
            if not self.port or attempt:
                self.port = free_port()
            self._process = subprocess.Popen(
                self._command(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=self._dir.name,
            )
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}: {self._log_tail()}")

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SIGTERM (SIGKILL with ``kill=True``, like a crash), then reap."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(_STOP_TIMEOUT_S)

    async def astart(self) -> None:
        """:meth:`start` from async code, in a thread so the event loop never blocks."""
        await asyncio.to_thread(self.start)

    async def astop(self, kill: bool = False) -> None:
        """:meth:`stop` from async code, in a thread so the event loop never blocks."""
        await asyncio.to_thread(self.stop, kill)

    def flushall(self) -> None:
        """Empty every database (a test's clean slate on a shared server)."""
        if self._command_reply(b"FLUSHALL") != b"+OK\r\n":
            raise RuntimeError("FLUSHALL failed")

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        self._dir.cleanup()

    def _command(self) -> list[str]:
        """The command line: loopback, no snapshots, no AOF, logs in the temp dir."""
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self._dir.name,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(Path(self._dir.name) / "redis.log"),
        ]  # fmt: skip

    def _wait_ready(self) -> bool:
        """Poll PING until the server answers; False if it exits or the deadline passes."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.running:
                return False
            try:
                if self._command_reply(b"PING") == b"+PONG\r\n":
                    return True
            except OSError:
                pass
            time.sleep(0.01)
        return False

    def _command_reply(self, command: bytes) -> bytes:
        """Send one inline command and read its (short) reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
            sock.sendall(command + b"\r\n")
            return sock.recv(64)

    def _log_tail(self) -> str:
        """The end of the server's log, for the error message."""
        log = Path(self._dir.name) / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"


@contextmanager
def _running() -> Iterator[RedisServer]:
    server = RedisServer(find_redis_server())
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A server shared by the whole session (never stop it from a test)."""
    with _running() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared server's URL, emptied for this test."""
    redis_server.start()  # in case a test stopped it anyway
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def private_redis_server() -> Iterator[RedisServer]:
    """A server of this test's own, which it may stop and restart on the same port."""
    with _running() as server:
        yield server
