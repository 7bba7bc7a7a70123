"""OpenAI-compatible routes, usable with the official `openai` client (base_url .../v1)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from sse_starlette import EventSourceResponse

from gateway.deps import GeneratorDep, ListenerDep, Services
from gateway.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
)
from gateway.routes.common import ERRORS, IdempotencyKey, StrictJSONRoute
from gateway.schemas import ErrorBody
from gateway.services.openai import JobStream, OpenAIService
from gateway.services.sse import sse_response
from gateway.timing import server_timing

router = APIRouter(route_class=StrictJSONRoute, prefix="/v1", tags=["openai"])

STREAMED = {"content": {"text/event-stream": {}}, "description": "With `stream: true`: chunks"}
# A failed generation answers with the status of its error code (gateway.errors): the input the
# model could not take, its output that could not be sampled or decoded, a job past its time.
FAILED: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 502, 504)}


def _openai(request: Request) -> OpenAIService:
    services: Services = request.app.state.services
    return services.openai


OpenAIDep = Annotated[OpenAIService, Depends(_openai)]


def _sse(stream: JobStream, openai: OpenAIService) -> EventSourceResponse:
    # The header names the genq job before the first chunk, which may be a while coming.
    return sse_response(stream.events, openai.settings, {"X-Genq-Job-Id": stream.job.id})


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
    if body.stream:
        stream = await openai.completion_stream(body, caller, idempotency_key, listener)
        return _sse(stream, openai)
    completion, timings = await openai.completion(body, caller, idempotency_key, listener)
    response.headers["Server-Timing"] = server_timing(timings)
    return completion


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
    if body.stream:
        return _sse(await openai.chat_stream(body, caller, idempotency_key, listener), openai)
    chat, timings = await openai.chat(body, caller, idempotency_key, listener)
    response.headers["Server-Timing"] = server_timing(timings)
    return chat
