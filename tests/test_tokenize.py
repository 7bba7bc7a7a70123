"""vLLM's `/tokenize` and `/detokenize`, answered by the worker holding the model's tokenizer."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from transformers import PreTrainedTokenizerFast

from tests.conftest import TINY_NAME, Stack
from tests.tiny_model import build_tokenizer

TEXT = "Café, naïve, déjà vu 🎉: the quick brown fox jumps over the lazy dog."
MESSAGES = [
    {"role": "developer", "content": "Answer briefly."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is the capital "},
            {"type": "text", "text": "of France?"},
        ],
    },
]
# MESSAGES as the worker hands them to the chat template.
TEMPLATED = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base, timeout=60) as c:
        yield c


def test_a_prompt_is_tokenized_as_the_models_tokenizer_encodes_it(
    http: httpx.Client, tokenizer: PreTrainedTokenizerFast
) -> None:
    resp = http.post("/tokenize", json={"model": TINY_NAME, "prompt": TEXT})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert list(answer) == ["count", "max_model_len", "tokens"]  # vLLM's order
    assert answer["tokens"] == tokenizer(TEXT).input_ids
    assert answer["count"] == len(answer["tokens"])
    (card,) = http.get("/v1/models").json()["data"]
    assert answer["max_model_len"] == card["max_model_len"]
    assert isinstance(answer["max_model_len"], int)
    # Without a model, the default one answers; without special tokens, as the tokenizer says.
    bare = http.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False})
    assert bare.status_code == 200, bare.text
    assert bare.json()["tokens"] == tokenizer(TEXT, add_special_tokens=False).input_ids


def test_a_prompt_past_the_context_window_or_of_no_tokens_is_counted_still(
    http: httpx.Client, tokenizer: PreTrainedTokenizerFast
) -> None:
    (card,) = http.get("/v1/models").json()["data"]
    long = "the quick brown fox " * card["max_model_len"]
    answer = http.post("/tokenize", json={"prompt": long, "add_special_tokens": False})
    assert answer.status_code == 200, answer.text
    assert answer.json()["count"] == len(tokenizer(long, add_special_tokens=False).input_ids)
    assert answer.json()["count"] > card["max_model_len"]
    empty = http.post("/tokenize", json={"prompt": "", "add_special_tokens": False})
    assert empty.status_code == 200, empty.text
    assert empty.json()["tokens"] == []


def test_messages_are_tokenized_after_the_chat_template(
    http: httpx.Client, tokenizer: PreTrainedTokenizerFast
) -> None:
    resp = http.post("/tokenize", json={"model": TINY_NAME, "messages": MESSAGES})
    assert resp.status_code == 200, resp.text
    text = tokenizer.apply_chat_template(TEMPLATED, add_generation_prompt=True, tokenize=False)
    assert isinstance(text, str)
    assert resp.json()["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
    # Detokenized, they are the template's text, its special tokens kept.
    back = http.post("/detokenize", json={"model": TINY_NAME, "tokens": resp.json()["tokens"]})
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": text}


def test_detokenize_undoes_tokenize(http: httpx.Client) -> None:
    tokens = http.post("/tokenize", json={"model": TINY_NAME, "prompt": TEXT}).json()["tokens"]
    resp = http.post("/detokenize", json={"model": TINY_NAME, "tokens": tokens})
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"prompt": TEXT}


def test_a_token_id_outside_the_vocabulary_is_a_400_naming_it(
    http: httpx.Client, tokenizer: PreTrainedTokenizerFast
) -> None:
    resp = http.post("/detokenize", json={"model": TINY_NAME, "tokens": [5, 123456, 7]})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_prompt"
    assert error["type"] == "invalid_request_error"
    assert "123456" in error["message"]
    assert f"0 to {len(tokenizer) - 1}" in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "named"),
    [
        ("/tokenize", {"model": TINY_NAME}, "prompt"),
        (
            "/tokenize",
            {"model": TINY_NAME, "prompt": "x", "return_token_strs": True},
            "return_token_strs",
        ),
        (
            "/tokenize",
            {"model": TINY_NAME, "prompt": "x", "add_generation_prompt": True},
            "add_generation_prompt",
        ),
        (
            "/tokenize",
            {"model": TINY_NAME, "messages": MESSAGES, "add_generation_prompt": False},
            "add_generation_prompt",
        ),
        (
            "/tokenize",
            {"model": TINY_NAME, "messages": MESSAGES, "add_special_tokens": True},
            "add_special_tokens",
        ),
        ("/tokenize", {"model": TINY_NAME, "messages": []}, "messages"),
        ("/detokenize", {"model": TINY_NAME}, "tokens"),
        ("/detokenize", {"model": TINY_NAME, "tokens": [1], "prompt": "x"}, "prompt"),
        ("/detokenize", {"model": TINY_NAME, "tokens": [-1]}, "tokens"),
    ],
)
def test_a_missing_extra_or_unsupported_field_is_a_422_naming_it(
    http: httpx.Client, path: str, body: dict[str, object], named: str
) -> None:
    resp = http.post(path, json=body)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_request"
    assert named in error["message"]


def test_an_unknown_model_gets_the_openai_routes_error(http: httpx.Client) -> None:
    completion = http.post("/v1/completions", json={"model": "gpt-17", "prompt": "x"})
    assert completion.status_code == 404
    bodies: list[tuple[str, dict[str, object]]] = [
        ("/tokenize", {"prompt": "x"}),
        ("/detokenize", {"tokens": [1]}),
    ]
    for path, body in bodies:
        resp = http.post(path, json={"model": "gpt-17", **body})
        assert resp.status_code == 404
        assert resp.json() == completion.json()
