"""Runs jobs through the engine: record transitions, and every step's text to Redis at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from arq.connections import ArqRedis
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from common.catalog import CatalogSource
from common.jobstore import JobStore
from common.schemas import (
    GenerationRequest,
    Job,
    JobError,
    JobResult,
    JobStatus,
    Timings,
    TokenEvent,
    Usage,
)
from common.settings import Settings
from common.webhooks import enqueue_delivery
from worker import metrics
from worker.batch import RowOutput
from worker.engine import Engine, EngineRequest
from worker.generation import Generation, GenerationError
from worker.models import Held, ModelManager
from worker.sampling import SamplingParams

logger = logging.getLogger(__name__)

# How long a step's tokens are retried against an unreachable Redis before its jobs give up.
_PUBLISH_RETRY_S = 30


@dataclass(frozen=True, slots=True)
class JobPayload:
    """What the gateway enqueues: the validated request and the seed it drew for it.

    The seed is drawn once at submission so that a job re-run after its worker died generates
    the same tokens, and the tokens already streamed are not sent twice.
    """

    job_id: str
    request: GenerationRequest
    seed: int
    max_new_tokens: int
    model: str  # name@version the gateway routed the job to

    def sampling(self) -> SamplingParams:
        r = self.request
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            seed=self.seed,
            stop=tuple(r.stop),
        )


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[Generation]
    skip: int  # token events an earlier attempt already published
    engine: Engine
    next_index: int = 0


@dataclass
class JobRunner:
    store: JobStore
    settings: Settings
    arq: ArqRedis  # to queue webhook deliveries
    source: CatalogSource
    on_models_changed: Callable[[], None]
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _steps: asyncio.Queue[list[RowOutput]] = field(default_factory=asyncio.Queue)
    _loop: asyncio.AbstractEventLoop | None = None
    _publisher: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.models = ModelManager(
            self.settings, self.source, self._on_step, self.on_models_changed
        )

    @property
    def running(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.models.start()
        self._publisher = asyncio.create_task(self._publish_forever())

    async def stop(self) -> None:
        await self.models.stop()
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher

    async def run(self, payload: JobPayload, attempt: int) -> Job:
        job = await self.store.load(payload.job_id)
        if job is None:
            raise LookupError(f"job {payload.job_id} has no record (expired?)")
        if job.status.finished:
            return job
        if attempt > self.settings.max_tries:
            error = JobError(
                code="worker_lost",
                message=f"the job was interrupted {attempt - 1} times (GENQ_MAX_TRIES)",
            )
            return await self._finish(job, error=error)
        deadline = time.monotonic() + self.settings.job_timeout_s
        try:
            spec = self.models.spec_for(payload.model, payload.request.model)
        except GenerationError as e:
            return await self._finish(job, error=JobError(code=e.code, message=str(e)))
        await self.store.mark_running(
            job.id, model=spec.key, attempt=attempt, pool=self.settings.pool
        )
        job = job.model_copy(
            update={
                "status": JobStatus.running,
                "model": spec.key,
                "attempt": attempt,
                "started_at": time.time(),
            }
        )
        try:
            held, load_s = await self.models.acquire(spec, deadline)
        except GenerationError as e:
            return await self._finish(job, error=JobError(code=e.code, message=str(e)))
        try:
            return await self._generate(job, payload, held, load_s, attempt, deadline)
        finally:
            self.models.release(held)

    async def _generate(
        self,
        job: Job,
        payload: JobPayload,
        held: Held,
        load_s: float,
        attempt: int,
        deadline: float,
    ) -> Job:
        assert self._loop is not None, "start() first"
        assert held.engine is not None
        engine = held.engine
        # Only a re-run can find tokens of an earlier attempt: spare first runs the round trip.
        skip = await self.store.published_tokens(job.id) if attempt > 1 else 0
        pending = _Pending(self._loop.create_future(), skip, engine)
        self._pending[job.id] = pending
        metrics.RUNNING_JOBS.inc()
        engine.submit(EngineRequest(job.id, payload.request, payload.sampling(), deadline))
        if await self.store.cancel_requested(job.id):
            engine.cancel(job.id)  # asked for while the job was being picked up
        try:
            outcome = await pending.future
        except GenerationError as e:
            error = JobError(code=e.code, message=str(e))
            return await self._finish(job, error=error, load_s=load_s)
        except asyncio.CancelledError:
            # Shutdown or abort: free the row at the next step; arq re-queues the job.
            engine.cancel(job.id)
            raise
        finally:
            del self._pending[job.id]
            metrics.RUNNING_JOBS.dec()
        return await self._finish(job, outcome=outcome, load_s=load_s)

    def cancel(self, job_id: str) -> None:
        """Stop a job this worker is running (a no-op for any other job)."""
        if (pending := self._pending.get(job_id)) is not None:
            pending.engine.cancel(job_id)

    async def sweep_cancel_flags(self) -> None:
        """Cancel running jobs whose records carry a cancel flag: the safety net for requests
        whose pub/sub message was missed."""
        running = list(self._pending)
        if running:
            for job_id, flagged in zip(
                running, await self.store.cancel_flags(running), strict=True
            ):
                if flagged:
                    self.cancel(job_id)

    def _on_step(self, outputs: list[RowOutput]) -> None:
        """Called on the engine thread; hands the step to the event loop."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._steps.put_nowait, outputs)

    async def _publish_forever(self) -> None:
        while True:
            outputs = await self._steps.get()
            # Steps that piled up while Redis was slow go out together.
            while not self._steps.empty():
                outputs += self._steps.get_nowait()
            await self._publish(outputs)

    async def _publish(self, outputs: list[RowOutput]) -> None:
        """Write the steps' tokens in one pipeline, then settle the jobs that ended in them:
        a job's `done` event must follow its last token."""
        tokens: dict[str, list[TokenEvent]] = {}
        for out in outputs:
            pending = self._pending.get(out.request_id)
            if pending is None or not out.text:
                continue
            index = pending.next_index
            pending.next_index += 1
            if index >= pending.skip:
                tokens.setdefault(out.request_id, []).append(TokenEvent(index=index, text=out.text))
        try:
            if tokens:
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(RedisError),
                    wait=wait_exponential(multiplier=0.1, max=2),
                    stop=stop_after_delay(_PUBLISH_RETRY_S),
                    reraise=True,
                ):
                    with attempt:
                        await self.store.append_step(tokens)
        except RedisError as e:
            logger.error("cannot publish tokens of %d jobs: %s", len(tokens), e)
            for request_id in {out.request_id for out in outputs}:
                self.cancel(request_id)
                self._settle(request_id, e)
            return
        for out in outputs:
            if out.error is not None:
                self._settle(out.request_id, out.error)
            elif out.finished is not None:
                self._settle(out.request_id, out.finished)

    def _settle(self, request_id: str, outcome: Generation | Exception) -> None:
        pending = self._pending.get(request_id)
        if pending is None or pending.future.done():
            return
        if isinstance(outcome, Exception):
            pending.future.set_exception(outcome)
        else:
            pending.future.set_result(outcome)

    async def _finish(
        self,
        job: Job,
        *,
        outcome: Generation | None = None,
        error: JobError | None = None,
        load_s: float = 0.0,
    ) -> Job:
        now = time.time()
        timings = Timings(total_s=now - job.created_at, model_load_s=load_s or None)
        result = None
        if job.started_at is not None:
            timings.queued_s = job.started_at - job.created_at
        if outcome is not None:
            timings.time_to_first_token_s = outcome.time_to_first_token_s
            timings.generation_s = outcome.generation_s
            if outcome.generation_s > 0:
                timings.tokens_per_s = outcome.completion_tokens / outcome.generation_s
            result = JobResult(
                text=outcome.text,
                finish_reason=outcome.finish_reason,
                usage=Usage(
                    prompt_tokens=outcome.prompt_tokens,
                    completion_tokens=outcome.completion_tokens,
                    cached_prompt_tokens=outcome.cached_prompt_tokens,
                ),
            )
            metrics.observe_generation(job.model, outcome)
        status = JobStatus.failed if error else JobStatus.succeeded
        if outcome is not None and outcome.finish_reason == "cancelled":
            status = JobStatus.cancelled
        final = job.model_copy(
            update={
                "status": status,
                "finished_at": now,
                "result": result,
                "error": error,
                "timings": timings,
            }
        )
        await self.store.finish(final)
        metrics.JOBS_FINISHED.labels(job.model, status.value).inc()
        if webhook := await self.store.webhook(final.id):
            await enqueue_delivery(self.arq, self.settings.pool, final.id, webhook)
        return final
