"""The one way onto the queues, for a batch or a job alone: room in the pools, the caller's
limits, then the jobs in arq's own format, all in one Redis round trip."""

from __future__ import annotations

import secrets
import time
from collections import Counter
from contextlib import AbstractContextManager
from typing import Any

from arq.constants import expires_extra_ms
from arq.jobs import serialize_job as arq_payload
from opentelemetry.trace import Span, SpanKind
from redis.asyncio.client import Pipeline

from common import keys, logs, tracing
from common.contract import (
    GENERATE_FUNCTION,
    WorkItem,
    WorkRequest,
    required_features,
    serialize_payload,
)
from common.jobs import Job
from common.jobstore import JobStore
from common.settings import Settings
from gateway import metrics
from gateway.auth import Caller
from gateway.errors import ApiError, NotAcknowledged, QueueFull
from gateway.redisclient import GuardedPipeline, GuardedRedis, NotReplicated
from gateway.services.dedup import sharing_scope
from gateway.services.queue import QueueService
from gateway.services.ratelimit import RateLimiter
from gateway.services.validation import Validated

# Score offsets (in priority steps) on the arq queue, which runs the lowest score first. A job's
# score is its enqueue time plus this, so waiting ages a job: after one step a `low` job ranks
# with a fresh `normal` one, and nothing waits forever behind a stream of `high` work.
_PRIORITY_STEPS = {"high": -2, "normal": -1, "low": 0}
# A replica that missed the ack timeout is lagging, restarting, or being replaced.
_NOT_REPLICATED_RETRY_S = 1
_MARK_TTL_MS = 60_000


class Enqueuer:
    def __init__(
        self,
        redis: GuardedRedis,
        store: JobStore,
        queue: QueueService,
        settings: Settings,
        limiter: RateLimiter,
    ) -> None:
        self.redis = redis
        self.store = store
        self.queue = queue
        self.settings = settings
        self.limiter = limiter

    async def enqueue(self, batch: list[tuple[Job, Validated]], caller: Caller) -> list[int | None]:
        """Queue validated jobs of `caller`: each pool must have room for its share, and the
        caller's concurrency and token limits must admit them all; then every job goes in one
        transaction. Returns the jobs' places in their queues."""
        pools = Counter(validated.route.pool for _, validated in batch)
        for pool, adding in pools.items():
            await self._check_depth(pool, adding)
        owner = caller.principal.id
        scope = sharing_scope(self.settings, owner)
        ids = [job.id for job, _ in batch]
        tokens = sum(validated.max_new_tokens for _, validated in batch)
        counted = await self.limiter.admit_jobs(caller, ids, tokens)
        try:
            with _enqueue_span(",".join(sorted(pools)), [job for job, _ in batch]):
                async with self.redis.pipeline(transaction=True) as pipe:
                    self._acknowledge_when_replicated(pipe)
                    for job, validated in batch:
                        _stage_job(
                            pipe,
                            self.store,
                            self.settings,
                            job,
                            validated,
                            owner=owner,
                            in_flight=counted,
                            cache_scope=scope,
                        )
                    for job, validated in batch:
                        pipe.zrank(keys.queue(validated.route.pool), job.id)
                    replies = await pipe.execute()
        except NotReplicated as e:
            # The jobs are queued and will run: they keep their slots, and the caller's
            # Idempotency-Key (not released) gets them back on a retry.
            _count_submitted(batch)
            raise _not_acknowledged(e, ids, self.settings) from e
        except BaseException:
            if counted:
                await self.limiter.release(caller, ids)
            raise
        _count_submitted(batch)
        return replies[-len(batch) :]

    async def confirm_replicated(self, job_ids: list[str]) -> None:
        """For an answer naming jobs written earlier (a retry with an Idempotency-Key): that the
        replicas hold them, as the answer to a new job promises. A write after them that the
        replicas confirm proves it, since they apply the primary's writes in order."""
        if not self.settings.replicas_ack:
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                self._acknowledge_when_replicated(pipe)
                pipe.set(keys.replication_mark(), b"", px=_MARK_TTL_MS)
                await pipe.execute()
        except NotReplicated as e:
            raise _not_acknowledged(e, job_ids, self.settings) from e

    def _acknowledge_when_replicated(self, pipe: GuardedPipeline) -> None:
        if self.settings.replicas_ack:
            pipe.require_replicas(self.settings.replicas_ack, self.settings.redis_ack_timeout_ms)

    async def _check_depth(self, pool: str, adding: int) -> None:
        if await self.queue.depth(pool) + adding > self.settings.max_queue_depth:
            raise QueueFull(
                f"the queue of pool {pool!r} is full "
                f"({self.settings.max_queue_depth} jobs, GENQ_MAX_QUEUE_DEPTH); retry later",
                retry_after_s=self.settings.queue_full_retry_after_s,
            )


