"""OpenAI-compatible completions and chat completions, served as genq jobs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
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
    InvalidStructuredOutput,
    LimitExceeded,
    ShuttingDown,
    describe_validation,
    error_body,
    map_exception,
)
from gateway.openai.protocol import ChatCompletionRequest, OpenAIRequest, OpenAIUsage
from gateway.openai.responses import Answer, Piece, Shape, counted, finish_reason, usage
from gateway.openai.tools import ToolReader, ToolStream
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


def native_requests(
    fields: list[dict[str, object]], kind: type[GenerationRequest] = GenerationRequest
) -> list[GenerationRequest]:
    """The native requests of an OpenAI body's fields; one the native limits refuse is a 422."""
    try:
        return [kind.model_validate(each) for each in fields]
    except ValidationError as e:
        raise BadRequest(describe_validation(e)) from e


@contextmanager
def _naming_tools(body: OpenAIRequest) -> Iterator[None]:
    """A forced tool choice is the structured output of its tools' parameters: a refusal of it
    names them."""
    forced = isinstance(body, ChatCompletionRequest) and body.tool_mode in ("required", "named")
    try:
        yield
    except (InvalidStructuredOutput, LimitExceeded) as e:
        if not forced or not e.message.startswith("structured_outputs"):
            raise
        raise type(e)(
            "tools: the calls that tool_choice forces follow the tools' `parameters` schemas, "
            f"and {e.message}"
        ) from e


@dataclass(frozen=True)
class JobStream:
    jobs: list[Job]  # choice i's job at index i
    events: AsyncIterator[ServerSentEvent]


