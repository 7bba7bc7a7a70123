"""The gateway's Redis: two bounded pools, short timeouts, and one circuit breaker around both.

Every command the gateway sends goes through `GuardedRedis.execute_command` or a
`GuardedPipeline`, so the breaker sees all of them. After `GENQ_REDIS_BREAKER_FAILURES`
connection errors or timeouts in a row it opens: commands then fail at once with `CircuitOpen`,
without touching Redis, until `GENQ_REDIS_BREAKER_RESET_S` has passed and a trial command
finds Redis answering again. The probe (`gateway.redisprobe`) opens it sooner, as soon as Redis
leaves a PING unanswered, and closes it as soon as Redis answers again.

Ordinary commands share one pool; a client waiting on a job's events (an SSE stream, a sync wait)
holds a connection of another (`Listeners`), so blocking reads never starve the commands.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import Any

import pybreaker
from arq.connections import ArqRedis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection, Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common import keys
from common.contract import deserialize_payload, serialize_payload
from common.redisconn import SentinelPool, connection_pool
from common.settings import Settings
from gateway import metrics

logger = logging.getLogger(__name__)

# Longest XREAD BLOCK of a listener; a quiet stream checks that its job is still there this often.
STREAM_BLOCK_S = 5.0


class PoolExhausted(RedisConnectionError):
    """Every connection of a pool stayed in use for the whole wait. Not a Redis failure."""

    def __init__(self, setting: str, limit: int) -> None:
        super().__init__(f"all {limit} connections to Redis are in use ({setting})")
        self.setting = setting
        self.limit = limit


class CircuitOpen(RedisConnectionError):
    """The breaker is open: Redis was not tried."""

    def __init__(self, why: str, retry_after_s: int) -> None:
        super().__init__(f"{why}; the gateway tries it again in {retry_after_s}s")
        self.retry_after_s = retry_after_s


class NotReplicated(RedisError):
    """The primary took the writes, but fewer replicas than required confirmed them in time.
    Not counted as an outage: the writes were made, and the caller must not undo them."""


class BoundedPool(BlockingConnectionPool):
    """At most `max_connections`; a caller waits `timeout` seconds for a free one."""

    def __init__(self, *, setting: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.setting = setting

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-any-return]
        except RedisConnectionError as e:
            # The pool raises "No connection available" from the timeout of its wait; a failed
            # connect raises without a cause.
            if isinstance(e.__cause__, TimeoutError):
                raise PoolExhausted(self.setting, self.max_connections) from e
            raise


class BoundedSentinelPool(SentinelPool, BoundedPool):
    """A `BoundedPool` whose connections go to the primary the sentinels name (redis-py's
    Sentinel pool over the blocking one: its connection class, the blocking wait)."""


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, PoolExhausted):
        return False
    return isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError)


class _StateLog(pybreaker.CircuitBreakerListener):
    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        old = old_state.name if old_state is not None else None
        if old == new_state.name:
            return  # the probe opening it again: it was open all along
        metrics.record_breaker_state(new_state.name)
        if new_state.name == pybreaker.STATE_OPEN:
            logger.warning("Redis circuit breaker open (%s -> open): answering 503 for now", old)
        else:
            logger.info("Redis circuit breaker %s -> %s", old, new_state.name)


class RedisBreaker:
    """pybreaker's state machine; its asyncio support needs tornado, so awaited calls run inside
    its `calling()` context manager, which counts what escapes the block."""

    def __init__(self, settings: Settings) -> None:
        self._storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=settings.redis_breaker_failures,
            reset_timeout=settings.redis_breaker_reset_s,
            # Anything else (a cancelled request, WRONGTYPE, a full pool) means Redis answered
            # or was not asked; pybreaker counts those as successes.
            exclude=[lambda e: not _is_outage(e)],
            state_storage=self._storage,
            listeners=[_StateLog()],
            throw_new_error_on_trip=False,
            name="redis",
        )
        metrics.record_breaker_state(pybreaker.STATE_CLOSED)
        # Whether the probe's last PING went unanswered; only then may its answer close the
        # breaker.
        self._probe_silent = False
        # Once Redis answers again, the probe closes the breaker within this.
        self._probe_retry_after_s = max(
            1, math.ceil(settings.redis_probe_interval_s + settings.redis_probe_timeout_s)
        )

    @property
    def state(self) -> str:
        return str(self._breaker.current_state)

    @contextmanager
    def guard(self) -> Iterator[None]:
        try:
            with self._breaker.calling():
                yield
        except pybreaker.CircuitBreakerError as e:
            if self._probe_silent:
                raise CircuitOpen("Redis does not answer", self._probe_retry_after_s) from e
            why = f"Redis failed {self._breaker.fail_max} times in a row"
            raise CircuitOpen(why, self._retry_after_s()) from e

    def probe_failed(self, error: BaseException) -> None:
        """Redis left the probe's PING unanswered. The breaker opens, and opens again at each
        unanswered PING, so that no request waits on a trial while Redis stays silent: the probe
        is the trial."""
        if not self._probe_silent:
            logger.warning("Redis did not answer the gateway's probe: %r", error)
        self._probe_silent = True
        self._breaker.open()

    def probe_answered(self) -> None:
        """Closes the breaker if the probe had found Redis silent. One that requests opened
        while the probe was answered waits out its reset: what failed them is not what the probe
        sees (a refused connect from a full Redis, say), and closing it at every PING would make
        each request find out again."""
        if self._probe_silent:
            self._probe_silent = False
            self._breaker.close()

    def _retry_after_s(self) -> int:
        opened_at: datetime | None = self._storage.opened_at
        if opened_at is None:
            return 1
        left = self._breaker.reset_timeout - (datetime.now(UTC) - opened_at).total_seconds()
        return max(1, math.ceil(left))


class GuardedPipeline(Pipeline):
    def __init__(self, breaker: RedisBreaker, *args: Any) -> None:
        super().__init__(*args)
        self.breaker = breaker
        self._replicas: tuple[int, int] | None = None

    def require_replicas(self, replicas: int, timeout_ms: int) -> None:
        """Make the next `execute` of this transaction return only once `replicas` replicas
        hold its writes, waiting up to `timeout_ms`; else it raises `NotReplicated`, the writes
        made. WAIT counts what its own connection wrote, so it runs on the transaction's."""
        self._replicas = (replicas, timeout_ms)

    async def _execute_transaction(
        self, connection: Connection, commands: Any, raise_on_error: bool
    ) -> list[Any]:
        replies: list[Any] = await super()._execute_transaction(
            connection, commands, raise_on_error
        )
        if self._replicas is not None:
            replicas, timeout_ms = self._replicas
            # The socket timeout bounds a reply; this one may take the whole wait first.
            read_timeout_s = timeout_ms / 1000 + (connection.socket_timeout or 0)
            try:
                await connection.send_command("WAIT", replicas, timeout_ms)
                acked = int(await connection.read_response(timeout=read_timeout_s))
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                # After EXEC: the writes were made, whether or not a replica has them.
                raise NotReplicated(f"the primary failed before replicas confirmed: {e}") from e
            if acked < replicas:
                raise NotReplicated(
                    f"{acked} of the {replicas} replicas required confirmed the write within "
                    f"{timeout_ms} ms"
                )
        return replies

    async def reset(self) -> None:
        self._replicas = None
        await super().reset()  # type: ignore[no-untyped-call]  # untyped in redis-py

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if not self.command_stack and not self.watching:
            return []  # nothing to send: not a call the breaker should count
        name = "MULTI" if self.is_transaction else "PIPELINE"
        with self.breaker.guard(), metrics.redis_command(name):
            return await super().execute(raise_on_error)

    async def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        with self.breaker.guard(), metrics.redis_command(_command(args)):
            return await super().immediate_execute_command(*args, **options)  # type: ignore[no-untyped-call]


