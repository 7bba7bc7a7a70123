from __future__ import annotations

import time

from redis.asyncio import Redis

from common import keys
from common.events import EventType, decode, decode_job
from common.jobstore import JobStore
from common.schemas import Job, JobResult, JobStatus, TokenEvent, Usage


def new_job(job_id: str = "j1") -> Job:
    return Job(id=job_id, status=JobStatus.queued, model="m", created_at=time.time())


async def test_record_round_trips_and_expires(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    job = new_job()
    await store.create(job, pool="gpu")
    assert await store.load("j1") == job
    assert await store.pool("j1") == "gpu"
    assert 0 < await redis.ttl(keys.job("j1")) <= 100
    assert await store.load("missing") is None


async def test_finish_writes_record_and_closing_event_with_ttl(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    job = new_job()
    await store.create(job, pool="p")
    await store.append_step({"j1": [TokenEvent(index=0, text="a"), TokenEvent(index=1, text="b")]})
    assert await store.published_tokens("j1") == 2
    final = job.model_copy(
        update={
            "status": JobStatus.succeeded,
            "result": JobResult(
                text="ab", finish_reason="length", usage=Usage(prompt_tokens=1, completion_tokens=2)
            ),
        }
    )
    await store.finish(final)
    assert await store.load("j1") == final
    entries = [decode(i, f) for i, f in await redis.xrange(keys.events("j1"))]
    assert [e.type for e in entries] == [EventType.token, EventType.token, EventType.done]
    assert decode_job(entries[-1]) == final
    assert 0 < await redis.ttl(keys.events("j1")) <= 100


async def test_published_tokens_is_zero_for_a_new_job(redis: Redis) -> None:
    store = JobStore(redis, ttl_s=100, events_maxlen=1000)
    assert await store.published_tokens("fresh") == 0