class OpenAIServing:
    def __init__(self, jobs: JobService, drain: Drain) -> None:
        self.jobs = jobs
        self.drain = drain
        self.settings: Settings = jobs.settings
        # Cancellations of abandoned streams run detached; kept here so they are not collected.
        self._cancelling: set[asyncio.Task[None]] = set()

    async def answer(
        self,
        body: OpenAIRequest,
        shape: Shape[Answer],
        caller: Caller,
        idempotency_key: str | None,
        listener: Redis,
    ) -> tuple[Answer, Timings]:
        """The answer, and the timings of choice 0's job for `Server-Timing`."""
        requests = native_requests(body.generations())
        with _naming_tools(body):
            jobs, results = await self.run(requests, body.n, caller, idempotency_key, listener)
        readers = await self._tool_readers(body, jobs)
        return shape.build(jobs[0], body, results, readers), jobs[0].timings

    async def _tool_readers(self, body: OpenAIRequest, jobs: list[Job]) -> list[ToolReader | None]:
        """How each choice's answer becomes tool calls, in the tool-call format of the model
        version its job ran on; none where the request reads no calls."""
        if not isinstance(body, ChatCompletionRequest) or body.tool_mode is None:
            return []
        if body.tool_mode != "auto":
            return [body.tool_reader(None)] * len(jobs)
        specs = (await self.jobs.router.catalog()).specs
        return [
            body.tool_reader(spec.tool_call_parser if (spec := specs.get(job.model)) else None)
            for job in jobs
        ]

    async def stream(
        self,
        body: OpenAIRequest,
        shape: Shape[Answer],
        caller: Caller,
        idempotency_key: str | None,
        listener: Redis,
    ) -> JobStream:
        """The answer as chunks, each of one choice (its `index`) as its job goes on, then
        `data: [DONE]` once every choice has ended; usage in a chunk of its own before that, when
        the client asked for it, and in every chunk, the choice's so far, with
        `continuous_usage_stats`. A failed choice ends the stream with an error chunk."""
        with _naming_tools(body):
            jobs = await self.jobs.submit_choices(
                native_requests(body.generations()), caller, body.n, idempotency_key=idempotency_key
            )
        # Choices whose tool calls are read hold back what may be one until their job ends.
        readers = await self._tool_readers(body, jobs)
        streams: dict[int, ToolStream] = {
            index: reader.stream() for index, reader in enumerate(readers) if reader is not None
        }
        owner = caller.principal.id
        events = self.jobs.choice_events(jobs, listener)
        # A job serves several choices where identical requests share it (greedy, cached).
        indexes: dict[str, list[int]] = {}
        for index, job in enumerate(jobs):
            indexes.setdefault(job.id, []).append(index)
        head = jobs[0]

        def chunk(choice: BaseModel | None, usage: OpenAIUsage | None = None) -> ServerSentEvent:
            return _data(shape.build_chunk(head, choice, usage))

        async def relay() -> AsyncIterator[ServerSentEvent]:
            results: dict[int, JobResult] = {}
            ended: set[str] = set()
            sent = dict.fromkeys(range(len(jobs)), 0)  # characters, per choice
            prompt_tokens: dict[str, int] = {}  # per job, from its first event
            try:
                if shape.opening is not None:
                    for index in range(len(jobs)):
                        yield chunk(shape.opening(index))
                async for job_id, event in events:
                    if event.type is EventType.token:
                        token = TokenEvent.model_validate_json(event.data)
                        if token.prompt_tokens is not None:
                            prompt_tokens[job_id] = token.prompt_tokens
                        so_far = None
                        if body.continuous_usage and token.tokens is not None:
                            so_far = counted(prompt_tokens.get(job_id, 0), token.tokens)
                        for index in indexes[job_id]:
                            text = token.text
                            if index in streams:
                                text = streams[index].feed(text)
                                if not (text or token.logprobs or so_far):
                                    continue  # held back, and nothing else to say
                            piece = Piece(index, text, None, token.logprobs, sent[index])
                            sent[index] += len(text)
                            yield chunk(shape.delta(piece), so_far)
                        continue
                    ended.add(job_id)
                    final = decode_job(event)
                    if final.error is not None or final.result is None:
                        code = final.error.code if final.error else "failed"
                        message = final.error.message if final.error else "the job failed"
                        yield _error(code, message)
                        yield ServerSentEvent(data=DONE)
                        return
                    result = final.result
                    so_far = usage([result], 1) if body.continuous_usage else None
                    for index in indexes[job_id]:
                        results[index] = result
                        finish = finish_reason(result)
                        if index in streams:
                            rest, read = streams[index].finish(result.text)
                            if rest:
                                yield chunk(shape.delta(Piece(index, rest, offset=sent[index])))
                            if read is not None:
                                yield chunk(shape.delta(Piece(index, calls=tuple(read.calls))))
                                finish = "tool_calls"
                        yield chunk(shape.delta(Piece(index, finish=finish)), so_far)
                if len(results) == len(jobs):
                    if body.include_usage:
                        ordered = [results[index] for index in range(len(jobs))]
                        yield chunk(None, usage(ordered, body.n))
                    yield ServerSentEvent(data=DONE)
            except (RedisError, ApiError) as e:
                err = map_exception(e)
                yield _error(err.code, err.message)
            finally:
                # The client went away, a choice failed, or the stream broke: let go of the jobs
                # still going, which stop once no identical request shares them, so no GPU time
                # goes to unread text.
                if going := [job.id for job in jobs if job.id not in ended]:
                    task = asyncio.create_task(self.jobs.let_go(going, owner))
                    self._cancelling.add(task)
                    task.add_done_callback(self._cancelling.discard)

        return JobStream(jobs, relay())

    async def run(
        self,
        requests: list[GenerationRequest],
        n: int,
        caller: Caller,
        idempotency_key: str | None,
        listener: Redis,
    ) -> tuple[list[Job], list[JobResult]]:
        """The `n` choices of each request's jobs once all have succeeded, and their results; a
        failed job, one past GENQ_MAX_SYNC_TIMEOUT_S or a gateway shutting down is an error, and
        the jobs still going are let go of."""
        jobs = await self.jobs.submit_choices(requests, caller, n, idempotency_key=idempotency_key)
        timeout_s = self.settings.max_sync_timeout_s
        jobs = await self.jobs.wait_all([job.id for job in jobs], timeout_s, listener)
        if going := [job.id for job in jobs if not job.status.finished]:
            # Nobody can collect an OpenAI answer later: stop spending the GPU on it.
            await self.jobs.let_go(going, caller.principal.id)
        if errors := [job.error for job in jobs if job.error is not None]:
            raise GenerationFailed(errors[0].code, errors[0].message)
        if going:
            if self.drain.started:
                raise ShuttingDown(
                    "this gateway is shutting down; retry on another", retry_after_s=1
                )
            raise GatewayTimeout(
                f"the job did not finish within {timeout_s}s "
                "(GENQ_MAX_SYNC_TIMEOUT_S); use stream=true for long generations"
            )
        results = [job.result for job in jobs if job.result is not None]
        assert len(results) == len(jobs)
        return jobs, results
