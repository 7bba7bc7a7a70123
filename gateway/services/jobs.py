"""Submitting jobs, reading them, and waiting for them."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator

from arq.connections import ArqRedis
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common import events, keys, logs
from common.events import Event
from common.jobs import Job, JobResult, JobStatus, Usage
from common.jobstore import Fenced, JobStore
from common.settings import Settings
from common.webhooks import enqueue_delivery
from gateway.auth import Caller
from gateway.errors import (
    ApiError,
    BadRequest,
    JobNotFound,
    LimitExceeded,
    ShuttingDown,
    describe_validation,
)
from gateway.schemas import BatchItem, BatchResponse, ErrorDetail, GenerationRequest
from gateway.services.dedup import Dedup
from gateway.services.enqueue import Enqueuer
from gateway.services.events import STREAM_ID, EventReader
from gateway.services.queue import QueueService
from gateway.services.ratelimit import RateLimiter
from gateway.services.routing import ModelRouter
from gateway.services.validation import RequestValidator, Validated


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
        self.queue = queue
        self.settings = settings
        self.reader = reader
        self.limiter = limiter
        self.validator = RequestValidator(settings, router)
        self.dedup = Dedup(redis, store, settings)
        self.enqueuer = Enqueuer(redis, store, queue, settings, limiter)

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
        validated = await self.validator.validate(request)
        await self.limiter.count_requests(caller, 1)
        job = _new_job(validated.route.model)
        reservation = await self.dedup.reserve(
            validated, caller.principal.id, idempotency_key, job.id
        )
        if (served := reservation.served) is not None:
            earlier = await self._with_position(served.job)
            job = earlier.model_copy(update={"cached": served.cached})
        else:
            try:
                (position,) = await self.enqueuer.enqueue([(job, validated)], caller)
            except BaseException:
                await self.dedup.release(reservation, job.id)
                raise
            job = job.model_copy(update={"position": position})
        logs.current().job_id = job.id
        return job

    async def submit_batch(self, items: list[dict[str, object]], caller: Caller) -> BatchResponse:
        """One job per valid item, all queued in one round trip; bad items are reported."""
        if len(items) > self.settings.max_batch_requests:
            raise LimitExceeded(
                f"{len(items)} requests; the limit is {self.settings.max_batch_requests} "
                "(GENQ_MAX_BATCH_REQUESTS)"
            )
        out: list[BatchItem] = []
        accepted: list[tuple[Job, Validated]] = []
        for index, raw in enumerate(items):
            try:
                validated = await self.validator.validate(GenerationRequest.model_validate(raw))
            except ValidationError as e:
                out.append(BatchItem(index=index, error=_item_error("invalid_request", e)))
                continue
            except ApiError as e:
                out.append(
                    BatchItem(index=index, error=ErrorDetail(code=e.code, message=e.message))
                )
                continue
            job = _new_job(validated.route.model)
            accepted.append((job, validated))
            out.append(BatchItem(index=index, job=job))
        if accepted:
            await self.limiter.count_requests(caller, len(accepted))
            await self.enqueuer.enqueue(accepted, caller)
        return BatchResponse(items=out)

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


def _new_job(model: str) -> Job:
    return Job(id=uuid.uuid4().hex, status=JobStatus.queued, model=model, created_at=time.time())


def _item_error(code: str, error: ValidationError) -> ErrorDetail:
    return ErrorDetail(code=code, message=describe_validation(error))
