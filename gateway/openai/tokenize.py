"""vLLM's `/tokenize` and `/detokenize`, at the root as vLLM serves them (not under /v1)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from gateway.deps import GeneratorDep, ListenerDep, Services
from gateway.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from gateway.openai.router import FAILED
from gateway.openai.tokenization import TokenizationServing
from gateway.routes.common import ERRORS, StrictJSONRoute

router = APIRouter(route_class=StrictJSONRoute, tags=["openai"])


def _tokenization(request: Request) -> TokenizationServing:
    services: Services = request.app.state.services
    return services.tokenization


TokenizationDep = Annotated[TokenizationServing, Depends(_tokenization)]


@router.post("/tokenize", responses={**ERRORS, **FAILED})
async def tokenize(
    body: TokenizeRequest,
    tokenization: TokenizationDep,
    caller: GeneratorDep,
    listener: ListenerDep,
) -> TokenizeResponse:
    """vLLM's tokenize: the token ids of `prompt`, or of `messages` after the model's chat
    template, as the model's workers encode them; a job of its own, queued ahead of
    generations."""
    return await tokenization.tokenize(body, caller, listener)


@router.post("/detokenize", responses={**ERRORS, **FAILED})
async def detokenize(
    body: DetokenizeRequest,
    tokenization: TokenizationDep,
    caller: GeneratorDep,
    listener: ListenerDep,
) -> DetokenizeResponse:
    """vLLM's detokenize: the text of `tokens`, special tokens kept; an id outside the model's
    vocabulary is a 400 naming it."""
    return await tokenization.detokenize(body, caller, listener)
