"""The job record (`keys.job`) and event stream (`keys.events`), read and written by both sides.

redis-py types its hash commands for its sync and async clients at once; the casts pick async.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping
from typing import cast

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from common import events, keys
from common.schemas import (
    Job,
    JobError,
    JobResult,
    JobStatus,
    Timings,
    TokenEvent,
    WebhookDelivery,
)

# How far back job starts count towards a pool's drain rate.
DRAIN_WINDOW_S = 300

# Hash fields holding nested models as JSON.
_JSON_FIELDS: dict[str, type[BaseModel]] = {
    "result": JobResult,
    "error": JobError,
    "timings": Timings,
}


def _to_hash(job: Job) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("status", "model", "created_at", "started_at", "finished_at", "attempt"):
        value = getattr(job, name)
        if value is not None:
            out[name] = str(value)
    for name in _JSON_FIELDS:
        value = getattr(job, name)
        if value is not None:
            out[name] = value.model_dump_json()
    return out


def _from_hash(job_id: str, raw: Mapping[bytes, bytes]) -> Job:
    data = {k.decode(): v.decode() for k, v in raw.items()}
    nested = {
        name: model.model_validate_json(data[name])
        for name, model in _JSON_FIELDS.items()
        if name in data
    }
    return Job(
        id=job_id,
        status=JobStatus(data["status"]),
        model=data["model"],
        created_at=float(data["created_at"]),
        started_at=float(data["started_at"]) if "started_at" in data else None,
        finished_at=float(data["finished_at"]) if "finished_at" in data else None,
        attempt=int(data.get("attempt", 0)),
        **nested,
    )


class JobStore:
    def __init__(self, redis: Redis, *, ttl_s: int, events_maxlen: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.events_maxlen = events_maxlen

    async def create(self, job: Job, *, pool: str, webhook: str | None = None) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            self.stage_create(pipe, job, pool=pool, webhook=webhook)
            await pipe.execute()

    def stage_create(
        self, pipe: Pipeline, job: Job, *, pool: str, webhook: str | None = None
    ) -> None:
        """Add the record's creation to `pipe`, so it can share a round trip with the enqueue."""
        extra = {"pool": pool, **({"webhook": webhook} if webhook else {})}
        pipe.hset(keys.job(job.id), mapping={**_to_hash(job), **extra})
        pipe.expire(keys.job(job.id), self.ttl_s)

    async def webhook(self, job_id: str) -> str | None:
        raw = await cast("Awaitable[bytes | None]", self.redis.hget(keys.job(job_id), "webhook"))
        return None if raw is None else raw.decode()

    async def load(self, job_id: str) -> Job | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.job(job_id))
            pipe.lrange(keys.deliveries(job_id), 0, -1)
            raw, deliveries = await pipe.execute()
        if not raw:
            return None
        job = _from_hash(job_id, raw)
        job.webhook_deliveries = [WebhookDelivery.model_validate_json(d) for d in deliveries]
        return job

    async def log_delivery(self, job_id: str, delivery: WebhookDelivery) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(keys.deliveries(job_id), delivery.model_dump_json())
            pipe.expire(keys.deliveries(job_id), self.ttl_s)
            await pipe.execute()

    async def pool(self, job_id: str) -> str | None:
        """The worker pool whose queue holds the job."""
        raw = await cast("Awaitable[bytes | None]", self.redis.hget(keys.job(job_id), "pool"))
        return None if raw is None else raw.decode()

    async def status(self, job_id: str) -> JobStatus | None:
        """The job's status; None once the record is gone (expired, or never there)."""
        raw = await cast("Awaitable[bytes | None]", self.redis.hget(keys.job(job_id), "status"))
        return None if raw is None else JobStatus(raw.decode())

    async def request_cancel(self, job_id: str) -> None:
        """Flag a job for cancellation; a worker that picks it up later sees the flag."""
        await cast("Awaitable[int]", self.redis.hset(keys.job(job_id), "cancel", "1"))

    async def cancel_requested(self, job_id: str) -> bool:
        return (await self.cancel_flags([job_id]))[0]

    async def cancel_flags(self, job_ids: list[str]) -> list[bool]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), "cancel")
            return [flag is not None for flag in await pipe.execute()]

    async def mark_running(self, job_id: str, *, model: str, attempt: int, pool: str) -> None:
        """Record the start, and log it for the pool's drain rate (queue ETAs)."""
        now = time.time()
        fields = {
            "status": JobStatus.running.value,
            "model": model,
            "started_at": str(now),
            "attempt": str(attempt),
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(keys.job(job_id), mapping=fields)
            pipe.zadd(keys.starts(pool), {job_id: now})
            pipe.zremrangebyscore(keys.starts(pool), "-inf", now - DRAIN_WINDOW_S)
            pipe.expire(keys.starts(pool), DRAIN_WINDOW_S)
            await pipe.execute()

    async def append_step(self, tokens: dict[str, list[TokenEvent]]) -> None:
        """One round trip for every job's new tokens of one decode step."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id, events_ in tokens.items():
                for token in events_:
                    pipe.xadd(
                        keys.events(job_id),
                        events.token_fields(token),
                        maxlen=self.events_maxlen,
                        approximate=True,
                    )
                # A job whose worker vanished must not leave its stream behind forever.
                pipe.expire(keys.events(job_id), self.ttl_s)
            await pipe.execute()

    async def published_tokens(self, job_id: str) -> int:
        """Token events already published: what an earlier, interrupted attempt streamed."""
        last = await self.redis.xrevrange(keys.events(job_id), count=1)
        if not last:
            return 0
        event = events.decode(*last[0])
        if event.type is not events.EventType.token:
            return 0
        return TokenEvent.model_validate_json(event.data).index + 1

    async def finish(self, job: Job) -> None:
        """Store the final record and close the event stream, atomically; both then expire."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.job(job.id), mapping=_to_hash(job))
            pipe.xadd(keys.events(job.id), events.final_fields(job))
            pipe.expire(keys.job(job.id), self.ttl_s)
            pipe.expire(keys.events(job.id), self.ttl_s)
            await pipe.execute()
