"""Submitting jobs, reading them, and waiting for them."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace

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
    NotAcknowledged,
    ShuttingDown,
    describe_validation,
)
from gateway.redisclient import GuardedRedis
from gateway.schemas import BatchItem, BatchResponse, ErrorDetail, GenerationRequest
from gateway.services.dedup import Dedup, Reservation
from gateway.services.enqueue import Enqueuer
from gateway.services.events import STREAM_ID, EventReader
from gateway.services.queue import QueueService
from gateway.services.ratelimit import RateLimiter
from gateway.services.routing import ModelRouter
from gateway.services.validation import RequestValidator, Validated

# Seeds are 63-bit (GenerationRequest.seed, the worker's draws).
_SEEDS = 2**63


class JobService:
    def __init__(
        self,
        redis: GuardedRedis,
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
        self.router = router
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
        (job,) = await self.submit_choices([request], caller, 1, idempotency_key=idempotency_key)
        return job

    async def submit_choices(
        self,
        requests: list[GenerationRequest],
        caller: Caller,
        n: int,
        *,
        idempotency_key: str | None = None,
    ) -> list[Job]:
        """`submit` for requests of `n` choices each (OpenAI's prompt list and `n`), one job per
        choice, as vLLM's child requests: choice j of a request is seeded `seed + j`, or draws a
        seed of its own; choice j of request i is choice i * n + j of the answer. All are counted
        against the caller's limits and queued together, or none is; each is served by an
        earlier job as `submit`'s request is, the Idempotency-Key naming each choice."""
        if n > self.settings.max_choices:
            raise LimitExceeded(
                f"n={n} choices; the limit is {self.settings.max_choices} (GENQ_MAX_CHOICES)"
            )
        if len(requests) > self.settings.max_batch_requests:
            raise LimitExceeded(
                f"{len(requests)} prompts; the limit is {self.settings.max_batch_requests} "
                "(GENQ_MAX_BATCH_REQUESTS)"
            )
        validated = [await self.validator.validate(request) for request in requests]
        await self.limiter.count_requests(caller, n * len(requests))
        owner = caller.principal.id
        jobs: list[Job] = []
        new: list[tuple[Job, Validated]] = []
        reserved: list[tuple[Reservation, str]] = []
        children = [child for each in validated for child in _choices(each, n)]
        try:
            for choice, child in enumerate(children):
                job = _new_job(child.route.model)
                reservation = await self.dedup.reserve(
                    child, owner, idempotency_key, job.id, choice=choice
                )
                reserved.append((reservation, job.id))
                if (served := reservation.served) is not None:
                    earlier = await self._with_position(served.job)
                    jobs.append(earlier.model_copy(update={"cached": served.cached}))
                else:
                    jobs.append(job)
                    new.append((job, child))
            if new:
                positions = await self.enqueuer.enqueue(new, caller)
            else:
                positions = []
                if idempotency_key is not None:
                    await self.enqueuer.confirm_replicated([job.id for job in jobs])
        except NotAcknowledged:
            raise  # the jobs exist: their keys must lead a retry to them
        except BaseException:
            for reservation, job_id in reserved:
                await self._unreserve(reservation, job_id, owner)
            raise
        placed = dict(zip((job.id for job, _ in new), positions, strict=True))
        jobs = [
            job.model_copy(update={"position": placed[job.id]}) if job.id in placed else job
            for job in jobs
        ]
        logs.current().job_id = jobs[0].id
        return jobs

    async def _unreserve(self, reservation: Reservation, job_id: str, owner: str) -> None:
        """Undo a reservation of choices not queued after all: free the keys naming `job_id`,
        and let go of an earlier job it came to hold."""
        await self.dedup.release(reservation, job_id)
        served = reservation.served
        if served is not None and served.held:
            with contextlib.suppress(RedisError):
                await self.store.release_holder(served.job.id, owner)

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
        if (ended := await self._let_go(job, owner)) is not None:
            return ended
        return await self.wait(job_id, self.settings.cancel_wait_s)

    async def let_go(self, job_ids: list[str], owner: str) -> None:
        """`cancel` for several jobs at once (a job listed twice is let go of twice), without
        waiting for running ones to stop: for a client that wants none of their answers."""

        async def one(job_id: str) -> None:
            await self._let_go(await self.get(job_id, owner), owner)

        await asyncio.gather(*(one(job_id) for job_id in job_ids))

    async def _let_go(self, job: Job, owner: str) -> Job | None:
        """`cancel`'s work: the job as it ends, or None where its worker was asked to stop it."""
        job_id = job.id
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
        return None

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
                (job,) = await self._wait(listener, [job_id], deadline)
                return job
            async with self.reader.listeners.hold() as held:
                (job,) = await self._wait(held, [job_id], deadline)
                return job
        except RedisError:
            if known is None:
                raise
            return known

    async def wait_all(self, job_ids: list[str], timeout_s: float, listener: Redis) -> list[Job]:
        """The jobs, in order, once all have finished or one has failed, or as they stand when
        `timeout_s` runs out or the gateway drains; waited on the one connection `listener`."""
        return await self._wait(listener, job_ids, time.monotonic() + timeout_s)

    async def _wait(self, listener: Redis, job_ids: list[str], deadline: float) -> list[Job]:
        ended: dict[str, Job] = {}
        after = dict.fromkeys(job_ids, "0")
        with contextlib.suppress(ShuttingDown):
            async with contextlib.aclosing(
                self.reader.read_jobs(listener, after, deadline)
            ) as read:
                async for job_id, event in read:
                    if event.type.terminal:
                        ended[job_id] = events.decode_job(event)
                        if ended[job_id].error is not None:
                            break  # the others' answers are of no use without this one's
        return [
            ended[job_id] if job_id in ended else await self.get(job_id, None) for job_id in job_ids
        ]

    def choice_events(
        self, jobs: list[Job], listener: Redis
    ) -> AsyncGenerator[tuple[str, Event], None]:
        """The events of jobs just submitted, from their start, as (job id, event) in the order
        they come, read on the one connection `listener`."""
        return self.reader.read_jobs(listener, dict.fromkeys((job.id for job in jobs), "0"), None)

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


def _choices(validated: Validated, n: int) -> list[Validated]:
    """A request's n choices: seeded `seed + i` (within the seed's range) as vLLM seeds its child
    requests, or unseeded each, to draw seeds of their own when queued."""
    seed = validated.request.seed
    if seed is None or n == 1:
        return [validated] * n
    return [
        replace(
            validated, request=validated.request.model_copy(update={"seed": (seed + i) % _SEEDS})
        )
        for i in range(n)
    ]


def _new_job(model: str) -> Job:
    return Job(id=uuid.uuid4().hex, status=JobStatus.queued, model=model, created_at=time.time())


def _item_error(code: str, error: ValidationError) -> ErrorDetail:
    return ErrorDetail(code=code, message=describe_validation(error))
