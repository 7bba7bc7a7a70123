"""The queue contract across releases: work items from a gateway one release ahead."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
from arq.connections import ArqRedis

from common.contract import ErrorCode, WorkItem, WorkRequest
from common.jobs import Job, JobStatus
from common.jobstore import JobStore
from gateway.services.enqueue import stage_item
from genq.redis_server import RedisServer
from tests.conftest import TINY_KEY, Stack


async def enqueue_raw(redis_server: RedisServer, item: dict[str, Any]) -> str:
    """Queue a work item as a gateway of another release would."""
    redis = ArqRedis.from_url(redis_server.url)
    store = JobStore(redis, ttl_s=600, events_maxlen=1000)
    job = Job(id=item["job_id"], status=JobStatus.queued, model=TINY_KEY, created_at=time.time())
    async with redis.pipeline(transaction=True) as pipe:
        store.stage_create(pipe, job, pool="default", owner="anonymous")
        stage_item(pipe, item, pool="default", head_start_ms=0)
        await pipe.execute()
    await redis.aclose()
    return job.id


def item(**extra: Any) -> dict[str, Any]:
    work = WorkItem(
        job_id=uuid.uuid4().hex,
        request=WorkRequest(prompt="Once upon a time", temperature=0),
        seed=1,
        max_new_tokens=8,
        model=TINY_KEY,
    )
    return {**work.model_dump(mode="json"), **extra}


def final(stack: Stack, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=stack.base, timeout=10) as client:
        while time.monotonic() < deadline:
            job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish")


async def test_a_newer_gateways_optional_fields_are_ignored(
    stack: Stack, stack_redis: RedisServer
) -> None:
    raw = item(priority_class="gold")
    raw["request"]["repetition_penalty"] = 1.0
    job = final(stack, await enqueue_raw(stack_redis, raw))
    assert job["status"] == "succeeded"
    assert job["result"]["usage"]["completion_tokens"] == 8


async def test_a_required_feature_the_worker_lacks_fails_the_job_clearly(
    stack: Stack, stack_redis: RedisServer
) -> None:
    job = final(stack, await enqueue_raw(stack_redis, item(requires=["speculative_decoding"])))
    assert job["status"] == "failed"
    assert job["error"]["code"] == ErrorCode.unsupported_feature
    assert "speculative_decoding" in job["error"]["message"]


async def test_an_unreadable_work_item_fails_the_job_clearly(
    stack: Stack, stack_redis: RedisServer
) -> None:
    raw = item(version=99)
    job = final(stack, await enqueue_raw(stack_redis, raw))
    assert job["error"]["code"] == ErrorCode.invalid_work_item
    assert "version 99" in job["error"]["message"]
