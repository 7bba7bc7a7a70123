"""Submitting jobs, reading them, and waiting for them."""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import AsyncIterator

from arq.connections import ArqRedis

from common import events, keys
from common.events import Event
from common.jobstore import JobStore
from common.schemas import GenerationRequest, Job, JobResult, JobStatus, Usage
from common.settings import Settings
from gateway import metrics
from gateway.errors import BadRequest, JobNotFound, QueueFull
from gateway.services.events import STREAM_ID, read_events
from gateway.services.limits import check_limits
from gateway.services.models import ModelService
from gateway.services.queue import QueueService

JOB_FUNCTION = "generate"

# Score offsets (in priority steps) on the arq queue, which runs the lowest score first. A job's
# score is its enqueue time plus this, so waiting ages a job: after one step a `low` job ranks
# with a fresh `normal` one, and nothing waits forever behind a stream of `high` work.
_PRIORITY_STEPS = {"high": -2, "normal": -1, "low": 0}


class JobService:
    def __init__(
        self,
        redis: ArqRedis,
        store: JobStore,
        models: ModelService,
        queue: QueueService,
        settings: Settings,
    ) -> None:
        self.redis = redis
        self.store = store
        self.models = models
        self.queue = queue
        self.settings = settings

    async def submit(self, request: GenerationRequest) -> Job:
        check_limits(request, self.settings)
        route = await self.models.resolve(request.model)
        if await self.queue.depth(route.pool) >= self.settings.max_queue_depth:
            metrics.REJECTED.labels("queue_full").inc()
            raise QueueFull(
                f"the queue of pool {route.pool!r} is full "
                f"({self.settings.max_queue_depth} jobs, GENQ_MAX_QUEUE_DEPTH); retry later",
                retry_after_s=self.settings.queue_full_retry_after_s,
            )
        job = Job(
            id=uuid.uuid4().hex,
            status=JobStatus.queued,
            model=route.model,
            created_at=time.time(),
        )
        await self.store.create(job, pool=route.pool)
        # Drawn here, not by the worker, so that a re-run after a worker dies reproduces the
        # tokens already streamed.
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        max_new_tokens = request.max_new_tokens or self.settings.default_max_new_tokens
        await self.redis.enqueue_job(
            JOB_FUNCTION,
            job.id,
            request.model_dump(mode="json"),
            seed,
            max_new_tokens,
            _job_id=job.id,
            _queue_name=keys.queue(route.pool),
            _defer_by=_PRIORITY_STEPS[request.priority] * self.settings.priority_step_s,
        )
        metrics.SUBMITTED.labels(route.model).inc()
        return job.model_copy(update={"position": await self.queue.position(route.pool, job.id)})

    async def get(self, job_id: str) -> Job:
        job = await self.store.load(job_id)
        if job is None:
            raise JobNotFound(f"job {job_id!r} does not exist or has expired")
        if job.status is JobStatus.queued:
            pool = await self.store.pool(job_id)
            if pool is not None:
                job.position = await self.queue.position(pool, job_id)
        return job

    async def cancel(self, job_id: str) -> Job:
        """A queued job is taken off its queue and never runs; a running one is stopped by its
        worker within a decode step or two and ends `cancelled` with its partial text."""
        job = await self.get(job_id)
        if job.status.finished:
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
            await self.store.finish(final)
            return final
        # Running, or claimed by a worker an instant ago: the flag covers a worker that has not
        # started it yet, the message one that has.
        await self.store.request_cancel(job_id)
        await self.redis.publish(keys.cancellations(), job_id)
        return await self.wait(job_id, self.settings.cancel_wait_s)

    async def wait(self, job_id: str, timeout_s: float) -> Job:
        """The job once finished, or as it stands when `timeout_s` runs out."""
        deadline = time.monotonic() + timeout_s
        async for event in read_events(
            self.redis, job_id, after="0", deadline=deadline, block_ms=self._block_ms()
        ):
            if event.type.terminal:
                return events.decode_job(event)
        return await self.get(job_id)

    async def events(self, job_id: str, last_event_id: str | None) -> AsyncIterator[Event]:
        """The job's events after `last_event_id`; checks the job exists before streaming."""
        if last_event_id is not None and not STREAM_ID.match(last_event_id):
            raise BadRequest(
                f"Last-Event-ID {last_event_id!r} is not an event id of this API "
                "(they look like 1732512345678-0)"
            )
        await self.get(job_id)
        return read_events(
            self.redis,
            job_id,
            after=last_event_id or "0",
            deadline=None,
            block_ms=self._block_ms(),
        )

    def _block_ms(self) -> int:
        # XREAD BLOCK must return before the client's socket timeout would fire.
        return max(100, int((self.settings.redis_socket_timeout_s - 1.0) * 1000))
