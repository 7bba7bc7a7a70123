"""OpenAI-compatible routes, usable with the official `openai` client (base_url .../v1)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from redis.asyncio import Redis
from sse_starlette import EventSourceResponse

from gateway.auth import Caller
from gateway.deps import GeneratorDep, ListenerDep, Services
from gateway.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    OpenAIRequest,
)
from gateway.openai.responses import CHAT, COMPLETION, Answer, Shape
from gateway.openai.serving import OpenAIServing
from gateway.routes.common import ERRORS, IdempotencyKey, StrictJSONRoute
from gateway.schemas import ErrorBody
from gateway.services.sse import sse_response
from gateway.timing import server_timing

router = APIRouter(route_class=StrictJSONRoute, prefix="/v1", tags=["openai"])

STREAMED = {"content": {"text/event-stream": {}}, "description": "With `stream: true`: chunks"}
# A failed generation answers with the status of its error code (gateway.errors): the input the
# model could not take, its output that could not be sampled or decoded, a job past its time.
FAILED: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 502, 504)}


def _openai(request: Request) -> OpenAIServing:
    services: Services = request.app.state.services
    return services.openai


OpenAIDep = Annotated[OpenAIServing, Depends(_openai)]


@router.post(
    "/completions",
    response_model=None,
    responses={**ERRORS, **FAILED, 200: {"model": Completion, **STREAMED}},
)
async def completions(
    body: CompletionRequest,
    openai: OpenAIDep,
    caller: GeneratorDep,
    listener: ListenerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Completion | EventSourceResponse:
    """OpenAI text completion; with `stream: true`, chunks ending with `data: [DONE]`."""
    return await _serve(body, COMPLETION, openai, caller, listener, response, idempotency_key)


@router.post(
    "/chat/completions",
    response_model=None,
    responses={**ERRORS, **FAILED, 200: {"model": ChatCompletion, **STREAMED}},
)
async def chat_completions(
    body: ChatCompletionRequest,
    openai: OpenAIDep,
    caller: GeneratorDep,
    listener: ListenerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> ChatCompletion | EventSourceResponse:
    """OpenAI chat completion; the model's chat template is applied by the worker."""
    return await _serve(body, CHAT, openai, caller, listener, response, idempotency_key)


async def _serve(
    body: OpenAIRequest,
    shape: Shape[Answer],
    openai: OpenAIServing,
    caller: Caller,
    listener: Redis,
    response: Response,
    idempotency_key: str | None,
) -> Answer | EventSourceResponse:
    """The answer with its `Server-Timing`, or its chunks as an event stream."""
    if body.stream:
        stream = await openai.stream(body, shape, caller, idempotency_key, listener)
        # The header names the genq jobs (one per choice, in order) before the first chunk,
        # which may be a while coming.
        headers = {"X-Genq-Job-Id": ", ".join(job.id for job in stream.jobs)}
        return sse_response(stream.events, openai.settings, headers)
    answer, timings = await openai.answer(body, shape, caller, idempotency_key, listener)
    response.headers["Server-Timing"] = server_timing(timings)
    return answer
