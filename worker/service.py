"""Runs one job: record transitions, generation on the model thread, events to Redis."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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
from worker import metrics
from worker.generation import Generation, GenerationError, build_prompt_ids, generate
from worker.loading import LoadedModel
from worker.sampling import SamplingParams

logger = logging.getLogger(__name__)

_DONE = object()


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


class JobRunner:
    def __init__(self, lm: LoadedModel, store: JobStore, settings: Settings) -> None:
        self.lm = lm
        self.store = store
        self.settings = settings
        # torch runs on this one thread: the event loop never blocks on it, and jobs on one
        # model never race each other for it.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genq-model")
        self.running = 0

    def close(self) -> None:
        self.model_thread.shutdown(wait=False, cancel_futures=True)

    async def run(self, payload: JobPayload, attempt: int) -> Job:
        job = await self.store.load(payload.job_id)
        if job is None:
            logger.warning("job %s has no record (expired?); skipping it", payload.job_id)
            raise LookupError(payload.job_id)
        if job.status.finished:
            return job
        if attempt > self.settings.max_tries:
            error = JobError(
                code="worker_lost",
                message=f"the job was interrupted {attempt - 1} times (GENQ_MAX_TRIES)",
            )
            return await self._finish(job, error=error)
        await self.store.mark_running(job.id, model=self.lm.name, attempt=attempt)
        job = job.model_copy(
            update={
                "status": JobStatus.running,
                "model": self.lm.name,
                "attempt": attempt,
                "started_at": time.time(),
            }
        )
        self.running += 1
        metrics.RUNNING_JOBS.inc()
        try:
            outcome = await self._generate(payload, skip=await self.store.published_tokens(job.id))
        except GenerationError as e:
            return await self._finish(job, error=JobError(code=e.code, message=str(e)))
        finally:
            self.running -= 1
            metrics.RUNNING_JOBS.dec()
        return await self._finish(job, outcome=outcome)

    async def _generate(self, payload: JobPayload, skip: int) -> Generation:
        """Run generation on the model thread and publish its text as it comes.

        `skip` token events were published by an earlier attempt; the same seed makes this
        attempt produce them again, so they are not repeated.
        """
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[object] = asyncio.Queue()
        cancelled = threading.Event()
        deadline = time.monotonic() + self.settings.job_timeout_s

        def publish(text: str) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        def work() -> Generation:
            try:
                lm = self.lm
                prompt_ids = build_prompt_ids(lm, payload.request)
                return generate(
                    lm,
                    prompt_ids,
                    payload.sampling(),
                    publish,
                    cancelled,
                    deadline,
                )
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, _DONE)

        future = loop.run_in_executor(self.model_thread, work)
        index = 0
        try:
            finished = False
            while not finished:
                batch = [await pieces.get()]
                while not pieces.empty():
                    batch.append(pieces.get_nowait())
                tokens: list[TokenEvent] = []
                for item in batch:
                    if item is _DONE:
                        finished = True
                    else:
                        if index >= skip:
                            tokens.append(TokenEvent(index=index, text=str(item)))
                        index += 1
                if tokens:
                    await self.store.append_tokens(payload.job_id, tokens)
            return await future
        except asyncio.CancelledError:
            # Shutdown or abort: stop the model thread at its next step; arq re-queues the job.
            cancelled.set()
            raise

    async def _finish(
        self, job: Job, *, outcome: Generation | None = None, error: JobError | None = None
    ) -> Job:
        now = time.time()
        timings = Timings(total_s=now - job.created_at)
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
                ),
            )
            metrics.observe_generation(self.lm.name, outcome)
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
        metrics.JOBS_FINISHED.labels(self.lm.name, status.value).inc()
        return final
