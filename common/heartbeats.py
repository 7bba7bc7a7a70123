"""Which workers are alive and which models each holds: written by workers, read by the gateway."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field
from redis.asyncio import Redis

from common import keys

# The states of a model version a worker holds: `loading` until its first load ends, then
# `ready`; `reloading` while new weights load (the old ones still serve); `failed` when its load
# failed (`reason` says why).
ModelState = Literal["loading", "ready", "reloading", "failed"]


class HeldModelInfo(BaseModel):
    """What a heartbeat tells of a model version its worker holds (the worker's `HeldModel`)."""

    key: str = Field(description="name@version")
    state: ModelState
    reason: str | None = Field(None, description="Why it failed to load (or to reload).")
    loaded_at: float | None = None
    bytes: int = Field(0, description="Memory its weights take.")
    decode: str | None = Field(
        None,
        description="How its engine decodes: `cuda_graphs`, `static` or `eager`, `+compiled` "
        "when torch.compile'd; unset until the engine has set up.",
    )
    decode_note: str | None = Field(
        None, description="Why it decodes otherwise than configured (a fallback)."
    )
    max_context: int | None = Field(
        None, description="Prompt and generated tokens it serves at most; unset until loaded."
    )


class WorkerInfo(BaseModel):
    """What a worker's heartbeat tells: the worker, the models it holds, the jobs it runs."""

    id: str
    pool: str
    models: list[HeldModelInfo]
    running: int
    started_at: float
    host: str
    pid: int


# A worker missing this many heartbeats in a row counts as dead.
_MISSED_BEATS = 3


def lapse_ms(interval_s: float) -> int:
    """How long a heartbeat, and the job leases it renews, outlive the beat that wrote them."""
    return int(interval_s * _MISSED_BEATS * 1000)


async def beat(redis: Redis, info: WorkerInfo, interval_s: float) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(keys.worker(info.id), info.model_dump_json(), px=lapse_ms(interval_s))
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
