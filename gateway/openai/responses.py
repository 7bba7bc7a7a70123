"""One builder for the OpenAI answers and their stream chunks: a completion and a chat
completion differ only in their id's prefix, their types and the shape of a choice. What a
choice holds (its text, finish reason and logprobs; a completion's echoed prompt) is worked out
once, as `Piece`s, from the jobs' results and events."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

from common.jobs import Job, JobResult
from common.jobs import TokenLogprob as JobLogprob
from gateway.openai.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    DeltaToolCall,
    FinishReason,
    FunctionCallOut,
    OpenAIRequest,
    OpenAIUsage,
    PromptLogprob,
    PromptTokensDetails,
    TokenLogprob,
    ToolCallOut,
    TopLogprob,
)
from gateway.openai.tools import Call, ToolReader

Answer = TypeVar("Answer", Completion, ChatCompletion)


@dataclass(frozen=True, slots=True)
class Shape(Generic[Answer]):
    prefix: str
    answer: type[Answer]
    chunk: type[Completion | ChatCompletionChunk]
    # A choice holding the whole text, and one holding a chunk's (no finish reason until the
    # end).
    choice: Callable[[Piece], BaseModel]
    delta: Callable[[Piece], BaseModel]
    # The choice of a stream's first chunk per index, before any text: chat names the speaker.
    opening: Callable[[int], BaseModel] | None = None

    def build(
        self,
        job: Job,
        body: OpenAIRequest,
        results: list[JobResult],
        readers: Sequence[ToolReader | None] = (),
    ) -> Answer:
        """The answer of choices `results`, in order, named after `job` (choice 0's); choice
        i's tool calls read by `readers[i]`, where there are readers."""
        choices = [self.choice(piece) for piece in whole(body, results, readers)]
        return self.answer.model_validate(
            {**_head(self, job), "choices": choices, "usage": usage(results, body.n)}
        )

    def build_chunk(
        self, job: Job, choice: BaseModel | None, usage: OpenAIUsage | None = None
    ) -> BaseModel:
        """A stream chunk with one choice, or none (the usage chunk)."""
        choices = [] if choice is None else [choice]
        return self.chunk.model_validate({**_head(self, job), "choices": choices, "usage": usage})


def _head(shape: Shape[Answer], job: Job) -> dict[str, object]:
    return {"id": f"{shape.prefix}-{job.id}", "created": int(job.created_at), "model": job.model}


@dataclass(frozen=True, slots=True)
class Piece:
    """A choice's whole text, or what one chunk adds to it, with the logprobs of the tokens it
    came from (None: not asked for); `offset`: where `text` starts in the choice's text."""

    index: int
    text: str = ""
    finish: FinishReason | None = None
    logprobs: list[JobLogprob] | None = None
    offset: int = 0
    prompt_logprobs: list[JobLogprob] | None = None
    calls: tuple[Call, ...] = ()  # a chat choice's tool calls, all in one piece


def whole(
    body: OpenAIRequest, results: list[JobResult], readers: Sequence[ToolReader | None] = ()
) -> list[Piece]:
    """Each choice of a finished answer: choice i is of prompt i // n, its tool calls read by
    `readers[i]` where there are readers."""
    if isinstance(body, ChatCompletionRequest):
        return [
            _chat(i, result, readers[i] if readers else None) for i, result in enumerate(results)
        ]
    return [_completion(body, i, result) for i, result in enumerate(results)]


def _chat(index: int, result: JobResult, reader: ToolReader | None) -> Piece:
    if reader is not None and (read := reader.read(result.text)) is not None:
        return Piece(
            index, read.content or "", "tool_calls", result.logprobs, calls=tuple(read.calls)
        )
    return Piece(index, result.text, finish_reason(result), result.logprobs)


def _completion(body: CompletionRequest, index: int, result: JobResult) -> Piece:
    text, logprobs = result.text, result.logprobs
    if body.echo:
        prompt = body.prompts()[index // body.n]
        echoed = prompt if isinstance(prompt, str) else result.prompt_text or ""
        text = echoed + text
        if body.logprobs is not None:
            top = body.logprobs
            scored = [
                entry.model_copy(update={"top_logprobs": entry.top_logprobs[:top]})
                for entry in result.prompt_logprobs or []
            ]
            logprobs = scored + (logprobs or [])
    prompt_logprobs = result.prompt_logprobs if body.prompt_logprobs is not None else None
    return Piece(index, text, finish_reason(result), logprobs, prompt_logprobs=prompt_logprobs)


def _completion_choice(piece: Piece) -> CompletionChoice:
    return CompletionChoice(
        index=piece.index,
        text=piece.text,
        finish_reason=piece.finish,
        logprobs=None if piece.logprobs is None else _completion_logprobs(piece),
        prompt_logprobs=None if piece.prompt_logprobs is None else _by_id(piece.prompt_logprobs),
    )


def _completion_logprobs(piece: Piece) -> CompletionLogprobs:
    """OpenAI's legacy shape: each token's text, logprob, likeliest tokens (and itself, as
    vLLM lists them) and where its text starts."""
    entries = piece.logprobs or []
    offsets, at = [], piece.offset
    for entry in entries:
        offsets.append(at)
        at += len(entry.token)
    return CompletionLogprobs(
        tokens=[entry.token for entry in entries],
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[None if entry.logprob is None else _likeliest(entry) for entry in entries],
        text_offset=offsets,
    )


def _likeliest(entry: JobLogprob) -> dict[str, float]:
    """The likeliest tokens and the token itself, by text: tokens of the same text (parts of
    characters) show the likeliest's logprob."""
    by_text: dict[str, float] = {}
    for top in [*entry.top_logprobs, entry]:
        logprob = _scored(top.logprob)
        by_text[top.token] = max(logprob, by_text.get(top.token, logprob))
    return by_text


def _by_id(entries: list[JobLogprob]) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's prompt_logprobs: per prompt token (the first has none), it and its likeliest."""
    return [
        None
        if entry.logprob is None
        else {
            **{
                str(top.id): PromptLogprob(logprob=top.logprob, decoded_token=top.token)
                for top in entry.top_logprobs
            },
            str(entry.id): PromptLogprob(logprob=entry.logprob, decoded_token=entry.token),
        }
        for entry in entries
    ]


def _chat_logprobs(entries: list[JobLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=entry.token,
                logprob=_scored(entry.logprob),
                bytes=_bytes(entry.token, entry.bytes),
                top_logprobs=[
                    TopLogprob(
                        token=top.token,
                        logprob=_scored(top.logprob),
                        bytes=_bytes(top.token, top.bytes),
                    )
                    for top in entry.top_logprobs
                ],
            )
            for entry in entries
        ]
    )


def _scored(logprob: float | None) -> float:
    assert logprob is not None, "only a prompt's first token has no logprob"
    return logprob


def _bytes(token: str, raw: list[int] | None) -> list[int]:
    return raw if raw is not None else list(token.encode())


def _chat_choice(piece: Piece) -> ChatChoice:
    assert piece.finish is not None, "a whole choice has ended"
    calls = [
        ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))
        for call in piece.calls
    ]
    return ChatChoice(
        index=piece.index,
        # An answer of calls alone has no content (OpenAI's null).
        message=ChatMessageOut(
            content=piece.text if piece.text or not calls else None, tool_calls=calls or None
        ),
        finish_reason=piece.finish,
        logprobs=None if piece.logprobs is None else _chat_logprobs(piece.logprobs),
    )