class GuardedRedis(ArqRedis):
    def __init__(self, pool: BoundedPool, *, breaker: RedisBreaker, **kwargs: Any) -> None:
        super().__init__(pool, **kwargs)
        self.breaker = breaker

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        with self.breaker.guard():
            if _blocking(args):  # waits for events on purpose: not a latency
                return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
            with metrics.redis_command(_command(args)):
                return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> GuardedPipeline:
        return GuardedPipeline(
            self.breaker, self.connection_pool, self.response_callbacks, transaction, shard_hint
        )


def _command(args: tuple[Any, ...]) -> str:
    """The command's name, as redis-py's methods spell it (never a client's input)."""
    name = args[0] if args else None
    return name.upper() if isinstance(name, str) else "OTHER"


def _blocking(args: tuple[Any, ...]) -> bool:
    """An `XREAD BLOCK`: redis-py puts the option right after the command's name."""
    return len(args) > 1 and args[1] in (b"BLOCK", "BLOCK")


def _pool(settings: Settings, *, setting: str, limit: int, read_timeout_s: float) -> BoundedPool:
    return connection_pool(
        settings,
        BoundedPool,
        BoundedSentinelPool,
        setting=setting,
        max_connections=limit,
        timeout=settings.redis_command_timeout_s,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        socket_timeout=read_timeout_s,
        health_check_interval=30,
    )


class Listeners:
    """Connections for clients waiting on job events, one held per client."""

    def __init__(self, pool: BoundedPool, breaker: RedisBreaker) -> None:
        self.pool = pool
        self.breaker = breaker

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[GuardedRedis]:
        """A client bound to one connection of the pool until the block ends; `PoolExhausted`
        when none comes free within the command timeout."""
        client = GuardedRedis(self.pool, breaker=self.breaker, single_connection_client=True)
        with self.breaker.guard():
            await client.initialize()
        try:
            yield client
        finally:
            await client.aclose()


def create_gateway_redis(settings: Settings) -> tuple[GuardedRedis, Listeners]:
    """The command client and the listeners; neither connects before its first use."""
    breaker = RedisBreaker(settings)
    commands = _pool(
        settings,
        setting="GENQ_REDIS_MAX_CONNECTIONS",
        limit=settings.redis_max_connections,
        read_timeout_s=settings.redis_command_timeout_s,
    )
    streams = _pool(
        settings,
        setting="GENQ_REDIS_MAX_STREAM_CONNECTIONS",
        limit=settings.redis_max_stream_connections,
        read_timeout_s=STREAM_BLOCK_S + settings.redis_command_timeout_s,
    )
    redis = GuardedRedis(
        commands,
        breaker=breaker,
        job_serializer=serialize_payload,
        job_deserializer=deserialize_payload,
        default_queue_name=keys.queue(settings.pool),
    )
    return redis, Listeners(streams, breaker)