def _count_submitted(batch: list[tuple[Job, Validated]]) -> None:
    for _, validated in batch:
        metrics.SUBMITTED.labels(validated.route.pool, validated.route.model).inc()


def _not_acknowledged(error: NotReplicated, job_ids: list[str], settings: Settings) -> ApiError:
    jobs = f"job {job_ids[0]}" if len(job_ids) == 1 else f"{len(job_ids)} jobs"
    return NotAcknowledged(
        f"{jobs} queued, but {error} (GENQ_REDIS_MIN_REPLICAS_ACK="
        f"{settings.replicas_ack}, GENQ_REDIS_ACK_TIMEOUT_MS={settings.redis_ack_timeout_ms}): a "
        "Redis failover now could lose it. Retry with the same Idempotency-Key to get the same "
        "job once a replica has it",
        retry_after_s=_NOT_REPLICATED_RETRY_S,
    )


def _enqueue_span(pool: str, jobs: list[Job]) -> AbstractContextManager[Span]:
    """The producer span the queued jobs' work items name as their parent."""
    return tracing.tracer().start_as_current_span(
        "genq.enqueue",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "redis",
            "messaging.operation.type": "send",
            "messaging.destination.name": pool,
            "messaging.batch.message_count": len(jobs),
            "genq.job.id": jobs[0].id,
            "gen_ai.request.model": jobs[0].model,
        },
    )


def _stage_job(
    pipe: Pipeline,
    store: JobStore,
    settings: Settings,
    job: Job,
    validated: Validated,
    *,
    owner: str,
    in_flight: bool,
    cache_scope: str | None,
) -> None:
    """Add a job's record, its work item and its place in the queue to `pipe`. `owner` is the
    API key's principal; `in_flight`: the job counts towards its concurrency limit; the worker
    matches the prompt only against cached prompts of `cache_scope` (None: of every key). The
    item carries the request id and the trace context of the request being handled, for the
    worker's logs and spans."""
    request, route = validated.request, validated.route
    work = WorkRequest.model_validate(
        {**request.model_dump(mode="json"), "grammar": validated.grammar}
    )
    item = WorkItem(
        job_id=job.id,
        request=work,
        # Drawn here, not by the worker, so that a re-run reproduces the tokens already streamed.
        seed=request.seed if request.seed is not None else secrets.randbits(63),
        max_new_tokens=validated.max_new_tokens,
        model=route.model,
        cache_scope=cache_scope,
        # A worker that ignored these would do something else than asked: it must refuse.
        requires=required_features(work, cache_scope, validated.max_new_tokens),
        request_id=logs.current().request_id,
        trace_context=tracing.inject(),
    )
    head_start_ms = -_PRIORITY_STEPS[request.priority] * settings.priority_step_s * 1000
    webhook = str(request.webhook) if request.webhook else None
    # Deliveries are traced too: they read the trace context from the record.
    trace_context = item.trace_context if webhook else None
    store.stage_create(
        pipe,
        job,
        pool=route.pool,
        owner=owner,
        webhook=webhook,
        in_flight=in_flight,
        trace_context=trace_context,
    )
    stage_item(pipe, item.model_dump(mode="json"), pool=route.pool, head_start_ms=head_start_ms)


def stage_item(pipe: Pipeline, item: dict[str, Any], *, pool: str, head_start_ms: int) -> None:
    """Add arq's payload for a work item and its place in the pool's queue to `pipe`.

    What arq's `enqueue_job` writes, minus its check for an existing id (ours are fresh UUIDs),
    so that a batch of jobs costs one round trip, and a wake-up for the pool's idle workers. A
    job ranks by enqueue time less its head start.
    """
    now_ms = int(time.time() * 1000)
    score = now_ms - head_start_ms
    payload = arq_payload(
        GENERATE_FUNCTION, (item,), {}, None, now_ms, serializer=serialize_payload
    )
    pipe.psetex(keys.arq_job(item["job_id"]), score - now_ms + expires_extra_ms, payload)
    pipe.zadd(keys.queue(pool), {item["job_id"]: score})
    # In the same round trip: an idle worker takes the job now, not at its next poll.
    pipe.publish(keys.wake(pool), b"")
