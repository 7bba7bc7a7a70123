"""Submitting jobs, reading them, and waiting for them."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager

from arq.connections import ArqRedis
from opentelemetry.trace import Span, SpanKind
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common import events, keys, logs, tracing
from common.catalog import DEFAULT_ALIAS
from common.events import Event
from common.jobs import Job, JobResult, JobStatus, Usage
from common.jobstore import Fenced, JobStore
from common.settings import Settings
from common.webhooks import WebhookPolicy, enqueue_delivery
from gateway import metrics
from gateway.auth import Caller
from gateway.errors import (
    ApiError,
    BadRequest,
    IdempotencyConflict,
    JobNotFound,
    LimitExceeded,
    QueueFull,
    ShuttingDown,
    describe_validation,
)
from gateway.schemas import BatchItem, BatchResponse, ErrorDetail, GenerationRequest
from gateway.services.enqueue import fingerprint, is_deterministic, new_tokens, stage_enqueue
from gateway.services.events import STREAM_ID, EventReader
from gateway.services.limits import check_limits, check_model_limits
from gateway.services.queue import QueueService
from gateway.services.ratelimit import RateLimiter
from gateway.services.routing import ModelRouter, Route

# How long a request that lost an Idempotency-Key race waits for the winner's job record.
_IDEMPOTENCY_WAIT_S = 2.0
# Marks an Idempotency-Key answered by an identical earlier job (`cached: true`).
_SERVED = "served"


class JobService:
    def __init__(
        self,
        redis: ArqRedis,
        store: JobStore,
        router: ModelRouter,
        queue: QueueService,
        settings: Settings,
        reader: EventReader,
        limiter: RateLimiter,
    ) -> None:
        self.redis = redis
        self.store = store
        self.router = router
        self.queue = queue
        self.settings = settings
        self.reader = reader
        self.limiter = limiter
        self.webhooks = WebhookPolicy.from_settings(settings)

    def _sharing_scope(self, owner: str) -> str | None:
        """Whose jobs, results and cached prompts a request of `owner` may share: its own API
        key's, or everyone's (None) with GENQ_SHARE_ACROSS_KEYS."""
        return None if self.settings.share_across_keys else owner

    async def submit(
        self,
        request: GenerationRequest,
        caller: Caller,
        *,
        idempotency_key: str | None = None,
    ) -> Job:
        """Queue a job, or answer with the job that already serves this request: the one an
        earlier request with the same Idempotency-Key created, or (for deterministic requests)
        an identical one of the same API key that is running or has finished (`cached: true`)."""
        job = await self._submit(request, caller, idempotency_key)
        logs.current().job_id = job.id
        return job

    async def _submit(
        self, request: GenerationRequest, caller: Caller, idempotency_key: str | None
    ) -> Job:
        check_limits(request, self.settings, self.webhooks)
        route = await self.router.resolve(request.model)
        check_model_limits(request, route.spec, new_tokens(request, route.spec, self.settings))
        await self.limiter.count_requests(caller, 1)
        owner = caller.principal.id
        scope = self._sharing_scope(owner)
        job = self._new_job(route.model)
        claims: list[str] = []  # keys now naming this job, released if it is not queued
        # Idempotency is keyed by the name asked for: a canary split may route a retry to
        # another version.
        asked = request.model or DEFAULT_ALIAS
        if idempotency_key is not None:
            earlier = await self._claim_idempotency(owner, idempotency_key, asked, request, job.id)
            if earlier is not None:
                return earlier
            claims.append(keys.idempotency(owner, idempotency_key))
        # A request with a webhook wants its own delivery, so it never shares a job.
        if self.settings.cache_enabled and is_deterministic(request) and not request.webhook:
            digest = fingerprint(route.model, request, exclude={"priority"}, scope=scope)
            cache_key = keys.result_cache(digest)
            served = await self._from_cache(cache_key, job.id, owner)
            if served is not None:
                metrics.CACHE_HITS.inc()
                if idempotency_key is not None:
                    # A retry must get this same answer, not a conflict with a job never made.
                    await self._repoint_idempotency(
                        owner, idempotency_key, asked, request, served.id
                    )
                return served
            claims.append(cache_key)
        counted = False
        try:
            await self._check_depth(route.pool, 1)
            tokens = new_tokens(request, route.spec, self.settings)
            counted = await self.limiter.admit_jobs(caller, [job.id], tokens)
            with _enqueue_span(route.pool, [job]):
                async with self.redis.pipeline(transaction=True) as pipe:
                    stage_enqueue(
                        pipe,
                        self.store,
                        self.settings,
                        job,
                        request,
                        route,
                        owner=owner,
                        in_flight=counted,
                        cache_scope=scope,
                    )
                    pipe.zrank(keys.queue(route.pool), job.id)
                    *_, position = await pipe.execute()
        except BaseException:
            # A retry after a 429 (or an outage) must not find its key taken by a phantom job.
            await self._release(claims, job.id)
            if counted:
                await self.limiter.release(caller, [job.id])
            raise
        metrics.SUBMITTED.labels(route.pool, route.model).inc()
        return job.model_copy(update={"position": position})

    async def _release(self, claims: list[str], job_id: str) -> None:
        with contextlib.suppress(RedisError):
            for key in claims:
                owner = await self.redis.get(key)
                if owner is not None and owner.decode().split(" ", 1)[0] == job_id:
                    await self.redis.delete(key)

    async def submit_batch(self, items: list[dict[str, object]], caller: Caller) -> BatchResponse:
        """One job per valid item, all queued in one round trip; bad items are reported."""
        if len(items) > self.settings.max_batch_requests:
            raise LimitExceeded(
                f"{len(items)} requests; the limit is {self.settings.max_batch_requests} "
                "(GENQ_MAX_BATCH_REQUESTS)"
            )
        out: list[BatchItem] = []
        accepted: list[tuple[Job, GenerationRequest, Route]] = []
        for index, raw in enumerate(items):
            try:
                request = GenerationRequest.model_validate(raw)
                check_limits(request, self.settings, self.webhooks)
                route = await self.router.resolve(request.model)
                check_model_limits(
                    request, route.spec, new_tokens(request, route.spec, self.settings)
                )
            except ValidationError as e:
                out.append(BatchItem(index=index, error=_item_error("invalid_request", e)))
                continue
            except ApiError as e:
                out.append(
                    BatchItem(index=index, error=ErrorDetail(code=e.code, message=e.message))
                )
                continue
            job = self._new_job(route.model)
            accepted.append((job, request, route))
            out.append(BatchItem(index=index, job=job))
        if not accepted:
            return BatchResponse(items=out)
        await self.limiter.count_requests(caller, len(accepted))
        for pool in {r.pool for _, _, r in accepted}:
            await self._check_depth(pool, sum(1 for _, _, r in accepted if r.pool == pool))
        owner = caller.principal.id
        ids = [job.id for job, _, _ in accepted]
        tokens = sum(
            new_tokens(request, route.spec, self.settings) for _, request, route in accepted
        )
        counted = await self.limiter.admit_jobs(caller, ids, tokens)
        pools = ",".join(sorted({r.pool for _, _, r in accepted}))
        try:
            with _enqueue_span(pools, [job for job, _, _ in accepted]):
                async with self.redis.pipeline(transaction=True) as pipe:
                    for job, request, route in accepted:
                        stage_enqueue(
                            pipe,
                            self.store,
                            self.settings,
                            job,
                            request,
                            route,
                            owner=owner,
                            in_flight=counted,
                            cache_scope=self._sharing_scope(owner),
                        )
                    await pipe.execute()
        except BaseException:
            if counted:
                await self.limiter.release(caller, ids)
            raise
        for _, _, route in accepted:
            metrics.SUBMITTED.labels(route.pool, route.model).inc()
        return BatchResponse(items=out)

    def _new_job(self, model: str) -> Job:
        return Job(
            id=uuid.uuid4().hex, status=JobStatus.queued, model=model, created_at=time.time()
        )

    async def _check_depth(self, pool: str, adding: int) -> None:
        if await self.queue.depth(pool) + adding > self.settings.max_queue_depth:
            raise QueueFull(
                f"the queue of pool {pool!r} is full "
                f"({self.settings.max_queue_depth} jobs, GENQ_MAX_QUEUE_DEPTH); retry later",
                retry_after_s=self.settings.queue_full_retry_after_s,
            )

    async def _claim_idempotency(
        self, owner: str, key: str, model: str, request: GenerationRequest, job_id: str
    ) -> Job | None:
        """None if this request now owns `key` (of API key `owner`); else the job of the request
        that owns it."""
        digest = fingerprint(model, request)
        redis_key = keys.idempotency(owner, key)
        if await self.redis.set(
            redis_key, f"{job_id} {digest}", nx=True, ex=self.settings.idempotency_ttl_s
        ):
            return None
        holder = await self.redis.get(redis_key)
        if holder is None:  # expired just now: claim it again
            return await self._claim_idempotency(owner, key, model, request, job_id)
        holder_id, holder_digest, *served = holder.decode().split(" ")
        if holder_digest != digest:
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was used with a different request body"
            )
        deadline = time.monotonic() + _IDEMPOTENCY_WAIT_S
        while (job := await self.store.load(holder_id, owner=owner)) is None:
            if time.monotonic() > deadline:
                raise IdempotencyConflict(
                    f"the request holding Idempotency-Key {key!r} has not created its job"
                )
            await asyncio.sleep(0.05)
        job = await self._with_position(job)
        return job.model_copy(update={"cached": True}) if served else job

    async def _repoint_idempotency(
        self, owner: str, key: str, model: str, request: GenerationRequest, job_id: str
    ) -> None:
        value = f"{job_id} {fingerprint(model, request)} {_SERVED}"
        ttl = self.settings.idempotency_ttl_s
        await self.redis.set(keys.idempotency(owner, key), value, ex=ttl)

    async def _from_cache(self, cache_key: str, job_id: str, owner: str) -> Job | None:
        """The job serving identical requests, unless it failed; else register `job_id`.
        `owner` may see the job from now on, and holds it while it runs."""
        ttl = self.settings.cache_ttl_s
        if await self.redis.set(cache_key, job_id, nx=True, ex=ttl):
            return None
        serving = await self.redis.get(cache_key)
        job = None if serving is None else await self.store.load(serving.decode())
        failed = job is None or job.status in (JobStatus.failed, JobStatus.cancelled)
        if (
            job is None
            or failed
            or not await self.store.share(job.id, owner, hold=not job.status.finished)
        ):
            await self.redis.set(cache_key, job_id, ex=ttl)
            return None
        job = await self._with_position(job)
        return job.model_copy(update={"cached": True})

    async def get(self, job_id: str, owner: str | None) -> Job:
        """The job, if API key `owner` may see it (None: no check, for the gateway's own use);
        any other key gets the same 404 as for a job that does not exist."""
        logs.current().job_id = job_id
        job = await self.store.load(job_id, owner=owner)
        if job is None:
            raise JobNotFound(f"job {job_id!r} does not exist or has expired")
        return await self._with_position(job)

    async def _with_position(self, job: Job) -> Job:
        if job.status is JobStatus.queued:
            pool = await self.store.pool(job.id)
            if pool is not None:
                job.position = await self.queue.position(pool, job.id)
            if pool is not None and job.position is not None:
                job.estimated_start_at = await self.queue.estimated_start(pool, job.position)
        return job

    async def cancel(self, job_id: str, owner: str) -> Job:
        """API key `owner` lets go of a job. Once no client holds it (identical requests share
        one job), a queued job is taken off its queue and never runs, and a running one is
        stopped by its worker within a decode step or two and ends `cancelled` with its partial
        text."""
        job = await self.get(job_id, owner)
        if job.status.finished or await self.store.release_holder(job_id, owner) > 0:
            return job
        pool = await self.store.pool(job_id)
        if pool is not None and await self.queue.remove_waiting(pool, job_id):
            final = job.model_copy(
                update={
                    "status": JobStatus.cancelled,
                    "finished_at": time.time(),
                    "position": None,
                    "result": JobResult(
                        text="",
                        finish_reason="cancelled",
                        usage=Usage(prompt_tokens=0, completion_tokens=0),
                    ),
                }
            )
            if await self.store.finish(final, pool=pool) is not Fenced.ok:
                return await self.get(job_id, owner)  # it ended, or a worker took it, meanwhile
            if webhook := await self.store.webhook(job_id):
                await enqueue_delivery(self.redis, pool, job_id, webhook)
            return final
        # Running, or claimed by a worker an instant ago: the flag covers a worker that has not
        # started it yet, the message one that has.
        await self.store.request_cancel(job_id)
        await self.redis.publish(keys.cancellations(), job_id)
        return await self.wait(job_id, self.settings.cancel_wait_s)

    async def wait(
        self,
        job_id: str,
        timeout_s: float,
        *,
        known: Job | None = None,
        listener: Redis | None = None,
    ) -> Job:
        """The job once finished, or as it stands when `timeout_s` runs out or the gateway drains.

        `listener` is the connection to wait on (`Listeners.hold`); without one, one is taken
        here. `known`, the job as submitted, is the answer when Redis fails meanwhile: the job was
        accepted and will finish, so the caller can still point the client at it.
        """
        deadline = time.monotonic() + timeout_s
        try:
            if listener is not None:
                return await self._wait(listener, job_id, deadline)
            async with self.reader.listeners.hold() as held:
                return await self._wait(held, job_id, deadline)
        except RedisError:
            if known is None:
                raise
            return known

    async def _wait(self, listener: Redis, job_id: str, deadline: float) -> Job:
        with contextlib.suppress(ShuttingDown):
            async for event in self.reader.read(listener, job_id, after="0", deadline=deadline):
                if event.type.terminal:
                    return events.decode_job(event)
        return await self.get(job_id, None)

    async def events(
        self, job_id: str, last_event_id: str | None, listener: Redis, owner: str
    ) -> AsyncIterator[Event]:
        """The job's events after `last_event_id`, read on `listener`; checks the job exists
        before streaming. A job that had finished streams what is left of it and ends."""
        if last_event_id is not None and not STREAM_ID.match(last_event_id):
            raise BadRequest(
                f"Last-Event-ID {last_event_id!r} is not an event id of this API "
                "(they look like 1732512345678-0)"
            )
        await self.get(job_id, owner)
        return self.reader.read(listener, job_id, after=last_event_id or "0", deadline=None)


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


def _item_error(code: str, error: ValidationError) -> ErrorDetail:
    return ErrorDetail(code=code, message=describe_validation(error))
