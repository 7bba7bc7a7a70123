"""The rate limiter when its Redis is gone: submissions refused, or let through as set."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr
from redis.exceptions import RedisError

from common.jobstore import JobStore
from common.settings import Settings
from gateway.auth import Caller, Limits, Principal, Scope
from gateway.redisclient import create_gateway_redis
from gateway.services.ratelimit import RateLimiter
from genq.redis_server import free_port


def limiter(*, fail_open: bool) -> RateLimiter:
    settings = Settings(
        redis_url=SecretStr(f"redis://127.0.0.1:{free_port()}/0"),  # nothing listens there
        redis_connect_timeout_s=0.2,
        rate_limit_fail_open=fail_open,
    )
    redis, _ = create_gateway_redis(settings)
    return RateLimiter(redis, JobStore(redis, ttl_s=60, events_maxlen=10), settings)


def caller() -> Caller:
    limits = Limits(requests_per_minute=10, tokens_per_minute=100, concurrent=2)
    return Caller(Principal(id="k1", name="k", scopes=frozenset(Scope), limits=limits))


async def test_without_redis_the_limiter_refuses_by_default() -> None:
    with pytest.raises(RedisError):
        await limiter(fail_open=False).count_requests(caller(), 1)
    with pytest.raises(RedisError):
        await limiter(fail_open=False).admit_jobs(caller(), ["j1"], 10)


async def test_without_redis_a_limiter_that_fails_open_lets_requests_through() -> None:
    open_limiter, who = limiter(fail_open=True), caller()
    bypassed = REGISTRY.get_sample_value("genq_rate_limiter_bypassed_total") or 0.0
    await open_limiter.count_requests(who, 1)
    assert REGISTRY.get_sample_value("genq_rate_limiter_bypassed_total") == bypassed + 1
    assert await open_limiter.admit_jobs(who, ["j1"], 10) is False  # nothing counted in flight
    assert who.quota == {}  # so no rate-limit headers claim what was not counted
