"""Runs jobs through the engine: record transitions, and every step's text to Redis at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from arq.connections import ArqRedis
from arq.worker import Retry
from redis.exceptions import RedisError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_random_exponential,
)

from common import logs
from common.catalog import CatalogSource, ModelSpec
from common.contract import ErrorCode, InvalidWorkItem, WorkItem, decode_item
from common.jobs import Job, JobError, JobResult, JobStatus, Timings, TokenEvent, Usage
from common.jobstore import Fenced, JobStore
from common.settings import Settings
from common.webhooks import enqueue_delivery
from worker import metrics, spans
from worker.engine import (
    Engine,
    EngineRequest,
    Generation,
    GenerationError,
    Resume,
    RowOutput,
    SamplingParams,
)
from worker.model_manager import HeldModel, ModelManager

logger = logging.getLogger(__name__)

# How long a job's reads and writes are retried while Redis is unreachable.
_PERSIST_RETRY_S = 60
# After that, when arq offers the job again (it goes back to the queue).
_RETRY_DEFER_S = 1
# The engine ends a generation at GENQ_JOB_TIMEOUT_S itself; the job's own timeout is later.
_ENGINE_GRACE_S = 5
# How long a stopping worker tries to hand a job back before leaving it to the reaper.
_HAND_BACK_S = 2


def sampling_params(item: WorkItem) -> SamplingParams:
    r = item.request
    return SamplingParams(
        max_new_tokens=item.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        seed=item.seed,
        stop=tuple(r.stop),
        ignore_eos=r.ignore_eos,
        min_tokens=r.min_tokens,
        presence_penalty=r.presence_penalty,
        frequency_penalty=r.frequency_penalty,
        repetition_penalty=r.repetition_penalty,
        min_p=r.min_p,
        logit_bias=tuple(sorted(r.logit_bias.items())),
        stop_token_ids=tuple(r.stop_token_ids),
        bad_words=tuple(r.bad_words),
        logprobs=r.logprobs,
        prompt_logprobs=r.prompt_logprobs,
        grammar=r.grammar,
    )


class LostAttempt(Exception):
    """Another attempt of the job owns it now (this worker's lease lapsed): stop, write nothing."""


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[Generation]
    job_id: str
    attempt: int
    engine: Engine
    next_index: int  # of the job's next token event


@dataclass
class JobRunner:
    """Runs a job's attempt: start it (fenced), load its model, generate through the engine,
    write its result (fenced), whatever fails on the way.

    Every accepted job ends: a job that fails for a reason of its own (its input, its model, its
    deadline) is recorded failed; one this worker cannot finish (it is stopping, or Redis stays
    away) goes back to the queue for another attempt. Writes to Redis are retried while it is
    away, so an outage shorter than `_PERSIST_RETRY_S` costs no job anything but time.
    """

    store: JobStore
    settings: Settings
    arq: ArqRedis  # to queue webhook deliveries
    source: CatalogSource
    on_models_changed: Callable[[], None]
    worker_id: str
    draining: Callable[[], bool]  # the worker is shutting down
    _pending: dict[str, _Pending] = field(default_factory=dict)  # by engine request id
    _attempts: dict[str, int] = field(default_factory=dict)  # the attempt of each started job
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

    def attempt_of(self, job_id: str) -> int | None:
        """The attempt this worker runs, once it has started the job."""
        return self._attempts.get(job_id)

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

    async def run(self, job_id: str, payload: object, attempt: int) -> str:
        """The job function's body: returns how the job ended here, for arq's log."""
        logs.current().job_id = job_id
        job = await _persist(self.store.load, job_id)
        if job is None:
            return "expired"
        if job.status.finished:
            return job.status.value
        try:
            item = decode_item(payload)
        except InvalidWorkItem as e:
            return await self._finish(job, error=JobError(code=e.code, message=str(e)))
        logs.current().request_id = item.request_id
        with spans.job_span(job, item, attempt, self.settings.pool):
            return await self._run_item(job, item, attempt)

    async def _run_item(self, job: Job, item: WorkItem, attempt: int) -> str:
        if attempt > self.settings.max_tries:
            error = JobError(
                code=ErrorCode.worker_lost,
                message=f"the job was interrupted {attempt - 1} times (GENQ_MAX_TRIES)",
            )
            return await self._finish(job, error=error)
        try:
            spec = self.models.spec_for(item.model, item.request.model)
        except GenerationError as e:
            return await self._finish(job, error=JobError(code=e.code, message=str(e)))
        started = await _persist(
            self.store.start_attempt,
            job.id,
            attempt=attempt,
            worker=self.worker_id,
            model=spec.key,
            pool=self.settings.pool,
        )
        if started is not Fenced.ok:
            logger.info("job %s not started: %s", job.id, started.value)
            return started.value
        started_at = time.time()
        job = job.model_copy(
            update={
                "status": JobStatus.running,
                "model": spec.key,
                "attempt": attempt,
                "started_at": started_at,
            }
        )
        self._take_over(job.id, attempt)
        metrics.observe_start(spec.key, started_at - job.created_at)
        try:
            return await self._run_attempt(job, item, spec)
        finally:
            if self._attempts.get(job.id) == attempt:
                del self._attempts[job.id]

    def _take_over(self, job_id: str, attempt: int) -> None:
        """Make `attempt` the attempt of the job this worker runs. arq can start a job again on
        a worker that still runs an earlier attempt of it (its lease lapsed during a Redis
        stall, and the reaper queued it again): the later start fenced the earlier attempt,
        which stops here and writes nothing more. The two never share a key: the engine's
        request ids and `_pending` are per attempt."""
        earlier = self._attempts.get(job_id)
        if earlier is None:
            self._attempts[job_id] = attempt
            return
        logger.warning("job %s: attempt %d started beside attempt %d", job_id, attempt, earlier)
        self._attempts[job_id] = max(earlier, attempt)
        self._lose(job_id, min(earlier, attempt))

    async def _run_attempt(self, job: Job, item: WorkItem, spec: ModelSpec) -> str:
        deadline = time.monotonic() + self.settings.job_timeout_s
        load_s = 0.0
        try:
            # The engine ends a generation at the deadline itself; this bounds the model load.
            async with asyncio.timeout(self.settings.job_timeout_s + _ENGINE_GRACE_S):
                held, load_s = await self.models.acquire(spec, deadline)
                spans.model_loaded(spec.key, load_s)
                try:
                    outcome = await self._run_on_engine(job, item, held, deadline)
                finally:
                    self.models.release(held)
            spans.generated(job, outcome)
            if self.settings.log_payloads:
                logger.info("job %s: prompt %r, output %r", job.id, _prompt(item), outcome.text)
        except LostAttempt:
            logger.warning("job %s: attempt %d lost its lease to another", job.id, job.attempt)
            return "superseded"
        except GenerationError as e:
            return await self._finish(
                job, error=JobError(code=e.code, message=str(e)), load_s=load_s
            )
        except TimeoutError:
            error = JobError(
                code=ErrorCode.job_timeout,
                message=f"the job ran past GENQ_JOB_TIMEOUT_S ({self.settings.job_timeout_s} s)",
            )
            return await self._finish(job, error=error, load_s=load_s)
        except asyncio.CancelledError:
            await self._on_cancelled(job)
            raise
        except Exception as e:
            logger.exception("job %s failed on an internal error", job.id)
            error = JobError(code=ErrorCode.generation_failed, message=f"internal error: {e}")
            return await self._finish(job, error=error, load_s=load_s)
        return await self._finish(
            job, outcome=outcome, load_s=load_s, return_token_ids=item.request.return_token_ids
        )

    async def _on_cancelled(self, job: Job) -> None:
        """arq cancelled the job function: the worker is stopping (the job goes back to the
        queue), or arq's backstop timeout fired (the job fails)."""
        if self.draining():
            try:
                async with asyncio.timeout(_HAND_BACK_S):
                    await self.store.hand_back(job.id, attempt=job.attempt, pool=self.settings.pool)
                logger.info("job %s handed back to the queue", job.id)
            except (RedisError, OSError, TimeoutError) as e:
                logger.warning("job %s left to the reaper, Redis is away: %r", job.id, e)
            return
        error = JobError(code=ErrorCode.job_timeout, message="the job ran past its deadline")
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(_HAND_BACK_S):
                await self._write(self._final(job, error=error))

    async def _run_on_engine(
        self, job: Job, item: WorkItem, held: HeldModel, deadline: float
    ) -> Generation:
        """Hand the job's request to its model's engine and wait for what it generates; a wait
        that ends otherwise frees the engine's row."""
        assert self._loop is not None, "start() first"
        assert held.engine is not None
        engine = held.engine
        # Only a re-run can find tokens of an earlier attempt: spare first runs the round trip.
        published = await self._published(job.id) if job.attempt > 1 else []
        if self.attempt_of(job.id) != job.attempt:
            raise LostAttempt(job.id)  # a later attempt started on this worker meanwhile
        request_id = _request_id(job.id, job.attempt)
        pending = _Pending(self._loop.create_future(), job.id, job.attempt, engine, len(published))
        self._pending[request_id] = pending
        metrics.JOBS_HELD.labels(self.settings.pool).inc()
        params = sampling_params(item)
        request = EngineRequest(
            request_id,
            item.request,
            params,
            deadline,
            cache_scope=item.cache_scope or "",
            echo=item.request.echo,
            resume=_resume(published) if published else None,
        )
        engine.submit(request)
        try:
            if await _persist(self.store.cancel_requested, job.id):
                engine.cancel(request_id)  # asked for while the job was being picked up
            return await pending.future
        except BaseException:
            # Cancelled, timed out or lost: free the row at the next step.
            engine.cancel(request_id)
            raise
        finally:
            del self._pending[request_id]
            metrics.JOBS_HELD.labels(self.settings.pool).dec()

    async def _published(self, job_id: str) -> list[TokenEvent]:
        """What earlier attempts of the job streamed, for this one to go on from."""
        published = await _persist(self.store.published, job_id)
        if published is None:
            raise GenerationError(
                "the job was interrupted, and its event stream no longer holds all the text it "
                "sent (GENQ_EVENTS_MAXLEN): it cannot be continued"
            )
        return published

    def cancel(self, job_id: str) -> None:
        """Stop a job this worker is running (a no-op for any other job)."""
        if (attempt := self.attempt_of(job_id)) is None:
            return
        request_id = _request_id(job_id, attempt)
        if (pending := self._pending.get(request_id)) is not None:
            pending.engine.cancel(request_id)

    def lose(self, job_id: str) -> None:
        """Another attempt owns the job: stop generating it and write nothing more."""
        if (attempt := self.attempt_of(job_id)) is not None:
            self._lose(job_id, attempt)

    def _lose(self, job_id: str, attempt: int) -> None:
        request_id = _request_id(job_id, attempt)
        if (pending := self._pending.get(request_id)) is not None:
            pending.engine.cancel(request_id)
            self._settle(request_id, LostAttempt(job_id))

    async def sweep_cancel_flags(self) -> None:
        """Cancel running jobs whose records carry a cancel flag: the safety net for requests
        whose pub/sub message was missed."""
        running = [pending.job_id for pending in self._pending.values()]
        if running:
            for job_id, flagged in zip(
                running, await self.store.cancel_flags(running), strict=True
            ):
                if flagged:
                    self.cancel(job_id)

    def _on_step(self, outputs: list[RowOutput]) -> None:
        """Called on the engine's text thread; hands the step to the event loop."""
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
        """Write the steps' tokens in one round trip, then settle the jobs that ended in them:
        a job's `done` event must follow its last token. While Redis is away the steps wait
        (the engine goes on) and go out together once it is back."""
        tokens: dict[str, list[TokenEvent]] = {}
        attempts: dict[str, int] = {}
        for out in outputs:
            pending = self._pending.get(out.request_id)
            if pending is None or not (out.text or out.logprobs):
                continue
            if self.attempt_of(pending.job_id) != pending.attempt:
                continue  # a later attempt of the job started here: its fence refuses these
            index = pending.next_index
            pending.next_index += 1
            event = TokenEvent(
                index=index,
                text=out.text,
                tokens=out.tokens,
                prompt_tokens=out.prompt_tokens if index == 0 else None,
                logprobs=out.logprobs or None,
                ids=out.ids or None,
            )
            tokens.setdefault(pending.job_id, []).append(event)
            attempts[pending.job_id] = pending.attempt
        if tokens:
            async for attempt in _while_redis_is_away():
                with attempt:
                    lost = await self.store.append_step(tokens, attempts)
            for job_id in lost:
                self.lose(job_id)
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
        return_token_ids: bool = False,
    ) -> str:
        """Write the job's end, retrying while Redis is away. If it still cannot be written, the
        job goes back to the queue (arq's Retry) and a later attempt finishes it."""
        final = self._final(
            job, outcome=outcome, error=error, load_s=load_s, return_token_ids=return_token_ids
        )
        try:
            written = await _persist(self._write, final)
        except (RedisError, OSError) as e:
            logger.error("cannot record the end of job %s; it will run again: %s", job.id, e)
            raise Retry(defer=_RETRY_DEFER_S) from e
        spans.ended(final)
        if written is Fenced.ok:
            metrics.observe_finish(final, outcome)
        return final.status.value if written is Fenced.ok else written.value

    async def _write(self, final: Job) -> Fenced:
        written = await self.store.finish(final, pool=self.settings.pool)
        if written is Fenced.ok and (webhook := await self.store.webhook(final.id)):
            await enqueue_delivery(self.arq, self.settings.pool, final.id, webhook)
        return written

    def _final(
        self,
        job: Job,
        *,
        outcome: Generation | None = None,
        error: JobError | None = None,
        load_s: float = 0.0,
        return_token_ids: bool = False,
    ) -> Job:
        now = time.time()
        timings = Timings(total_s=now - job.created_at, model_load_s=load_s or None)
        result = None
        if job.started_at is not None:
            timings.queued_s = job.started_at - job.created_at
        if outcome is not None:
            timings.time_to_first_token_s = outcome.time_to_first_token_s
            timings.prefill_s = outcome.prefill_s
            timings.decode_s = outcome.decode_s
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
                logprobs=outcome.logprobs,
                prompt_logprobs=outcome.prompt_logprobs,
                prompt_text=outcome.prompt_text,
                prompt_token_ids=outcome.prompt_ids if return_token_ids else None,
                token_ids=outcome.token_ids if return_token_ids else None,
            )
        status = JobStatus.failed if error else JobStatus.succeeded
        if outcome is not None and outcome.finish_reason == "cancelled":
            status = JobStatus.cancelled
        return job.model_copy(
            update={
                "status": status,
                "finished_at": now,
                "result": result,
                "error": error,
                "timings": timings,
            }
        )


