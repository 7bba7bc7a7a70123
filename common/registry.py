"""Which models are served by which pool, and which workers are alive: written by workers,
read by the gateway.

redis-py types its hash commands for its sync and async clients at once; the casts pick async.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import cast

from pydantic import BaseModel
from redis.asyncio import Redis

from common import keys


class ModelEntry(BaseModel):
    name: str
    pool: str
    source: str
    registered_at: float


class WorkerInfo(BaseModel):
    id: str
    pool: str
    models: list[str]
    running: int
    started_at: float
    host: str
    pid: int


# A worker missing this many heartbeats in a row counts as dead.
MISSED_BEATS = 3


async def register_model(redis: Redis, entry: ModelEntry) -> None:
    await cast("Awaitable[int]", redis.hset(keys.models(), entry.name, entry.model_dump_json()))


async def served_models(redis: Redis) -> dict[str, ModelEntry]:
    raw = await cast("Awaitable[dict[bytes, bytes]]", redis.hgetall(keys.models()))
    return {k.decode(): ModelEntry.model_validate_json(v) for k, v in raw.items()}


async def heartbeat(redis: Redis, info: WorkerInfo, interval_s: float) -> None:
    ttl_ms = int(interval_s * MISSED_BEATS * 1000)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.worker(info.id), info.model_dump_json(), px=ttl_ms)
        pipe.zadd(keys.workers(info.pool), {info.id: time.time()})
        await pipe.execute()


async def remove_worker(redis: Redis, info: WorkerInfo) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.worker(info.id))
        pipe.zrem(keys.workers(info.pool), info.id)
        await pipe.execute()


async def live_workers(redis: Redis, pool: str) -> list[WorkerInfo]:
    """Workers of `pool` whose heartbeat has not expired; forgets the dead ones."""
    ids = [i.decode() for i in await redis.zrange(keys.workers(pool), 0, -1)]
    if not ids:
        return []
    raw = await redis.mget([keys.worker(i) for i in ids])
    dead = [i for i, r in zip(ids, raw, strict=True) if r is None]
    if dead:
        await redis.zrem(keys.workers(pool), *dead)
    return [WorkerInfo.model_validate_json(r) for r in raw if r is not None]


async def pools(redis: Redis) -> set[str]:
    """Every pool that serves a registered model."""
    return {entry.pool for entry in (await served_models(redis)).values()}
