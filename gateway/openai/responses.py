"""One builder for the OpenAI answers and their stream chunks: a completion and a chat
completion differ only in their id's prefix, their types and the shape of a choice."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

from common.jobs import Job, JobResult
from gateway.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    FinishReason,
    OpenAIUsage,
    PromptTokensDetails,
)

Answer = TypeVar("Answer", Completion, ChatCompletion)


@dataclass(frozen=True, slots=True)
class Shape(Generic[Answer]):
    prefix: str
    answer: type[Answer]
    chunk: type[Completion | ChatCompletionChunk]
    # A choice holding the whole text, and one holding a chunk's (no finish reason until the end).
    choice: Callable[[str, FinishReason], BaseModel]
    delta: Callable[[str, FinishReason | None], BaseModel]
    # The choice of a stream's first chunk, before any text: chat names the speaker there.
    opening: BaseModel | None = None

    def build(self, job: Job, result: JobResult) -> Answer:
        return self.answer.model_validate(
            {
                **_head(self, job),
                "choices": [self.choice(result.text, finish_reason(result))],
                "usage": usage(result),
            }
        )

    def build_chunk(
        self, job: Job, choice: BaseModel | None, usage: OpenAIUsage | None = None
    ) -> BaseModel:
        """A stream chunk with one choice, or none (the usage chunk)."""
        choices = [] if choice is None else [choice]
        return self.chunk.model_validate({**_head(self, job), "choices": choices, "usage": usage})


def _head(shape: Shape[Answer], job: Job) -> dict[str, object]:
    return {"id": f"{shape.prefix}-{job.id}", "created": int(job.created_at), "model": job.model}


def _completion_choice(text: str, finish: FinishReason | None) -> CompletionChoice:
    return CompletionChoice(text=text, finish_reason=finish)


def _chat_delta(text: str, finish: FinishReason | None) -> ChatChunkChoice:
    return ChatChunkChoice(
        delta=ChatDelta(content=text) if text else ChatDelta(), finish_reason=finish
    )


COMPLETION = Shape(
    prefix="cmpl",
    answer=Completion,
    chunk=Completion,
    choice=_completion_choice,
    delta=_completion_choice,
)
CHAT = Shape(
    prefix="chatcmpl",
    answer=ChatCompletion,
    chunk=ChatCompletionChunk,
    choice=lambda text, finish: ChatChoice(
        message=ChatMessageOut(content=text), finish_reason=finish
    ),
    delta=_chat_delta,
    opening=ChatChunkChoice(delta=ChatDelta(role="assistant", content="")),
)


def usage(result: JobResult) -> OpenAIUsage:
    u = result.usage
    return OpenAIUsage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_prompt_tokens),
    )


def finish_reason(result: JobResult) -> FinishReason:
    return "length" if result.finish_reason == "length" else "stop"
