"""Where spend lives: per (team or key, calendar period), tokens and USD.

A store key is `<subject>|<period>`, e.g. `team:search:key:ci-bot|d2026-12-04`. Charges are
queued with `add` (no I/O) and pushed in batches with `flush`: the spend book calls it every
~250 ms for the live counts of the streams in flight, and at each request's settle for the
exact remainder, never per event.

    LocalStore   the process's memory is the truth; with a `state_file` (only when a budget is
                 configured) it is written to SQLite (WAL) in a thread at most every second
                 and at shutdown, so a restart, SIGHUP or crash loses at most the last
                 second's charges. Workers sharing the file add their deltas to it and read
                 the totals back at each write.
    RedisStore   one pipeline of HINCRBY / HINCRBYFLOAT / EXPIREAT per batch, exact across
                 replicas; keys expire an hour after their period ends. Redis down: the store
                 is `degraded`, keeps what it could not push and pushes it once Redis answers.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

import structlog

from .limits.redis_backend import _BACKEND_ERRORS, bounded_client

log = structlog.get_logger("gateway.spend")

#: a key's tokens and USD
Spent = tuple[int, float]
#: how long a period's key outlives the period (Redis and SQLite)
KEEP_AFTER_PERIOD_S = 3600.0


class SpendStore(abc.ABC):
    """Spend per key: `known` is this process's view, `add` queues, `flush` pushes."""

    def __init__(self) -> None:
        self._known: dict[str, list[float]] = {}
        #: key -> [tokens, usd, expires_at], not yet pushed
        self._pending: dict[str, list[float]] = {}
        self.degraded = False

    def known(self, key: str) -> Spent:
        found = self._known.get(key)
        return (0, 0.0) if found is None else (int(found[0]), found[1])

    def add(self, key: str, tokens: int, usd: float, expires_at: float) -> None:
        """Queue a charge (tokens or USD may be negative: a settle below the live count)."""
        pending = self._pending.get(key)
        if pending is None:
            self._pending[key] = [tokens, usd, expires_at]
        else:
            pending[0] += tokens
            pending[1] += usd

    def _take(self) -> dict[str, list[float]]:
        taken, self._pending = self._pending, {}
        return taken

    def _give_back(self, taken: dict[str, list[float]]) -> None:
        """A push failed: its charges wait for the next one."""
        for key, (tokens, usd, expires_at) in taken.items():
            self.add(key, int(tokens), usd, expires_at)

    @abc.abstractmethod
    async def start(self) -> None:
        """Read what is stored (call from the event loop before the first request)."""

    @abc.abstractmethod
    async def load(self, keys: Iterable[str]) -> None:
        """Bring `known` up to date for `keys` (before an admission decides on them)."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Push what `add` queued."""

    @abc.abstractmethod
    async def recover(self) -> None:
        """While degraded: try the backend again, pushing what waits (the tick calls it)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Push what is left and let go of connections and files."""


