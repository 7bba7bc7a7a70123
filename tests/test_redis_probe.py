"""The Redis probe opens the gateway's circuit breaker when Redis leaves a PING unanswered, and
closes only what it opened."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from common.settings import Settings
from gateway.redisclient import CircuitOpen, GuardedRedis, create_gateway_redis
from gateway.redisprobe import RedisProbe
from genq.redis_ha import RedisHA
from genq.redis_server import RedisServer, free_port


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis to pause or fill, out of the other tests' way."""
    server = RedisServer(tmp_path, free_port(), persist=False)
    server.start()
    yield server
    server.stop()


@asynccontextmanager
async def gateway_redis(settings: Settings) -> AsyncIterator[tuple[GuardedRedis, RedisProbe]]:
    redis, listeners = create_gateway_redis(settings)
    probe = RedisProbe.from_settings(settings, redis.breaker)
    try:
        yield redis, probe
    finally:
        await probe.aclose()
        await redis.aclose(close_connection_pool=True)
        await listeners.pool.disconnect()


async def test_an_unanswered_ping_opens_the_breaker_and_the_next_answer_closes_it(
    own_redis: RedisServer,
) -> None:
    settings = Settings(redis_url=SecretStr(own_redis.url), redis_breaker_reset_s=60)
    async with gateway_redis(settings) as (redis, probe):
        await probe.check()
        assert redis.breaker.state == "closed"
        own_redis.pause()
        try:
            await probe.check()
            assert redis.breaker.state == "open"
            with pytest.raises(CircuitOpen) as refused:
                await redis.get("a-key")
            # Not the 60 s of the breaker's reset: the probe closes it once Redis answers.
            assert refused.value.retry_after_s == 1
        finally:
            own_redis.resume()
        await probe.check()
        assert redis.breaker.state == "closed"
        assert await redis.get("a-key") is None


async def test_the_probe_leaves_a_breaker_that_requests_opened_to_its_reset(
    own_redis: RedisServer,
) -> None:
    """Redis refuses new connections (maxclients) but answers on the probe's: what fails the
    requests is not what the probe sees. Were its answers to close the breaker, every request
    would find the failure again, a PING later."""
    settings = Settings(
        redis_url=SecretStr(own_redis.url), redis_breaker_failures=2, redis_breaker_reset_s=60
    )
    admin = Redis.from_url(own_redis.url)
    async with gateway_redis(settings) as (redis, probe):
        try:
            await probe.check()  # connects
            await admin.config_set("maxclients", len(await admin.client_list()))
            for _ in range(2):
                with pytest.raises(RedisConnectionError, match="max number of clients"):
                    await redis.get("a-key")
            assert redis.breaker.state == "open"
            await probe.check()
            assert redis.breaker.state == "open"
            with pytest.raises(CircuitOpen) as refused:
                await redis.get("a-key")
            assert refused.value.retry_after_s > 50
        finally:
            await admin.config_set("maxclients", 10000)
            await admin.aclose()


async def test_with_sentinel_the_probe_pings_the_primary_the_sentinels_name(
    redis_ha: RedisHA,
) -> None:
    # The URL names a port nothing listens on: with Sentinel only its password counts.
    settings = Settings(
        redis_url=SecretStr(f"redis://:{redis_ha.password}@127.0.0.1:{free_port()}/0"),
        redis_sentinels=redis_ha.sentinel_addresses,
        redis_sentinel_password=redis_ha.sentinel_password,
        redis_breaker_reset_s=60,
    )
    async with gateway_redis(settings) as (redis, probe):
        await probe.check()
        assert redis.breaker.state == "closed"
        old = redis_ha.primary.port
        redis_ha.primary.kill()
        await probe.check()
        assert redis.breaker.state == "open"
        redis_ha.wait_for_promotion(old)
        await probe.check()  # may still meet the dead primary's connection
        await probe.check()
        assert redis.breaker.state == "closed"
