"""OpenAI-compatible completions and chat completions, served as genq jobs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
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
from gateway.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionRequest,
    FinishReason,
    OpenAIUsage,
    PromptTokensDetails,
    SamplingFields,
)
from gateway.schemas import GenerationRequest
from gateway.services.jobs import JobService

logger = logging.getLogger(__name__)

DONE = "[DONE]"

# Builds a stream chunk: new text, or the finish reason, or (alone) the usage.
Chunker = Callable[[str, FinishReason | None, OpenAIUsage | None], BaseModel]


def _usage(result: JobResult) -> OpenAIUsage:
    u = result.usage
    return OpenAIUsage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_prompt_tokens),
    )


def _finish_reason(result: JobResult) -> FinishReason:
    return "length" if result.finish_reason == "length" else "stop"


def _data(model: BaseModel) -> ServerSentEvent:
    return ServerSentEvent(data=model.model_dump_json())


def _error(code: str, message: str) -> ServerSentEvent:
    """Once a stream has started, an error is a chunk holding an OpenAI error object."""
    return ServerSentEvent(
        data=orjson.dumps(error_body(code, message, type="server_error")).decode()
    )


def _generation(**fields: object) -> GenerationRequest:
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as e:
        raise BadRequest(describe_validation(e)) from e


@dataclass(frozen=True)
class JobStream:
    job: Job
    events: AsyncIterator[ServerSentEvent]


class OpenAIService:
    def __init__(self, jobs: JobService, drain: Drain) -> None:
        self.jobs = jobs
        self.drain = drain
        self.settings: Settings = jobs.settings
        # Cancellations of abandoned streams run detached; kept here so they are not collected.
        self._cancelling: set[asyncio.Task[Job]] = set()

    async def completion(
        self,
        body: CompletionRequest,
        caller: Caller,
        idempotency_key: str | None,
        listener: Redis,
    ) -> tuple[Completion, Timings]:
        """The answer, and the job's timings for `Server-Timing`."""
        request = self._completion_request(body)
        job = await self._run(request, caller, idempotency_key, listener)
        assert job.result is not None
        completion = Completion(
            id=f"cmpl-{job.id}",
            created=int(job.created_at),
            model=job.model,
            choices=[
                CompletionChoice(text=job.result.text, finish_reason=_finish_reason(job.result))
            ],
            usage=_usage(job.result),
        )
        return completion, job.timings

    async def chat(
        self,
        body: ChatCompletionRequest,
        caller: Caller,
        idempotency_key: str | None,
        listener: Redis,
    ) -> tuple[ChatCompletion, Timings]:
        """The answer, and the job's timings for `Server-Timing`."""
        job = await self._run(self._chat_request(body), caller, idempotency_key, listener)
        assert job.result is not None
        chat = ChatCompletion(
            id=f"chatcmpl-{job.id}",
            created=int(job.created_at),
            model=job.model,
            choices=[
                ChatChoice(
                    message=ChatMessageOut(content=job.result.text),
                    finish_reason=_finish_reason(job.result),
                )
            ],
            usage=_usage(job.result),
        )
        return chat, job.timings

    async def completion_stream(
        self,
        body: CompletionRequest,
        caller: Caller,
        idempotency_key: str | None,
        listener: Redis,
    ) -> JobStream:
        request = self._completion_request(body)
        job = await self.jobs.submit(request, caller, idempotency_key=idempotency_key)

        def chunk(text: str, finish: FinishReason | None, usage: OpenAIUsage | None) -> BaseModel:
            return Completion(
                id=f"cmpl-{job.id}",
                created=int(job.created_at),
                model=job.model,
                choices=[] if usage else [CompletionChoice(text=text, finish_reason=finish)],
                usage=usage,
            )

        return await self._stream(job, caller, body, chunk, first=None, listener=listener)

    async def chat_stream(
        self,
        body: ChatCompletionRequest,
        caller: Caller,
        idempotency_key: str | None,
        listener: Redis,
    ) -> JobStream:
        request = self._chat_request(body)
        job = await self.jobs.submit(request, caller, idempotency_key=idempotency_key)

        def chunk(text: str, finish: FinishReason | None, usage: OpenAIUsage | None) -> BaseModel:
            choices = [
                ChatChunkChoice(
                    delta=ChatDelta(content=text) if text else ChatDelta(),
                    finish_reason=finish,
                )
            ]
            return ChatCompletionChunk(
                id=f"chatcmpl-{job.id}",
                created=int(job.created_at),
                model=job.model,
                choices=[] if usage else choices,
                usage=usage,
            )

        first = ChatCompletionChunk(
            id=f"chatcmpl-{job.id}",
            created=int(job.created_at),
            model=job.model,
            choices=[ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))],
        )
        return await self._stream(job, caller, body, chunk, first=first, listener=listener)

    async def _run(
        self,
        request: GenerationRequest,
        caller: Caller,
        idempotency_key: str | None,
        listener: Redis,
    ) -> Job:
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
        return job

    async def _stream(
        self,
        job: Job,
        caller: Caller,
        body: SamplingFields,
        chunk: Chunker,
        first: BaseModel | None,
        listener: Redis,
    ) -> JobStream:
        owner = caller.principal.id
        events = await self.jobs.events(job.id, None, listener, owner)

        async def relay() -> AsyncIterator[ServerSentEvent]:
            finished = False
            try:
                if first is not None:
                    yield _data(first)
                async for event in events:
                    if event.type is EventType.token:
                        text = TokenEvent.model_validate_json(event.data).text
                        yield _data(chunk(text, None, None))
                        continue
                    finished = True
                    final = decode_job(event)
                    if final.error is not None or final.result is None:
                        code = final.error.code if final.error else "failed"
                        message = final.error.message if final.error else "the job failed"
                        yield _error(code, message)
                    else:
                        yield _data(chunk("", _finish_reason(final.result), None))
                        if body.include_usage:
                            yield _data(chunk("", None, _usage(final.result)))
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

    def _completion_request(self, body: CompletionRequest) -> GenerationRequest:
        return _generation(
            prompt=body.prompt_text(),
            model=body.model,
            max_new_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_list(),
            seed=body.seed,
            **body.vllm_fields(),
        )

    def _chat_request(self, body: ChatCompletionRequest) -> GenerationRequest:
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        return _generation(
            messages=messages,
            model=body.model,
            max_new_tokens=body.new_tokens(),
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_list(),
            seed=body.seed,
            **body.vllm_fields(),
        )