class LocalStore(SpendStore):
    """Memory, written to SQLite at `path` (None: memory only) every `write_every_s`."""

    def __init__(self, path: Path | None, write_every_s: float = 1.0) -> None:
        super().__init__()
        self._path = path
        self._every = write_every_s
        self._db: sqlite3.Connection | None = None
        self._writer: asyncio.Task[None] | None = None
        #: charges since the last write to the file
        self._unwritten: dict[str, list[float]] = {}
        #: when each key's period ends (what a file attached later needs)
        self._expires: dict[str, float] = {}

    async def start(self) -> None:
        if self._path is None:
            return
        self._db = await asyncio.to_thread(_open, self._path)
        await self._write()
        self._writer = asyncio.create_task(self._write_every())

    async def attach(self, path: Path) -> bool:
        """Keep spend in `path` from now on, the spend so far included (a reload configured
        the first budget). False if another file is already attached: that needs a restart."""
        if self._path is not None:
            return self._path == path
        self._path = path
        for key, (tokens, usd) in self._known.items():
            self._unwritten[key] = [tokens, usd, self._expires[key]]
        await self.start()
        return True

    async def load(self, keys: Iterable[str]) -> None:
        """Memory is the truth here."""

    async def recover(self) -> None:
        """Never degraded: a failed write of the file is retried with the next one."""

    def add(self, key: str, tokens: int, usd: float, expires_at: float) -> None:
        """Memory is the truth: counted at once; the file gets it with the next write."""
        self._expires[key] = expires_at
        known = self._known.setdefault(key, [0, 0.0])
        known[0] += tokens
        known[1] += usd
        if self._db is not None:
            unwritten = self._unwritten.setdefault(key, [0, 0.0, expires_at])
            unwritten[0] += tokens
            unwritten[1] += usd

    async def flush(self) -> None:
        """Nothing waits: `add` counted it."""

    async def _write_every(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            try:
                await self._write()
            except sqlite3.Error as exc:
                log.error("spend_write_failed", path=str(self._path), error=str(exc))

    async def _write(self) -> None:
        """Add the charges since the last write to the file, in a thread; read the totals
        back (other workers may share the file)."""
        db = self._db
        assert db is not None
        batch, self._unwritten = self._unwritten, {}
        try:
            totals = await asyncio.to_thread(_write_and_read, db, batch, time.time())
        except BaseException:
            for key, values in batch.items():  # written next time
                unwritten = self._unwritten.setdefault(key, [0, 0.0, values[2]])
                unwritten[0] += values[0]
                unwritten[1] += values[1]
            raise
        known: dict[str, list[float]] = {}
        for key, (tokens, usd) in totals.items():
            since = self._unwritten.get(key)
            known[key] = [tokens, usd] if since is None else [tokens + since[0], usd + since[1]]
        for key, since in self._unwritten.items():
            known.setdefault(key, [since[0], since[1]])
        self._known = known

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        if self._db is not None:
            await self._write()
            await asyncio.to_thread(self._db.close)
            self._db = None


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, timeout=5.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS spend ("
        " key TEXT PRIMARY KEY, tokens INTEGER NOT NULL, usd REAL NOT NULL,"
        " expires_at REAL NOT NULL)"
    )
    return db


def _write_and_read(
    db: sqlite3.Connection, batch: dict[str, list[float]], now: float
) -> dict[str, Spent]:
    """One transaction: add the batch, drop expired periods; then every total."""
    rows = [(key, int(t), u, e) for key, (t, u, e) in batch.items()]
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT INTO spend (key, tokens, usd, expires_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET tokens = tokens + excluded.tokens,"
            " usd = usd + excluded.usd",
            rows,
        )
        db.execute("DELETE FROM spend WHERE expires_at < ?", (now,))
    return {key: (t, u) for key, t, u in db.execute("SELECT key, tokens, usd FROM spend")}


def read_state_file(path: Path) -> dict[str, Spent]:
    """Every total in a state file (for tests and operators; blocking)."""
    db = sqlite3.connect(path)
    try:
        return {key: (t, u) for key, t, u in db.execute("SELECT key, tokens, usd FROM spend")}
    finally:
        db.close()


class RedisStore(SpendStore):
    """Spend in one Redis shared by every replica: a hash per key, `tokens` and `usd`."""

    def __init__(
        self,
        redis_url: str,
        *,
        op_timeout_s: float = 0.5,
        max_connections: int = 32,
        pool_timeout_s: float = 5.0,
        key_prefix: str = "gw:spend:",
    ) -> None:
        super().__init__()
        self._redis = bounded_client(redis_url, op_timeout_s, max_connections, pool_timeout_s)
        self._prefix = key_prefix
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Nothing to read: Redis is asked at each admission."""

    async def load(self, keys: Iterable[str]) -> None:
        if self.degraded:
            return
        names = list(keys)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in names:
                    pipe.hmget(self._prefix + key, "tokens", "usd")
                replies = await pipe.execute()
        except _BACKEND_ERRORS as exc:
            self._down(exc)
            return
        for key, (tokens, usd) in zip(names, replies, strict=True):
            self._known[key] = [int(tokens or 0), float(usd or 0.0)]

    async def flush(self) -> None:
        """One pipeline for the whole batch. While degraded, charges wait for `recover`: a
        request's settle does not wait on a Redis that is down."""
        if self._pending and not self.degraded:
            await self._push_pending()

    async def recover(self) -> None:
        if self.degraded and await self._push_pending():
            self.degraded = False
            log.info("spend_backend_recovered")

    async def _push_pending(self) -> bool:
        """Push what waits (a PING if nothing does); False, with the charges kept, if Redis
        did not answer."""
        async with self._lock:  # batches go in order: a settle never overtakes a tick
            taken = self._take()
            try:
                await self._push(taken)
            except _BACKEND_ERRORS as exc:
                self._give_back(taken)
                self._down(exc)
                return False
        return True

    async def _push(self, taken: dict[str, list[float]]) -> None:
        if not taken:
            await self._redis.ping()
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for key, (tokens, usd, expires_at) in taken.items():
                name = self._prefix + key
                pipe.hincrby(name, "tokens", int(tokens))
                pipe.hincrbyfloat(name, "usd", usd)
                pipe.expireat(name, int(expires_at + KEEP_AFTER_PERIOD_S))
            replies = await pipe.execute()
        for i, key in enumerate(taken):
            self._known[key] = [int(replies[3 * i]), float(replies[3 * i + 1])]

    def _down(self, exc: BaseException) -> None:
        if not self.degraded:
            log.warning("spend_backend_down", error=repr(exc))
        self.degraded = True

    async def aclose(self) -> None:
        await self.recover()
        await self.flush()
        await self._redis.aclose()
