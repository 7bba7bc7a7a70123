"""Queue statistics per worker pool."""

from __future__ import annotations

import time

from redis.asyncio import Redis
from redis.exceptions import WatchError

from common import heartbeats, keys
from common.catalog import CatalogSource
from common.jobstore import DRAIN_WINDOW_S, JobStore
from common.settings import Settings
from gateway.schemas import PoolStats, QueueStats


class QueueService:
    def __init__(
        self, redis: Redis, store: JobStore, settings: Settings, source: CatalogSource
    ) -> None:
        self.redis = redis
        self.store = store
        self.settings = settings
        self.source = source

    async def depth(self, pool: str) -> int:
        return int(await self.redis.zcard(keys.queue(pool)))

    async def position(self, pool: str, job_id: str) -> int | None:
        rank = await self.redis.zrank(keys.queue(pool), job_id)
        return None if rank is None else int(rank)

    async def estimated_start(self, pool: str, position: int) -> float | None:
        """When the job at `position` should start, at the pool's recent rate of starts."""
        now = time.time()
        recent = await self.redis.zrangebyscore(
            keys.starts(pool), now - DRAIN_WINDOW_S, "+inf", withscores=True
        )
        if len(recent) < 2:
            return None
        first, last = float(recent[0][1]), float(recent[-1][1])
        if last <= first:
            return None
        per_s = (len(recent) - 1) / (last - first)
        return max(now, last + (position + 1) / per_s)

    async def remove_waiting(self, pool: str, job_id: str) -> bool:
        """Take a job off its queue if no worker has claimed it; atomic with arq's claim, which
        watches the same in-progress key."""
        claim = keys.arq_in_progress(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(claim)
                if await pipe.exists(claim):
                    return False
                pipe.multi()  # type: ignore[no-untyped-call]  # untyped in redis-py
                pipe.zrem(keys.queue(pool), job_id)
                pipe.delete(keys.arq_job(job_id))
                removed, _ = await pipe.execute()
            except WatchError:
                return False
        return bool(removed)

    async def stats(self) -> QueueStats:
        pools = sorted(self.source.get().pools())
        return QueueStats(pools=[await self._pool_stats(p) for p in pools])

    async def _pool_stats(self, pool: str) -> PoolStats:
        now = time.time()
        queue = keys.queue(pool)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(queue)
            pipe.zcount(queue, "-inf", int(now * 1000))
            pipe.zrange(queue, 0, 0)
            depth, ready, head = await pipe.execute()
        workers = await heartbeats.live_workers(self.redis, pool)
        oldest_age_s = None
        if head:
            job = await self.store.load(head[0].decode())
            oldest_age_s = None if job is None else max(0.0, now - job.created_at)
        return PoolStats(
            pool=pool,
            depth=depth,
            ready=ready,
            running=sum(w.running for w in workers),
            oldest_age_s=oldest_age_s,
            workers_alive=len(workers),
        )
