"""A job started a second time on the worker that still runs its first attempt, as arq does
when the job's lease lapsed during a Redis stall and the reaper queued it again: the first
attempt stops and writes nothing more, the second finishes the job."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.jobs import deserialize_job
from redis.asyncio import Redis

from common import keys
from common.catalog import CatalogSource
from common.contract import deserialize_payload
from common.events import EventType, decode, decode_job
from common.jobs import JobStatus, TokenEvent
from common.jobstore import JobStore
from common.redisconn import create_redis
from common.settings import Settings
from gateway.app import create_app
from genq.redis_server import RedisServer
from tests.conftest import TINY_NAME
from worker.job_runner import JobRunner

# Bounds a run that never ends (the test fails rather than hangs); no time is asserted.
_GUARD_S = 120


@pytest.fixture
def settings(redis_server: RedisServer, tiny_model_dir: Path) -> Settings:
    return Settings(
        redis_url=redis_server.url,
        model=str(tiny_model_dir),
        model_name=TINY_NAME,
        device="cpu",
        allow_anonymous=True,
    )


@pytest.fixture
async def gateway(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as client,
    ):
        yield client


@pytest.fixture
async def runner(settings: Settings) -> AsyncIterator[JobRunner]:
    """A worker's job runner, in this process."""
    arq = create_redis(settings)
    store = JobStore(arq, ttl_s=60, events_maxlen=10_000)
    runner = JobRunner(
        store, settings, arq, CatalogSource(settings), lambda: None, "w", lambda: False
    )
    runner.models.preload()
    await runner.start()
    yield runner
    await runner.stop()
    await arq.aclose()


async def queued_item(redis: Redis, job_id: str) -> Any:
    """The job's work item, as a worker reads it from the queue."""
    raw = await redis.get(keys.arq_job(job_id))
    assert raw is not None
    return deserialize_job(raw, deserializer=deserialize_payload).args[0]


async def test_a_second_attempt_on_the_worker_running_the_first_finishes_the_job(
    redis: Redis, gateway: httpx.AsyncClient, runner: JobRunner
) -> None:
    body = {"prompt": "Once", "max_new_tokens": 900, "temperature": 0, "ignore_eos": True}
    resp = await gateway.post("/v1/jobs", json=body)
    assert resp.status_code == 202
    job_id = resp.json()["id"]
    item = await queued_item(redis, job_id)

    async with asyncio.timeout(_GUARD_S):
        first = asyncio.create_task(runner.run(job_id, item, attempt=1))
        while not await redis.xlen(keys.events(job_id)):
            assert not first.done(), first.result()
            await asyncio.sleep(0.01)  # the first attempt is generating
        second = asyncio.create_task(runner.run(job_id, item, attempt=2))
        assert await first == "superseded"
        assert runner.attempt_of(job_id) == 2
        assert await second == "succeeded"

    assert runner.running == 0
    assert runner.attempt_of(job_id) is None
    entries = [decode(i, f) for i, f in await redis.xrange(keys.events(job_id))]
    assert [e.type for e in entries].count(EventType.done) == 1
    assert entries[-1].type is EventType.done
    final = decode_job(entries[-1])
    assert final.status is JobStatus.succeeded
    assert final.attempt == 2
    assert final.result is not None
    assert final.result.usage.completion_tokens == 900
    tokens = [TokenEvent.model_validate_json(e.data) for e in entries[:-1]]
    assert [t.index for t in tokens] == list(range(len(tokens)))  # none lost, none repeated
    assert "".join(t.text for t in tokens) == final.result.text