def _request_id(job_id: str, attempt: int) -> str:
    """The engine's id of an attempt's request: an attempt's row is never taken for another's."""
    return f"{job_id}/{attempt}"


def _resume(published: list[TokenEvent]) -> Resume:
    """Where a re-run goes on from: the tokens, text and log-probabilities already streamed."""
    return Resume(
        token_ids=[token for event in published for token in event.ids or ()],
        text="".join(event.text for event in published),
        logprobs=[entry for event in published for entry in event.logprobs or ()],
    )


def _prompt(item: WorkItem) -> object:
    r = item.request
    return r.prompt if r.messages is None else [m.model_dump() for m in r.messages]


P = ParamSpec("P")
T = TypeVar("T")


async def _persist(fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
    """`fn`, retried for up to `_PERSIST_RETRY_S` while Redis is unreachable."""
    async for attempt in _while_redis_is_away(give_up_after_s=_PERSIST_RETRY_S):
        with attempt:
            return await fn(*args, **kwargs)
    raise AssertionError("unreachable: tenacity re-raises the last error")


def _while_redis_is_away(give_up_after_s: float | None = None) -> AsyncRetrying:
    """Retries while Redis is unreachable, with jittered backoff; past `give_up_after_s` (never,
    unset) the last error is raised."""
    return AsyncRetrying(
        retry=retry_if_exception_type((RedisError, OSError)),
        wait=wait_random_exponential(multiplier=0.1, max=2),
        stop=stop_never if give_up_after_s is None else stop_after_delay(give_up_after_s),
        before_sleep=_log_retry,
        reraise=True,
    )


def _log_retry(state: RetryCallState) -> None:
    if state.attempt_number == 1 and state.outcome is not None:
        logger.warning("Redis unreachable, retrying: %s", state.outcome.exception())
