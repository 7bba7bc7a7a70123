"""OpenAI-compatible routes, usable with the official `openai` client (base_url .../v1)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse

from gateway.deps import Services
from gateway.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
)
from gateway.routes.jobs import ERRORS
from gateway.services.openai import OpenAIService

router = APIRouter(prefix="/v1", tags=["openai"])

STREAMED = {"content": {"text/event-stream": {}}, "description": "With `stream: true`: chunks"}


def _openai(request: Request) -> OpenAIService:
    services: Services = request.app.state.services
    return services.openai


OpenAIDep = Annotated[OpenAIService, Depends(_openai)]


@router.post(
    "/completions",
    response_model=None,
    responses={**ERRORS, 200: {"model": Completion, **STREAMED}},
)
async def completions(
    body: CompletionRequest, openai: OpenAIDep
) -> Completion | EventSourceResponse:
    """OpenAI text completion; with `stream: true`, chunks ending with `data: [DONE]`."""
    if body.stream:
        return EventSourceResponse(await openai.completion_stream(body))
    return await openai.completion(body)


@router.post(
    "/chat/completions",
    response_model=None,
    responses={**ERRORS, 200: {"model": ChatCompletion, **STREAMED}},
)
async def chat_completions(
    body: ChatCompletionRequest, openai: OpenAIDep
) -> ChatCompletion | EventSourceResponse:
    """OpenAI chat completion; the model's chat template is applied by the worker."""
    if body.stream:
        return EventSourceResponse(await openai.chat_stream(body))
    return await openai.chat(body)
