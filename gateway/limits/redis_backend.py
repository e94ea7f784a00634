"""The shared backend: every replica counts in one Redis, through atomic Lua scripts.

One ``EVALSHA`` decides and counts an admission (``redis_scripts.ADMIT``), so N replicas
admit together exactly what one would. The per-chunk ``charge`` never touches the network:
tokens within the reservation need no remote work, and tokens beyond it are pushed in
batches of ``charge_batch_tokens`` by a background task, the rest at ``settle``.

Redis unreachable (connection refused, a socket timeout, any Redis error): the limiter turns
``degraded`` and stops calling Redis for admissions. A probe pings every
``probe_interval_s`` and clears ``degraded`` once Redis answers. Meanwhile ``fail_open``
admits without counting (and says so through ``degraded``); ``fail_closed`` raises
``BackendUnavailable``. Nothing falls back to per-process memory, so a limit never silently
changes meaning. A Redis that restarts without persistence forgets its windows and slots:
limits start afresh, as after a minute of silence.

Every call has a short socket and connect timeout (``op_timeout_s``) and no client-side
retries, so an unreachable Redis costs a request at most about ``2 * op_timeout_s`` (plus any
wait for a pooled connection, bounded by ``pool_timeout_s``) before the limiter is degraded,
and nothing afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import Coroutine
from typing import Any, Literal, NamedTuple

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.limits import redis_scripts
from gateway.limits.base import Admission, Check, TokenLedger, UnlimitedAdmission, verdict
from gateway.limits.errors import BackendUnavailable, RateLimited
from gateway.limits.headers import ResetTexts
from gateway.limits.local import clamp_reservation
from gateway.limits.spec import LimitSpec
from gateway.limits.window import WindowShape

logger = structlog.get_logger("gateway.limits")

OnBackendError = Literal["fail_open", "fail_closed"]
_BACKEND_ERRORS = (RedisError, OSError, TimeoutError)


class _BackendDown(Exception):
    """Internal: a Redis call failed; the limiter is now degraded."""


class _AdmitReply(NamedTuple):
    """The ADMIT script's reply, in the order the script returns it."""

    admitted: int
    slot: int
    admitted_reset_ms: int
    requests_used: int
    requests_retry_ms: int
    requests_reset_ms: int
    tokens_used: int
    tokens_retry_ms: int
    tokens_reset_ms: int
    streams: int


class _Keys:
    """The Redis keys of one bucket; the shared hash tag keeps them on one cluster slot."""

    __slots__ = ("concurrency", "requests", "tokens")

    def __init__(self, prefix: str, key: str) -> None:
        base = f"{prefix}{{{key}}}"
        self.requests = f"{base}:req"
        self.tokens = f"{base}:tok"
        self.concurrency = f"{base}:conc"


def bounded_client(
    redis_url: str, op_timeout_s: float, max_connections: int, pool_timeout_s: float
) -> Redis:
    """A client with a bounded pool (a bounded wait for a connection), short timeouts and
    no retries: a Redis that is down costs a call at most about `2 * op_timeout_s`."""
    pool = BlockingConnectionPool.from_url(
        redis_url,
        max_connections=max_connections,
        timeout=pool_timeout_s,
        socket_timeout=op_timeout_s,
        socket_connect_timeout=op_timeout_s,
        retry=Retry(NoBackoff(), 0),
        # No CLIENT SETINFO: it costs a round trip per connection, and redis-py reads
        # its own package metadata from disk, on the event loop, to fill it in.
        driver_info=None,
    )
    return Redis.from_pool(pool)


