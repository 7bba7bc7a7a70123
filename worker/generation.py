"""One request at a time: prompt building and the token loop, run off the event loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from common.schemas import FinishReason, GenerationRequest
from worker.loading import LoadedModel
from worker.sampling import Sampler, SamplingParams
from worker.textstream import TextStream


class GenerationError(Exception):
    """A request the model cannot serve; the job fails with `code` and this message."""

    code = "generation_failed"


class ContextLengthError(GenerationError):
    code = "context_length_exceeded"


class GenerationTimeout(GenerationError):
    code = "job_timeout"


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    token_ids: list[int]  # generated, end-of-sequence token included
    time_to_first_token_s: float | None
    generation_s: float

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def build_prompt_ids(lm: LoadedModel, request: GenerationRequest) -> list[int]:
    tokenizer = lm.tokenizer
    if request.messages is not None:
        if not tokenizer.chat_template:
            raise GenerationError(f"model {lm.name} has no chat template; send `prompt` instead")
        text = tokenizer.apply_chat_template(
            [m.model_dump() for m in request.messages], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(request.prompt).input_ids)


def check_context(lm: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    if prompt_tokens == 0:
        raise GenerationError("the prompt encodes to no tokens")
    if prompt_tokens + max_new_tokens > lm.max_context:
        raise ContextLengthError(
            f"the prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it "
            f"exceeds the context window of {lm.name} ({lm.max_context} tokens)"
        )


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompt_ids: list[int],
    params: SamplingParams,
    on_text: Callable[[str], None],
    cancelled: threading.Event,
    deadline: float,
) -> Generation:
    """Decode token by token, handing each new piece of text to `on_text` as soon as it is safe.

    `deadline` is a `time.monotonic()` value; past it the generation fails rather than letting
    arq's own timeout kill the job without a record of why.
    """
    check_context(lm, len(prompt_ids), params.max_new_tokens)
    sampler = Sampler(params, lm.device)
    stream = TextStream(lm.tokenizer, prompt_ids, list(params.stop))
    seq = torch.tensor([prompt_ids], device=lm.device)  # (1, prompt + generated so far)
    step_input = seq
    cache = DynamicCache(config=lm.model.config)
    started = time.perf_counter()
    first_token_s: float | None = None
    finish: FinishReason = "length"
    generated: list[int] = []
    while len(generated) < params.max_new_tokens:
        if cancelled.is_set():
            finish = "cancelled"
            break
        if time.monotonic() > deadline:
            raise GenerationTimeout("generation ran past GENQ_JOB_TIMEOUT_S")
        logits = lm.model(input_ids=step_input, cache=cache, use_cache=True).logits
        token = sampler.next_token(seq, logits[:, -1, :].float())
        generated.append(token)
        if first_token_s is None:
            first_token_s = time.perf_counter() - started
        if token in lm.eos_token_ids:
            finish = "stop"
            break
        step_input = torch.tensor([[token]], device=lm.device)
        seq = torch.cat([seq, step_input], dim=1)
        if delta := stream.push(token):
            on_text(delta)
        if stream.stopped:
            finish = "stop"
            break
    if tail := stream.flush():
        on_text(tail)
    return Generation(
        text=stream.text,
        finish_reason=finish,
        prompt_tokens=len(prompt_ids),
        token_ids=generated,
        time_to_first_token_s=first_token_s,
        generation_s=time.perf_counter() - started,
    )
