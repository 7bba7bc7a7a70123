"""End to end with the default model (SmolLM2-135M-Instruct from its GGUF file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from common.settings import DEFAULT_MODEL_NAME, Settings
from tests.sse import read_stream, token_text
from worker.model_fetch import default_model_path

CAPITAL = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


def test_greedy_chat_knows_the_capital_of_france(default_stack: str) -> None:
    body = {**CAPITAL, "temperature": 0, "max_new_tokens": 32}
    job = httpx.post(f"{default_stack}/v1/generate", json=body, timeout=120).json()
    assert job["status"] == "succeeded"
    assert job["model"] == f"{DEFAULT_MODEL_NAME}@1"
    assert "Paris" in job["result"]["text"]
    assert job["result"]["finish_reason"] == "stop"  # the model ends its turn itself


def test_streamed_text_equals_the_result(default_stack: str) -> None:
    body = {
        "messages": [{"role": "user", "content": "Write a haiku about the sea, with an emoji."}],
        "temperature": 0.7,
        "seed": 11,
        "max_new_tokens": 48,
        "stream": True,
    }
    with httpx.Client(base_url=default_stack, timeout=120) as client:
        events = read_stream(client, "POST", "/v1/generate", json=body)
    final = orjson.loads(events[-1].data)
    assert events[-1].event == "done"
    assert token_text(events) == final["result"]["text"]
    assert final["result"]["text"]


def test_a_bias_against_paris_keeps_it_out_of_the_answer(default_stack: str) -> None:
    tokenizer = default_tokenizer()
    banned = {tokenizer.encode(word, add_special_tokens=False)[0] for word in ("Paris", " Paris")}
    body = {
        **CAPITAL,
        "temperature": 0,
        "max_new_tokens": 32,
        "logit_bias": {str(token): -100 for token in banned},
    }
    job = httpx.post(f"{default_stack}/v1/generate", json=body, timeout=120).json()
    assert job["status"] == "succeeded"
    assert "Paris" not in job["result"]["text"]
    assert job["result"]["text"]


def test_a_bad_word_is_kept_out_of_the_answer(default_stack: str) -> None:
    body = {**CAPITAL, "temperature": 0, "max_new_tokens": 32, "bad_words": ["Paris"]}
    job = httpx.post(f"{default_stack}/v1/generate", json=body, timeout=120).json()
    assert job["status"] == "succeeded"
    assert "Paris" not in job["result"]["text"]
    assert job["result"]["text"]


def test_tokenize_and_detokenize_agree_with_the_models_tokenizer(default_stack: str) -> None:
    tokenizer = default_tokenizer()
    with httpx.Client(base_url=default_stack, timeout=120) as client:
        chat = client.post("/tokenize", json=CAPITAL).json()
        text = tokenizer.apply_chat_template(
            CAPITAL["messages"], add_generation_prompt=True, tokenize=False
        )
        assert isinstance(text, str)
        assert chat["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
        assert chat["count"] == len(chat["tokens"])
        assert isinstance(chat["max_model_len"], int)
        back = client.post("/detokenize", json={"tokens": chat["tokens"]}).json()
        assert back == {"prompt": text}


def default_tokenizer() -> PreTrainedTokenizerBase:
    path = default_model_path(Settings().model_cache_dir)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name
    )
    return tokenizer


@pytest.fixture(scope="module")
def reference_model(default_checkpoint: Path) -> Any:
    """The default checkpoint in plain transformers, fp32 on the CPU."""
    model: Any = AutoModelForCausalLM.from_pretrained(default_checkpoint, dtype=torch.float32)
    return model.eval()


def test_prompt_and_generated_logprobs_equal_transformers_log_softmax(
    default_stack: str, reference_model: Any
) -> None:
    body = {
        "prompt": "The capital of France is",
        "temperature": 0,
        "max_new_tokens": 8,
        "logprobs": 5,
        "prompt_logprobs": 5,
        "return_token_ids": True,
    }
    job = httpx.post(f"{default_stack}/v1/generate", json=body, timeout=120).json()
    result = job["result"]
    ids = result["prompt_token_ids"] + result["token_ids"]
    with torch.inference_mode():
        logits = reference_model(input_ids=torch.tensor([ids])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)
    entries = result["prompt_logprobs"][1:] + result["logprobs"]
    assert [entry["id"] for entry in entries] == ids[1:]
    for position, entry in enumerate(entries):
        assert entry["logprob"] == pytest.approx(expected[position, entry["id"]].item(), abs=1e-3)
        best = expected[position].topk(5)
        tops = entry["top_logprobs"]
        assert [top["logprob"] for top in tops] == pytest.approx(best.values.tolist(), abs=1e-3)
    assert " Paris" in "".join(entry["token"] for entry in result["logprobs"])
