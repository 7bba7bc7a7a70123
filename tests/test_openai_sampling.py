"""Sampling fields (penalties, logit biases, min-p, stop token ids, bad words) and the model
list's max_model_len through the API, as the `openai` client and the native routes send them, on
the tiny model's running stack."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import TINY_NAME, Stack
from tests.engine_driver import reference
from worker.engine.model import LoadedModel

PROMPT = "Once upon a time, in a land far away, there lived a small model that"


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0) as c:
        yield c


def complete(client: openai.OpenAI, max_tokens: int, **extra: object) -> str:
    done = client.completions.create(
        model=TINY_NAME, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body=extra
    )
    return done.choices[0].text


def test_a_bias_of_minus_100_takes_the_greedy_token_away(
    client: openai.OpenAI, tiny_lm: LoadedModel
) -> None:
    (first,) = reference(tiny_lm, PROMPT, 1)
    assert complete(client, 16, logit_bias={str(first): -100}) != complete(client, 16)


def test_penalties_change_a_repetitive_greedy_output(client: openai.OpenAI) -> None:
    plain = complete(client, 40)
    penalized = complete(client, 40, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized != plain
    assert complete(client, 40, repetition_penalty=1.8) != plain


def test_a_stop_token_id_ends_the_completion_there(
    client: openai.OpenAI, tiny_lm: LoadedModel
) -> None:
    tokens = reference(tiny_lm, PROMPT, 12)
    stop = tokens[4]
    done = client.completions.create(
        model=TINY_NAME,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        extra_body={"stop_token_ids": [stop]},
    )
    choice = done.choices[0]
    assert choice.finish_reason == "stop"
    assert done.usage is not None
    assert done.usage.completion_tokens == tokens.index(stop) + 1


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999999999999999": 1}}, "logit_bias"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "GENQ_MAX_LOGIT_BIAS"),
        ({"stop_token_ids": [1, 2, 3, 4, 5]}, "GENQ_MAX_STOP_SEQUENCES"),
    ],
)
def test_bad_sampling_fields_are_refused_naming_them(
    stack: Stack, fields: dict[str, object], names: str
) -> None:
    for path, body in (
        ("/v1/completions", {"model": TINY_NAME, "prompt": "x", **fields}),
        ("/v1/generate", {"model": TINY_NAME, "prompt": "x", **fields}),
    ):
        answer = httpx.post(f"{stack.base}{path}", json=body, timeout=30)
        assert answer.status_code == 422, (path, answer.text)
        assert names in answer.text, (path, answer.text)


def test_a_token_id_outside_the_vocabulary_fails_that_request_naming_it(
    client: openai.OpenAI, tiny_lm: LoadedModel
) -> None:
    size = int(tiny_lm.model.config.vocab_size)
    with pytest.raises(openai.BadRequestError, match="logit_bias names token id"):
        complete(client, 4, logit_bias={str(size): 5})
    with pytest.raises(openai.BadRequestError, match="stop_token_ids names token id"):
        complete(client, 4, stop_token_ids=[size])


def test_the_native_api_takes_the_same_fields_and_caches_by_them(stack: Stack) -> None:
    def generate(**fields: object) -> dict[str, object]:
        body = {"model": TINY_NAME, "prompt": PROMPT, "max_new_tokens": 30, "temperature": 0}
        answer = httpx.post(f"{stack.base}/v1/generate", json={**body, **fields}, timeout=60)
        assert answer.status_code == 200, answer.text
        job: dict[str, object] = answer.json()
        return job

    plain = generate()
    again = generate()
    assert again["cached"] is True
    penalized = generate(frequency_penalty=2.0)
    assert penalized["cached"] is False
    assert penalized["result"] != plain["result"]


def test_blank_and_too_many_bad_words_are_refused(stack: Stack) -> None:
    for bad in ([" "], [""], ["w"] * 17):
        answer = httpx.post(
            f"{stack.base}/v1/completions",
            json={"model": TINY_NAME, "prompt": "x", "bad_words": bad},
            timeout=30,
        )
        assert answer.status_code == 422, answer.text
        assert "bad_words" in answer.text or "GENQ_MAX_BAD_WORDS" in answer.text


def test_the_model_list_gives_max_model_len(stack: Stack, tiny_lm: LoadedModel) -> None:
    (card,) = httpx.get(f"{stack.base}/v1/models", timeout=30).json()["data"]
    (version,) = card["versions"]
    assert version["state"] == "ready"
    assert version["max_model_len"] == tiny_lm.max_context
    assert card["max_model_len"] == tiny_lm.max_context