class RedisLimiter:
    """Limits shared by every replica through one Redis; same semantics as ``LocalLimiter``.

    :param redis_url: ``redis://host:port/db`` (``rediss://`` for TLS).
    :param on_backend_error: ``fail_open`` admits while Redis is down, ``fail_closed`` raises
        ``BackendUnavailable``.
    :param window_s: the window the per-minute limits apply to (60 s; shorter in tests).
    :param slots: slots per window; capacity returns slot by slot.
    :param lease_s: how long a stream slot outlives its last refresh, i.e. how long the
        slots of a replica that died keep counting. Holders refresh every ``lease_s / 3``.
    :param op_timeout_s: socket and connect timeout of each Redis call.
    :param max_connections: the connection pool's size.
    :param pool_timeout_s: the longest an admission waits for a free connection. Waiting
        here is queueing behind other admissions, not Redis being down, so it is longer than
        ``op_timeout_s``: a burst of 1,000 admissions takes a fraction of a second to pass
        through the pool. A wait that runs out counts as a backend failure, since Redis then
        cannot keep up.
    :param charge_batch_tokens: tokens beyond a reservation are pushed to Redis once this
        many have accumulated, and at ``settle``.
    :param probe_interval_s: how often a degraded limiter pings Redis to recover.
    :param concurrency_retry_after_s: the ``Retry-After`` for a full concurrent-stream cap.
    :param key_prefix: prefix of every key this limiter writes.
    """

    def __init__(
        self,
        redis_url: str,
        on_backend_error: OnBackendError,
        *,
        window_s: float = 60.0,
        slots: int = 60,
        lease_s: float = 30.0,
        op_timeout_s: float = 0.5,
        max_connections: int = 32,
        pool_timeout_s: float = 5.0,
        charge_batch_tokens: int = 256,
        probe_interval_s: float = 0.5,
        concurrency_retry_after_s: float = 1.0,
        key_prefix: str = "gw:rl:",
    ) -> None:
        self._redis = bounded_client(redis_url, op_timeout_s, max_connections, pool_timeout_s)
        self._admit_script = self._redis.register_script(redis_scripts.ADMIT)
        self._adjust_script = self._redis.register_script(redis_scripts.ADJUST)
        self._refresh_script = self._redis.register_script(redis_scripts.REFRESH)
        self._fail_open = on_backend_error == "fail_open"
        self._shape = WindowShape.of(window_s, slots)
        self._reset_texts = ResetTexts()
        self._lease_ms = round(lease_s * 1000)
        self._deadline_s = pool_timeout_s + 2 * op_timeout_s
        self._probe_timeout_s = 2 * op_timeout_s
        self._probe_interval_s = probe_interval_s
        self._concurrency_retry_ms = round(concurrency_retry_after_s * 1000)
        self.charge_batch_tokens = charge_batch_tokens
        self._prefix = key_prefix
        self._slot_ids = (f"{secrets.token_hex(6)}:{n}" for n in itertools.count())
        self._held: dict[str, set[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._degraded = False

    @property
    def degraded(self) -> bool:
        """True from the first failed Redis call until a probe gets an answer again."""
        return self._degraded

    @property
    def redis(self) -> Redis:
        """The client, for other state the replicas share (gateway.response_routes)."""
        return self._redis

    async def admit(
        self,
        key: str,
        spec: LimitSpec,
        reserve_tokens: int,
        stream: bool,
        *,
        prompt_tokens: int = 0,
    ) -> Admission:
        """Decide and count in one script; raise ``RateLimited`` at once when full."""
        if spec.unlimited:
            return UnlimitedAdmission()
        if self._degraded:
            return self._unavailable()
        keys = _Keys(self._prefix, key)
        reserve = clamp_reservation(spec, reserve_tokens)
        slot_id = next(self._slot_ids) if stream and spec.concurrent_streams else ""
        args = self._admit_args(spec, reserve, slot_id)
        try:
            reply = await self._admit_once(keys, args, reserve, slot_id)
        except _BackendDown:
            return self._unavailable()
        outcome = verdict(key, self._checks(spec, reserve, slot_id, reply), self._reset_texts)
        assert bool(reply.admitted) is not isinstance(outcome, RateLimited), "Lua/Python differ"
        if isinstance(outcome, RateLimited):
            raise outcome
        if slot_id:
            self._hold(keys.concurrency, slot_id)
        ledger = TokenLedger(reserve, reply.slot, prompt_tokens)
        known = reply.tokens_used + reserve
        return RedisAdmission(self, keys, spec.tokens_per_minute, ledger, slot_id, known, outcome)

    async def aclose(self) -> None:
        """Stop the heartbeat and probe, let pending settles finish, close the pool."""
        for task in (self._heartbeat, self._probe):
            if task is not None:
                task.cancel()
        pending = [t for t in (self._heartbeat, self._probe, *self._tasks) if t is not None]
        if pending:
            await asyncio.wait(pending, timeout=self._deadline_s)
        await self._redis.aclose()

    async def adjust(
        self, keys: _Keys, refund_slot: int, refund: int, extra: int, slot_id: str
    ) -> int:
        """Return ``refund`` to ``refund_slot``, count ``extra``, release ``slot_id``.

        Returns the token window's count afterwards. Raises ``_BackendDown``.
        """
        shape = self._shape
        args: list[int | str] = [shape.slot_ms, shape.slots, refund_slot, refund, extra, slot_id]
        reply = await self._call(self._adjust_script, [keys.tokens, keys.concurrency], args)
        return int(reply)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in the background, kept until done so ``aclose`` can wait for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def release_hold(self, concurrency_key: str, slot_id: str) -> None:
        """Stop refreshing a stream slot's lease (its holder settled)."""
        held = self._held.get(concurrency_key)
        if held is not None:
            held.discard(slot_id)
            if not held:
                del self._held[concurrency_key]

    def _admit_args(self, spec: LimitSpec, reserve: int, slot_id: str) -> list[int | str]:
        """The ADMIT script's arguments; -1 marks a dimension that is not limited."""
        return [
            self._shape.slot_ms,
            self._shape.slots,
            _or_unlimited(spec.requests_per_minute),
            _or_unlimited(spec.tokens_per_minute),
            reserve,
            _or_unlimited(spec.concurrent_streams) if slot_id else -1,
            slot_id,
            self._lease_ms,
        ]

    async def _admit_once(
        self, keys: _Keys, args: list[int | str], reserve: int, slot_id: str
    ) -> _AdmitReply:
        """Run ADMIT so that a cancelled caller never leaves capacity counted for nobody.

        The script runs in its own task; if the caller is cancelled while it is in flight
        and it admitted, the reservation and the stream slot are given back in the
        background.
        """
        redis_keys = [keys.requests, keys.tokens, keys.concurrency]
        call = asyncio.ensure_future(self._call(self._admit_script, redis_keys, args))
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            self.spawn(self._undo_admit(call, keys, reserve, slot_id))
            raise
        return _AdmitReply(*reply)

    async def _undo_admit(
        self, call: asyncio.Future[Any], keys: _Keys, reserve: int, slot_id: str
    ) -> None:
        """Give back what an admission whose caller was cancelled had counted."""
        with contextlib.suppress(_BackendDown):
            reply = await call
            if reply[0]:
                await self.adjust(keys, reply[1], reserve, 0, slot_id)

    def _checks(
        self, spec: LimitSpec, reserve: int, slot_id: str, reply: _AdmitReply
    ) -> list[Check]:
        """Turn the ADMIT reply into the same checks the local backend builds."""
        checks: list[Check] = []
        if spec.requests_per_minute is not None:
            checks.append(
                Check(
                    "requests",
                    spec.requests_per_minute,
                    reply.requests_used,
                    1,
                    reply.requests_retry_ms,
                    reply.requests_reset_ms,
                    reply.admitted_reset_ms,
                )
            )
        if spec.tokens_per_minute is not None:
            checks.append(
                Check(
                    "tokens",
                    spec.tokens_per_minute,
                    reply.tokens_used,
                    reserve,
                    reply.tokens_retry_ms,
                    reply.tokens_reset_ms,
                    reply.admitted_reset_ms,
                )
            )
        if slot_id and spec.concurrent_streams is not None:
            retry_ms = self._concurrency_retry_ms
            checks.append(
                Check("concurrency", spec.concurrent_streams, reply.streams, 1, retry_ms, 0, 0)
            )
        return checks

    async def _call(self, script: AsyncScript, keys: list[str], args: list[int | str]) -> Any:
        """EVALSHA (loading the script on NOSCRIPT) under a deadline; failures degrade."""
        try:
            async with asyncio.timeout(self._deadline_s):
                return await script(keys=keys, args=args)
        except _BACKEND_ERRORS as exc:
            self._mark_down(exc)
            raise _BackendDown from exc

    def _unavailable(self) -> Admission:
        """Answer for a request while Redis is down, as ``on_backend_error`` says."""
        if self._fail_open:
            return UnlimitedAdmission()
        raise BackendUnavailable(
            "rate-limit backend unavailable", retry_after_s=max(1.0, self._probe_interval_s)
        )

    def _mark_down(self, exc: BaseException) -> None:
        """Enter the degraded state (once) and start probing for recovery."""
        if self._degraded:
            return
        self._degraded = True
        logger.warning("limits_backend_down", error=repr(exc), fail_open=self._fail_open)
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        """Ping Redis every ``probe_interval_s`` until it answers, then leave degraded.

        Each probe first closes the idle pooled connections: those opened before the outage
        are dead if Redis restarted, and each would fail its next command once, putting the
        limiter straight back into the degraded state (and, with fail_open, letting a burst
        of requests through uncounted). The ping then runs on a fresh connection.
        """
        while True:
            await asyncio.sleep(self._probe_interval_s)
            try:
                async with asyncio.timeout(self._probe_timeout_s):
                    await self._redis.connection_pool.disconnect(inuse_connections=False)
                    await self._redis.ping()
            except _BACKEND_ERRORS:
                continue
            self._degraded = False
            logger.warning("limits_backend_recovered")
            return

    def _hold(self, concurrency_key: str, slot_id: str) -> None:
        """Keep refreshing a stream slot's lease until its holder settles."""
        self._held.setdefault(concurrency_key, set()).add(slot_id)
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.get_running_loop().create_task(self._refresh_leases())

    async def _refresh_leases(self) -> None:
        """Every third of a lease, extend the leases of every slot this replica holds."""
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            if self._degraded:
                continue
            for concurrency_key, slot_ids in list(self._held.items()):
                args: list[int | str] = [self._lease_ms, *slot_ids]
                with contextlib.suppress(_BackendDown):
                    await self._call(self._refresh_script, [concurrency_key], args)


def _or_unlimited(limit: int | None) -> int:
    """A limit for Lua, where -1 means not limited."""
    return -1 if limit is None else limit


class RedisAdmission(Admission):
    """An admission counted in Redis; token overage is batched off the per-chunk path."""

    __slots__ = (
        "_exceeded",
        "_flush",
        "_keys",
        "_known",
        "_ledger",
        "_limiter",
        "_settled",
        "_slot_id",
        "_token_limit",
    )

    def __init__(
        self,
        limiter: RedisLimiter,
        keys: _Keys,
        token_limit: int | None,
        ledger: TokenLedger,
        slot_id: str,
        known_usage: int,
        headers: dict[str, str],
    ) -> None:
        super().__init__(headers)
        self._limiter = limiter
        self._keys = keys
        self._token_limit = token_limit
        self._ledger = ledger
        self._slot_id = slot_id
        self._known = known_usage
        self._flush: asyncio.Task[None] | None = None
        self._exceeded = False
        self._settled = False

    def charge(self, tokens: int) -> bool:
        """Add locally; start a background push once a batch of overage has built up.

        The budget check uses the window count Redis last reported plus the overage not yet
        pushed, so it needs no round trip.
        """
        ledger = self._ledger
        ledger.used += tokens
        if self._token_limit is None or self._settled:
            return self._exceeded
        over = ledger.pending
        if over > 0:
            self._exceeded |= self._known + over > self._token_limit
            limiter = self._limiter
            if over >= limiter.charge_batch_tokens and self._flush is None and not limiter.degraded:
                self._flush = limiter.spawn(self._push_overage())
        return self._exceeded

    async def settle(self, actual_tokens: int) -> None:
        """Correct Redis to ``actual_tokens`` and free the stream slot, once.

        The remote part runs in its own task, shielded: a caller cancelled again inside its
        ``finally`` does not stop the slot from being released.
        """
        if self._settled:
            return
        self._settled = True
        if self._slot_id:
            self._limiter.release_hold(self._keys.concurrency, self._slot_id)
        await asyncio.shield(self._limiter.spawn(self._settle_remote(actual_tokens)))

    async def _push_overage(self) -> None:
        """Count the overage accumulated so far in the shared window."""
        ledger = self._ledger
        amount = ledger.pending
        ledger.applied += amount
        try:
            self._known = await self._limiter.adjust(self._keys, 0, 0, amount, "")
        except _BackendDown:
            ledger.applied -= amount
        finally:
            self._flush = None

    async def _settle_remote(self, actual_tokens: int) -> None:
        """One ADJUST: refund or count the difference to the truth, release the slot."""
        if self._flush is not None:
            await self._flush
        refund, extra = 0, 0
        if self._token_limit is not None:
            delta = self._ledger.settle_delta(actual_tokens)
            refund = min(-delta, self._ledger.reserved) if delta < 0 else 0
            extra = max(delta, 0)
        if (refund or extra or self._slot_id) and not self._limiter.degraded:
            with contextlib.suppress(_BackendDown):
                await self._limiter.adjust(
                    self._keys, self._ledger.slot, refund, extra, self._slot_id
                )
