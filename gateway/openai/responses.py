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
    # Choice `index` holding the whole text, and one holding a chunk's (no finish reason until
    # the end).
    choice: Callable[[int, str, FinishReason], BaseModel]
    delta: Callable[[int, str, FinishReason | None], BaseModel]
    # The choice of a stream's first chunk per index, before any text: chat names the speaker.
    opening: Callable[[int], BaseModel] | None = None

    def build(self, job: Job, results: list[JobResult]) -> Answer:
        """The answer of choices `results`, in order, named after `job` (choice 0's)."""
        choices = [
            self.choice(index, result.text, finish_reason(result))
            for index, result in enumerate(results)
        ]
        return self.answer.model_validate(
            {**_head(self, job), "choices": choices, "usage": usage(results)}
        )

    def build_chunk(
        self, job: Job, choice: BaseModel | None, usage: OpenAIUsage | None = None
    ) -> BaseModel:
        """A stream chunk with one choice, or none (the usage chunk)."""
        choices = [] if choice is None else [choice]
        return self.chunk.model_validate({**_head(self, job), "choices": choices, "usage": usage})


def _head(shape: Shape[Answer], job: Job) -> dict[str, object]:
    return {"id": f"{shape.prefix}-{job.id}", "created": int(job.created_at), "model": job.model}


def _completion_choice(index: int, text: str, finish: FinishReason | None) -> CompletionChoice:
    return CompletionChoice(index=index, text=text, finish_reason=finish)


def _chat_delta(index: int, text: str, finish: FinishReason | None) -> ChatChunkChoice:
    return ChatChunkChoice(
        index=index, delta=ChatDelta(content=text) if text else ChatDelta(), finish_reason=finish
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
    choice=lambda index, text, finish: ChatChoice(
        index=index, message=ChatMessageOut(content=text), finish_reason=finish
    ),
    delta=_chat_delta,
    opening=lambda index: ChatChunkChoice(
        index=index, delta=ChatDelta(role="assistant", content="")
    ),
)


def usage(results: list[JobResult]) -> OpenAIUsage:
    """The usage of a request's choices, as vLLM counts it: their one prompt once (choice 0's
    count, its cached tokens included), the tokens they generated summed."""
    prompt = results[0].usage
    completion_tokens = sum(result.usage.completion_tokens for result in results)
    return OpenAIUsage(
        prompt_tokens=prompt.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt.prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=prompt.cached_prompt_tokens),
    )


def finish_reason(result: JobResult) -> FinishReason:
    return "length" if result.finish_reason == "length" else "stop"
