"""What a generation is, what the engine reports of it, and how a request becomes prompt tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from common.contract import ErrorCode
from common.jobs import FinishReason, TokenLogprob
from worker.engine.chat import Message, Tool, template_input, tool_objects
from worker.engine.model import LoadedModel, vocab
from worker.engine.sampling import SamplingParams


class PromptSource(Protocol):
    """What a prompt is built from: the queue's work request, or a client's request (tests,
    benchmarks)."""

    @property
    def prompt(self) -> str | None: ...

    @property
    def prompt_token_ids(self) -> Sequence[int] | None: ...

    @property
    def messages(self) -> Sequence[Message] | None: ...

    @property
    def tools(self) -> Sequence[Tool] | None: ...

    @property
    def add_special_tokens(self) -> bool:
        """Whether the tokenizer adds its special tokens (BOS) to a text prompt."""


class GenerationError(Exception):
    """A request the model cannot serve; the job fails with `code` and this message."""

    code = ErrorCode.generation_failed


class ContextLengthError(GenerationError):
    code = ErrorCode.context_length_exceeded


class GenerationTimeout(GenerationError):
    code = ErrorCode.job_timeout


class OutOfMemory(GenerationError):
    code = ErrorCode.out_of_memory


class InvalidPrompt(GenerationError):
    """The chat template or the tokenizer refused the request."""

    code = ErrorCode.invalid_prompt


class NumericalError(GenerationError):
    """The row's next-token scores cannot be sampled (NaN or infinite)."""

    code = ErrorCode.numerical_error


class DetokenizationError(GenerationError):
    """Turning the row's tokens into text, or matching its stop strings, raised."""

    code = ErrorCode.detokenization_failed


class EngineFault(GenerationError):
    """A step failed as a whole (the forward pass, say), or the engine gave up."""

    code = ErrorCode.engine_error


# How CUDA (and ROCm) errors read where torch raises them as plain RuntimeErrors.
_DEVICE_ERROR_MARKERS = (
    "cuda error",
    "cublas",
    "cudnn",
    "device-side assert",
    "illegal memory access",
    "hip error",
)


def is_device_error(error: BaseException) -> bool:
    """Whether `error` comes from the accelerator itself. On CUDA such errors are sticky: every
    later call on the context fails too, so the engine cannot go on."""
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    if not isinstance(error, RuntimeError) or isinstance(error, torch.OutOfMemoryError):
        return False
    message = str(error).lower()
    return any(marker in message for marker in _DEVICE_ERROR_MARKERS)


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    cached_prompt_tokens: int  # of prompt_tokens, those taken from the prefix cache
    token_ids: list[int]  # generated, end-of-sequence token included
    time_to_first_token_s: float | None  # from the start of its prefill
    generation_s: float  # prefill and decode
    prefill_s: float | None  # the prefill pass, which yields the first token
    decode_s: float | None  # from the first token to the last
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # of token_ids, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # of prompt_ids, when asked for
    prompt_text: str | None = None  # decoded from prompt_ids, when asked for (echo)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class RowOutput:
    """What one step produced for one request: new text, and the outcome once it has ended."""

    request_id: str
    text: str = ""
    finished: Generation | None = None
    error: GenerationError | None = None
    tokens: int = 0  # generated so far
    ids: list[int] = field(default_factory=list)  # the tokens `text` came from
    prompt_tokens: int = 0
    # Of the tokens this output's text came from (and those whose text is held back, at the end).
    logprobs: list[TokenLogprob] | None = None

    @property
    def ended(self) -> bool:
        return self.finished is not None or self.error is not None


def build_prompt_ids(lm: LoadedModel, request: PromptSource) -> list[int]:
    """The prompt's token ids; a chat template or tokenizer that raises (a template's
    `raise_exception`, say) is an `InvalidPrompt` of this request alone."""
    tokenizer = lm.tokenizer
    if request.prompt_token_ids is not None:
        ids = list(request.prompt_token_ids)
        size = vocab(lm)
        bad = next((token for token in ids if not 0 <= token < size), None)
        if bad is not None:
            raise InvalidPrompt(
                f"prompt token id {bad} is not one of {lm.name}'s (0 to {size - 1})"
            )
        return ids
    if request.messages is not None:
        if not tokenizer.chat_template:
            raise GenerationError(f"model {lm.name} has no chat template; send `prompt` instead")
        try:
            tools = tool_objects(request.tools) if request.tools else None
            template = tokenizer.get_chat_template(tools=tools)
            messages, tools = template_input(template, request.messages, tools)
            text = tokenizer.apply_chat_template(
                messages,
                tools=tools,  # type: ignore[arg-type]  # a list of dicts, as it reads them
                chat_template=template,
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception as e:
            raise InvalidPrompt(f"the chat template of {lm.name} refused the messages: {e}") from e
        return _encode(lm, str(text), add_special_tokens=False)
    assert request.prompt is not None, "a request has messages or a prompt"
    return _encode(lm, request.prompt, add_special_tokens=request.add_special_tokens)


def _encode(lm: LoadedModel, text: str, *, add_special_tokens: bool) -> list[int]:
    try:
        return list(lm.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
    except Exception as e:
        raise InvalidPrompt(f"the tokenizer of {lm.name} cannot encode the prompt: {e}") from e


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


def check_token_ids(lm: LoadedModel, params: SamplingParams) -> None:
    """The token ids a request names (`logit_bias`, `stop_token_ids`) are the model's."""
    size = vocab(lm)
    named = [("logit_bias", token) for token, _ in params.logit_bias]
    named += [("stop_token_ids", token) for token in params.stop_token_ids]
    for name, token in named:
        if not 0 <= token < size:
            raise GenerationError(
                f"{name} names token id {token}; {lm.name} has token ids 0 to {size - 1}"
            )


def with_bad_words(lm: LoadedModel, params: SamplingParams) -> SamplingParams:
    """`params` with its bad words as token sequences, as vLLM makes them: each word alone, and
    with a space before it where that tokenizes to another first token and as many tokens (a
    word in the middle of text)."""
    if not params.bad_words:
        return params
    sequences: list[tuple[int, ...]] = []
    for word in params.bad_words:
        alone = _encode(lm, word.lstrip(), add_special_tokens=False)
        spaced = _encode(lm, " " + word.lstrip(), add_special_tokens=False)
        if alone:
            sequences.append(tuple(alone))
        if spaced and (not alone or (spaced[0] != alone[0] and len(spaced) == len(alone))):
            sequences.append(tuple(spaced))
    return replace(params, bad_word_ids=tuple(dict.fromkeys(sequences)))
