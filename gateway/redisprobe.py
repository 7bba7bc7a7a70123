"""The gateway's Redis probe: a PING every GENQ_REDIS_PROBE_INTERVAL_S on a connection of its own,
which opens the circuit breaker as soon as Redis leaves one unanswered for
GENQ_REDIS_PROBE_TIMEOUT_S, and closes it as soon as Redis answers again.

Without it the breaker learns of a stall from requests alone: GENQ_REDIS_BREAKER_FAILURES of them
wait out GENQ_REDIS_COMMAND_TIMEOUT_S, as does every request arriving meanwhile, and once Redis
is back requests are refused until GENQ_REDIS_BREAKER_RESET_S has passed. With it, only the
requests already waiting on Redis when it stalls, or arriving within the probe's interval and
timeout, wait; the others are refused at once, and served again as soon as Redis answers.

One unanswered PING is enough: a second one in a row would only be a longer timeout, and a
healthy Redis answers in a fraction of a millisecond. A false alarm (the gateway's own event
loop blocked past the timeout, say) lasts until the next PING.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.redisconn import SentinelPool, connection_pool
from common.settings import Settings
from gateway import metrics
from gateway.redisclient import RedisBreaker


class RedisProbe:
    def __init__(
        self, client: Redis, breaker: RedisBreaker, *, interval_s: float, timeout_s: float
    ) -> None:
        self.client = client
        self.breaker = breaker
        self.interval_s = interval_s
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: Settings, breaker: RedisBreaker) -> RedisProbe:
        # Its own connection, outside the bounded pools: a full pool is not a stall, and a stall
        # must not hold a connection that requests need. redis-py's default of no retries is
        # what it needs: the next PING is the retry. With Sentinel it PINGs the primary the
        # sentinels name: a connection dropped by a timeout asks them again, so the probe opens
        # the breaker while a failover runs and closes it once the promoted replica answers.
        client = Redis.from_pool(connection_pool(settings, ConnectionPool, SentinelPool))
        return cls(
            client,
            breaker,
            interval_s=settings.redis_probe_interval_s,
            timeout_s=settings.redis_probe_timeout_s,
        )

    async def check(self) -> None:
        """One PING; its connect, if the connection was lost, counts in its timeout."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.client.ping()
        # A timed-out PING drops its connection (redis-py cannot tell which reply is whose
        # after a cancel): the next one connects again. A refused password or a Redis still
        # loading its data raise connection errors too.
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            metrics.REDIS_PROBE_FAILURES.inc()
            self.breaker.probe_failed(e)
            return
        except RedisError:
            pass  # an error reply (an ACL without PING, say) is an answer all the same
        self.breaker.probe_answered()

    async def run(self) -> None:
        """Until cancelled (the application's lifespan)."""
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    async def aclose(self) -> None:
        await self.client.aclose()
