"""Per-key rate limits, shared by every gateway replica through Redis.

- generation requests per minute and tokens per minute: the `limits` library's sliding-window
  counters (two counters per key and limit: the current minute and the one before, weighted), in
  the gateway's Redis. A request costs 1; its tokens are its `max_new_tokens`, counted when the
  job is accepted (as OpenAI counts `max_tokens`): what the job may generate at most, known
  before it runs, so that a burst cannot overshoot, and never refunded;
- jobs in flight: `limits` has no concurrency limit, so each key has a set of its unfinished
  jobs (`JobStore.admit`) that a job leaves when it ends (the job store's FINISH script).

Every answer to a submission carries the IETF httpapi draft's headers: `RateLimit-Policy`
(each limit: quota `q`, window `w`, unit `qu`) and `RateLimit` (remaining `r`, seconds to the
next unit `t`); a refusal is a 429 with `Retry-After`.

The `limits` storage runs its commands on the gateway's bounded command pool, inside the Redis
circuit breaker. When Redis fails, a submission answers 503, or with GENQ_RATE_LIMIT_FAIL_OPEN
is let through unlimited. With Sentinel that pool is redis-py's Sentinel pool, so the counters
follow a failover with everything else; `limits`' own `redis+sentinel://` storage would open an
unbounded pool of its own, outside the breaker, and read the counters from replicas, which lag.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable
from typing import TypeVar

from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.exceptions import RedisError

from common import keys
from common.jobstore import JobStore
from common.settings import Settings
from gateway import metrics
from gateway.auth import Caller, Quota
from gateway.errors import LimitExceeded, RateLimited
from gateway.redisclient import GuardedRedis

logger = logging.getLogger(__name__)

T = TypeVar("T")

_WINDOW_S = 60
# A job may end at any moment: a key at its concurrency limit retries soon.
_CONCURRENT_RETRY_S = 1


class RateLimiter:
    def __init__(self, redis: GuardedRedis, store: JobStore, settings: Settings) -> None:
        storage = RedisStorage(
            "async+redis://",
            implementation="redispy",
            key_prefix=keys.rate_limits(),
            # Typed as scalar options, passed on to redis-py's client as they are.
            connection_pool=redis.connection_pool,  # type: ignore[arg-type]
        )
        self._window = SlidingWindowCounterRateLimiter(storage)
        self._breaker = redis.breaker
        self._store = store
        self.fail_open = settings.rate_limit_fail_open

    async def count_requests(self, caller: Caller, requests: int) -> None:
        """Count `requests` generation requests against the caller's per-minute limit."""
        quota = caller.principal.limits.requests_per_minute
        if quota > 0:
            await self._spend(caller, "requests", quota, requests)

    async def admit_jobs(self, caller: Caller, job_ids: list[str], tokens: int) -> bool:
        """Count new jobs towards the caller's concurrency limit, then their tokens towards its
        tokens per minute. True if they were counted as in flight: `release` them should they
        not be queued after all."""
        limits = caller.principal.limits
        if 0 < limits.tokens_per_minute < tokens:
            raise LimitExceeded(
                f"{tokens} tokens (max_new_tokens) in one request; the API key "
                f"{caller.principal.name!r} may use {limits.tokens_per_minute} a minute "
                "(tokens_per_minute, GENQ_RATE_LIMIT_TOKENS_PER_MINUTE)"
            )
        counted = False
        if limits.concurrent > 0:
            admitted = await self._guarded(
                self._store.admit(caller.principal.id, job_ids, limits.concurrent)
            )
            if admitted is not None:
                ok, in_flight = admitted
                left = max(0, limits.concurrent - in_flight)
                caller.quota["concurrent"] = Quota(limits.concurrent, left, reset_s=None)
                if not ok:
                    raise RateLimited(
                        "concurrent",
                        f"the API key {caller.principal.name!r} has {in_flight} jobs queued or "
                        f"running; its limit is {limits.concurrent} (concurrent, "
                        "GENQ_RATE_LIMIT_CONCURRENT)",
                        retry_after_s=_CONCURRENT_RETRY_S,
                    )
                counted = True
        if limits.tokens_per_minute > 0:
            try:
                await self._spend(caller, "tokens", limits.tokens_per_minute, tokens)
            except BaseException:
                if counted:
                    await self.release(caller, job_ids)
                raise
        return counted

    async def release(self, caller: Caller, job_ids: list[str]) -> None:
        try:
            await self._store.leave_in_flight(caller.principal.id, job_ids)
        except RedisError as e:
            # ADMIT drops them later: their records never appear.
            logger.warning("could not release %d in-flight slots: %s", len(job_ids), e)

    async def _spend(self, caller: Caller, name: str, quota: int, cost: int) -> None:
        item = RateLimitItemPerMinute(quota)
        ids = (caller.principal.id, name)
        hit = await self._guarded(self._window.hit(item, *ids, cost=cost))
        if hit is None:
            return
        stats = await self._guarded(self._window.get_window_stats(item, *ids))
        if stats is None:
            return
        reset_s = max(1, math.ceil(stats.reset_time - time.time()))
        caller.quota[name] = Quota(quota, stats.remaining, reset_s)
        if not hit:
            raise RateLimited(
                f"{name}_per_minute",
                f"the API key {caller.principal.name!r} asked for {cost} {name}; {stats.remaining}"
                f" of its {quota} a minute are left ({name}_per_minute, "
                f"GENQ_RATE_LIMIT_{name.upper()}_PER_MINUTE)",
                retry_after_s=reset_s,
            )

    async def _guarded(self, call: Awaitable[T]) -> T | None:
        """The call's result; None when Redis failed and the limiter fails open."""
        try:
            with self._breaker.guard():
                return await call
        except RedisError as e:
            if not self.fail_open:
                raise
            metrics.RATE_LIMITER_BYPASSED.inc()
            logger.debug("rate limiter unavailable, request let through: %s", e)
            return None


_UNITS = {"requests": None, "tokens": "tokens", "concurrent": "concurrent-requests"}


def rate_limit_headers(caller: Caller) -> list[tuple[bytes, bytes]]:
    """`RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers) for what the
    request counted: structured-field lists with one item per limit."""
    if not caller.quota:
        return []
    policies, states = [], []
    for name, state in caller.quota.items():
        policy = f'"{name}";q={state.quota}'
        if state.reset_s is not None:
            policy += f";w={_WINDOW_S}"
        if (unit := _UNITS[name]) is not None:
            policy += f';qu="{unit}"'
        policies.append(policy)
        reset = "" if state.reset_s is None else f";t={state.reset_s}"
        states.append(f'"{name}";r={state.remaining}{reset}')
    return [
        (b"ratelimit-policy", ", ".join(policies).encode()),
        (b"ratelimit", ", ".join(states).encode()),
    ]