def _chat_delta(piece: Piece) -> ChatChunkChoice:
    logprobs = None if piece.logprobs is None else _chat_logprobs(piece.logprobs)
    if piece.calls:
        delta = ChatDelta(tool_calls=_delta_calls(piece.calls))
    else:
        delta = ChatDelta(content=piece.text) if piece.text or logprobs else ChatDelta()
    return ChatChunkChoice(
        index=piece.index,
        delta=delta,
        finish_reason=piece.finish,
        logprobs=logprobs,
    )


def _delta_calls(calls: tuple[Call, ...]) -> list[DeltaToolCall]:
    return [
        DeltaToolCall(
            index=index,
            id=call.id,
            function=FunctionCallOut(name=call.name, arguments=call.arguments),
        )
        for index, call in enumerate(calls)
    ]


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
    choice=_chat_choice,
    delta=_chat_delta,
    opening=lambda index: ChatChunkChoice(
        index=index, delta=ChatDelta(role="assistant", content="")
    ),
)


def usage(results: list[JobResult], n: int) -> OpenAIUsage:
    """The usage of a request's choices, as vLLM counts it: each prompt once (the count of its
    first choice, cached tokens included), the tokens they generated summed."""
    prompts = [result.usage for result in results[::n]]
    prompt_tokens = sum(prompt.prompt_tokens for prompt in prompts)
    completion_tokens = sum(result.usage.completion_tokens for result in results)
    return counted(
        prompt_tokens, completion_tokens, sum(prompt.cached_prompt_tokens for prompt in prompts)
    )


def counted(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> OpenAIUsage:
    return OpenAIUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def finish_reason(result: JobResult) -> FinishReason:
    return "length" if result.finish_reason == "length" else "stop"
