"""What a generation is and how a request becomes prompt tokens; the engine does the decoding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from common.schemas import FinishReason
from worker.loading import LoadedModel


class Message(Protocol):
    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


class PromptSource(Protocol):
    """What a prompt is built from: the queue's work request, or a client's request (tests,
    benchmarks)."""

    @property
    def prompt(self) -> str | None: ...

    @property
    def messages(self) -> Sequence[Message] | None: ...


class GenerationError(Exception):
    """A request the model cannot serve; the job fails with `code` and this message."""

    code = "generation_failed"


class ContextLengthError(GenerationError):
    code = "context_length_exceeded"


class GenerationTimeout(GenerationError):
    code = "job_timeout"


class OutOfMemory(GenerationError):
    code = "out_of_memory"


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    cached_prompt_tokens: int  # of prompt_tokens, those taken from the prefix cache
    token_ids: list[int]  # generated, end-of-sequence token included
    time_to_first_token_s: float | None
    generation_s: float

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def build_prompt_ids(lm: LoadedModel, request: PromptSource) -> list[int]:
    tokenizer = lm.tokenizer
    if request.messages is not None:
        if not tokenizer.chat_template:
            raise GenerationError(f"model {lm.name} has no chat template; send `prompt` instead")
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in request.messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(request.prompt).input_ids)


def check_context(lm: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    if prompt_tokens == 0:
        raise GenerationError("the prompt encodes to no tokens")
    if lm.max_prompt_tokens is not None and prompt_tokens > lm.max_prompt_tokens:
        raise ContextLengthError(
            f"the prompt is {prompt_tokens} tokens; {lm.name} accepts at most "
            f"{lm.max_prompt_tokens} (max_prompt_tokens in its registry entry)"
        )
    if prompt_tokens + max_new_tokens > lm.max_context:
        why = ": its sliding attention window" if lm.sliding_window else ""
        raise ContextLengthError(
            f"the prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it "
            f"exceeds the context window of {lm.name} ({lm.max_context} tokens{why})"
        )
