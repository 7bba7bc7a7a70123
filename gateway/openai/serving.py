"""OpenAI-compatible completions and chat completions, served as genq jobs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent

from common.events import EventType, decode_job
from common.jobs import Job, JobResult, Timings, TokenEvent
from common.settings import Settings
from gateway.auth import Caller
from gateway.drain import Drain
from gateway.errors import (
    ApiError,
    BadRequest,
    GatewayTimeout,
    GenerationFailed,
    ShuttingDown,
    describe_validation,
    error_body,
    map_exception,
)
from gateway.openai.protocol import OpenAIRequest
from gateway.openai.responses import Answer, Shape, finish_reason, usage
from gateway.schemas import GenerationRequest
from gateway.services.jobs import JobService

DONE = "[DONE]"


def _data(model: BaseModel) -> ServerSentEvent:
    return ServerSentEvent(data=model.model_dump_json())


def _error(code: str, message: str) -> ServerSentEvent:
    """Once a stream has started, an error is a chunk holding an OpenAI error object."""
    return ServerSentEvent(
        data=orjson.dumps(error_body(code, message, type="server_error")).decode()
    )


def _generation(body: OpenAIRequest) -> GenerationRequest:
    try:
        return GenerationRequest.model_validate(body.generation())
    except ValidationError as e:
        raise BadRequest(describe_validation(e)) from e


@dataclass(frozen=True)
class JobStream:
    job: Job
    events: AsyncIterator[ServerSentEvent]


class OpenAIServing:
    def __init__(self, jobs: JobService, drain: Drain) -> None:
        self.jobs = jobs
        self.drain = drain
        self.settings: Settings = jobs.settings
        # Cancellations of abandoned streams run detached; kept here so they are not collected.
        self._cancelling: set[asyncio.Task[Job]] = set()

    async def answer(
        self,
        body: OpenAIRequest,
        shape: Shape[Answer],
        caller: Caller,
        idempotency_key: str | None,
        listener: Redis,
    ) -> tuple[Answer, Timings]:
        """The answer, and the job's timings for `Server-Timing`."""
        job, result = await self._run(_generation(body), caller, idempotency_key, listener)
        return shape.build(job, result), job.timings

    async def stream(
        self,
        body: OpenAIRequest,
        shape: Shape[Answer],
        caller: Caller,
        idempotency_key: str | None,
        listener: Redis,
    ) -> JobStream:
        """The answer as chunks, ending with `data: [DONE]`; usage in a chunk of its own before
        that, when the client asked for it."""
        request = _generation(body)
        job = await self.jobs.submit(request, caller, idempotency_key=idempotency_key)
        owner = caller.principal.id
        events = await self.jobs.events(job.id, None, listener, owner)

        async def relay() -> AsyncIterator[ServerSentEvent]:
            finished = False
            try:
                if shape.opening is not None:
                    yield _data(shape.build_chunk(job, shape.opening))
                async for event in events:
                    if event.type is EventType.token:
                        text = TokenEvent.model_validate_json(event.data).text
                        yield _data(shape.build_chunk(job, shape.delta(text, None)))
                        continue
                    finished = True
                    final = decode_job(event)
                    if final.error is not None or final.result is None:
                        code = final.error.code if final.error else "failed"
                        message = final.error.message if final.error else "the job failed"
                        yield _error(code, message)
                    else:
                        ending = shape.delta("", finish_reason(final.result))
                        yield _data(shape.build_chunk(job, ending))
                        if body.include_usage:
                            yield _data(shape.build_chunk(job, None, usage(final.result)))
                    yield ServerSentEvent(data=DONE)
            except (RedisError, ApiError) as e:
                err = map_exception(e)
                yield _error(err.code, err.message)
            finally:
                if not finished:
                    # The client went away (or the stream broke): let go of the job, which stops
                    # once no identical request shares it, so no GPU time goes to unread text.
                    task = asyncio.create_task(self.jobs.cancel(job.id, owner))
                    self._cancelling.add(task)
                    task.add_done_callback(self._cancelling.discard)

        return JobStream(job, relay())

    async def _run(
        self,
        request: GenerationRequest,
        caller: Caller,
        idempotency_key: str | None,
        listener: Redis,
    ) -> tuple[Job, JobResult]:
        job = await self.jobs.submit(request, caller, idempotency_key=idempotency_key)
        job = await self.jobs.wait(job.id, self.settings.max_sync_timeout_s, listener=listener)
        if not job.status.finished:
            # Nobody can collect an OpenAI answer later: stop spending the GPU on it.
            await self.jobs.cancel(job.id, caller.principal.id)
            if self.drain.started:
                raise ShuttingDown(
                    "this gateway is shutting down; retry on another", retry_after_s=1
                )
            raise GatewayTimeout(
                f"the job did not finish within {self.jobs.settings.max_sync_timeout_s}s "
                "(GENQ_MAX_SYNC_TIMEOUT_S); use stream=true for long generations"
            )
        if job.error is not None:
            raise GenerationFailed(job.error.code, job.error.message)
        assert job.result is not None
        return job, job.result
