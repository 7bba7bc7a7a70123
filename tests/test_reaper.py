"""The reaper on a real Redis: started jobs without a lease go back to the queue, or fail."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import cast

from arq.connections import ArqRedis
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from common import keys
from common.contract import ErrorCode
from common.events import EventType, decode, decode_job
from common.jobs import Job, JobStatus
from common.jobstore import JobStore, Reaped
from common.reaper import Reaper

POOL = "p"
MAX_TRIES = 3


async def started_job(redis: Redis, store: JobStore, job_id: str, attempt: int) -> None:
    """A job on the pool's queue that a worker started (as arq and the job function leave it)."""
    await store.create(
        Job(id=job_id, status=JobStatus.queued, model="m", created_at=time.time()),
        pool=POOL,
        owner="tester",
    )
    await redis.zadd(keys.queue(POOL), {job_id: time.time() * 1000})
    await redis.set(keys.arq_job(job_id), b"payload")
    await store.start_attempt(job_id, attempt=attempt, worker="w", model="m", pool=POOL)


def reaped(outcome: str) -> float:
    """genq_jobs_reaped_total of the pool for `outcome`."""
    labels = {"pool": POOL, "outcome": outcome}
    return REGISTRY.get_sample_value("genq_jobs_reaped_total", labels) or 0.0


def reaper_of(redis: Redis) -> tuple[Reaper, JobStore]:
    arq = ArqRedis(connection_pool=redis.connection_pool)
    store = JobStore(arq, ttl_s=100, events_maxlen=100)
    return Reaper(arq, store, MAX_TRIES), store


async def test_a_job_whose_lease_lapsed_goes_back_to_the_queue(redis: Redis) -> None:
    reaper, store = reaper_of(redis)
    await started_job(redis, store, "orphan", attempt=1)
    await started_job(redis, store, "held", attempt=1)
    await redis.set(keys.arq_in_progress("held"), b"1", px=10_000)
    requeued = reaped("requeued")

    assert await reaper.sweep(POOL) == {Reaped.requeued: 1, Reaped.held: 1}
    assert reaped("requeued") == requeued + 1

    orphan = await store.load("orphan")
    assert orphan is not None
    assert orphan.status is JobStatus.queued
    assert orphan.attempt == 1
    assert await redis.zscore(keys.queue(POOL), "orphan") is not None  # arq runs it again
    held = await store.load("held")
    assert held is not None
    assert held.status is JobStatus.running
    assert await store.started(POOL) == ["held"]
    assert await reaper.sweep(POOL) == {Reaped.held: 1}  # idempotent


async def test_a_job_out_of_tries_or_off_its_queue_fails_once(redis: Redis) -> None:
    reaper, store = reaper_of(redis)
    await started_job(redis, store, "tired", attempt=MAX_TRIES)
    await started_job(redis, store, "dropped", attempt=1)
    await redis.zrem(keys.queue(POOL), "dropped")

    failed = reaped("failed")

    # Sweeps racing each other (every worker and gateway may sweep) fail each job once.
    await asyncio.gather(*(reaper.sweep(POOL) for _ in range(5)))
    assert reaped("failed") == failed + 2

    for job_id in ("tired", "dropped"):
        entries = [decode(i, f) for i, f in await redis.xrange(keys.events(job_id))]
        assert [e.type for e in entries] == [EventType.error]
        final = decode_job(entries[0])
        assert final.status is JobStatus.failed
        assert final.error is not None
        assert final.error.code == ErrorCode.worker_lost
        assert await redis.zscore(keys.queue(POOL), job_id) is None
        assert not await redis.exists(keys.arq_job(job_id))
    assert await store.started(POOL) == []


async def test_a_job_that_ended_or_expired_leaves_the_running_set(redis: Redis) -> None:
    reaper, store = reaper_of(redis)
    await started_job(redis, store, "expired", attempt=1)
    await redis.delete(keys.job("expired"))
    await started_job(redis, store, "ended", attempt=1)
    await cast("Awaitable[int]", redis.hset(keys.job("ended"), "status", "succeeded"))
    assert await reaper.sweep(POOL) == {Reaped.gone: 1, Reaped.settled: 1}
    assert await store.started(POOL) == []


async def test_one_sweep_per_interval_for_the_fleet(redis: Redis) -> None:
    reaper, store = reaper_of(redis)
    await started_job(redis, store, "orphan", attempt=1)
    await reaper.take_turn(POOL, "gateway-a", interval_s=60)
    await store.start_attempt("orphan", attempt=2, worker="w", model="m", pool=POOL)
    await reaper.take_turn(POOL, "worker-b", interval_s=60)  # not its turn
    assert await redis.get(keys.reaper_turn(POOL)) == b"gateway-a"
    job = await store.load("orphan")
    assert job is not None
    assert job.status is JobStatus.running
