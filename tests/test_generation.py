from __future__ import annotations

import threading
import time

import pytest

from common.schemas import ChatMessage, GenerationRequest
from worker.generation import (
    ContextLengthError,
    Generation,
    build_prompt_ids,
    generate,
)
from worker.loading import LoadedModel
from worker.sampling import SamplingParams


def run(lm: LoadedModel, prompt: str, params: SamplingParams) -> tuple[Generation, list[str]]:
    pieces: list[str] = []
    ids = build_prompt_ids(lm, GenerationRequest(prompt=prompt))
    out = generate(lm, ids, params, pieces.append, threading.Event(), time.monotonic() + 60)
    return out, pieces


@pytest.mark.parametrize("prompt", ["Hello", "The capital of France is", "a b c d e f g h i j"])
def test_greedy_equals_model_generate(tiny_lm: LoadedModel, prompt: str) -> None:
    out, _ = run(tiny_lm, prompt, SamplingParams(max_new_tokens=24, temperature=0.0))
    inputs = tiny_lm.tokenizer(prompt, return_tensors="pt")
    reference = tiny_lm.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert out.token_ids == reference[0, inputs.input_ids.shape[1] :].tolist()


def test_streamed_pieces_concatenate_to_the_text(tiny_lm: LoadedModel) -> None:
    out, pieces = run(tiny_lm, "Once upon", SamplingParams(max_new_tokens=40, temperature=0.0))
    assert "".join(pieces) == out.text
    assert out.finish_reason in ("length", "stop")


def test_seeded_sampling_is_reproducible(tiny_lm: LoadedModel) -> None:
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first, _ = run(tiny_lm, "Once upon", params)
    second, _ = run(tiny_lm, "Once upon", params)
    other, _ = run(tiny_lm, "Once upon", SamplingParams(max_new_tokens=20, seed=8))
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids


def test_max_new_tokens_gives_finish_reason_length(tiny_lm: LoadedModel) -> None:
    out, _ = run(tiny_lm, "Hello", SamplingParams(max_new_tokens=5, temperature=0.0))
    assert out.completion_tokens == 5
    assert out.finish_reason == "length"


def test_chat_messages_use_the_chat_template(tiny_lm: LoadedModel) -> None:
    request = GenerationRequest(messages=[ChatMessage(role="user", content="Hi")])
    ids = build_prompt_ids(tiny_lm, request)
    assert (
        tiny_lm.tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prompt_longer_than_the_context_window_is_refused(tiny_lm: LoadedModel) -> None:
    ids = [5] * (tiny_lm.max_context - 3)
    with pytest.raises(ContextLengthError, match="context window"):
        generate(
            tiny_lm,
            ids,
            SamplingParams(max_new_tokens=10),
            lambda _: None,
            threading.Event(),
            time.monotonic() + 60,
        )


def test_cancel_stops_generation(tiny_lm: LoadedModel) -> None:
    cancelled = threading.Event()
    cancelled.set()
    ids = build_prompt_ids(tiny_lm, GenerationRequest(prompt="Hello"))
    out = generate(
        tiny_lm,
        ids,
        SamplingParams(max_new_tokens=10),
        lambda _: None,
        cancelled,
        time.monotonic() + 60,
    )
    assert out.finish_reason == "cancelled"
    assert out.token_ids == []
