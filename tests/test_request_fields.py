"""vLLM's request fields that load generators send: `ignore_eos`, `min_tokens`, `top_k`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import TINY_NAME, Stack
from tests.engine_driver import PROMPTS, Job, greedy, run
from worker.engine.config import DecodeConfig
from worker.engine.model import LoadedModel
from worker.engine.sampling import SamplingParams

# Both decode paths mask end-of-sequence tokens: the eager one and the static one GPUs take.
PATHS = pytest.mark.parametrize(
    "decode", [None, DecodeConfig(static="on")], ids=["eager", "static"]
)


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base, timeout=60) as c:
        yield c


def ends_early(lm: LoadedModel, at: int) -> tuple[LoadedModel, list[int]]:
    """The model, with the token its greedy run of PROMPTS[1] gives at index `at` made an
    end-of-sequence token; and that run's tokens."""
    tokens = run(lm, [Job("a", PROMPTS[1], greedy(12))]).done["a"].token_ids
    eos = frozenset({*lm.eos_token_ids, tokens[at]})
    return dataclasses.replace(lm, eos_token_ids=eos), tokens


@PATHS
def test_ignore_eos_generates_exactly_max_new_tokens(
    tiny_lm: LoadedModel, decode: DecodeConfig | None
) -> None:
    lm, tokens = ends_early(tiny_lm, at=2)
    assert (
        run(lm, [Job("a", PROMPTS[1], greedy(12))], decode=decode).done["a"].token_ids
        == (tokens[:3])
    )
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    done = run(lm, [Job("a", PROMPTS[1], params)], decode=decode).done["a"]
    assert done.finish_reason == "length"
    assert done.token_ids == tokens  # the same tokens, the end-of-sequence one included


@PATHS
def test_min_tokens_holds_back_end_of_sequence_until_reached(
    tiny_lm: LoadedModel, decode: DecodeConfig | None
) -> None:
    lm, tokens = ends_early(tiny_lm, at=2)
    eos = lm.eos_token_ids
    params = SamplingParams(max_new_tokens=12, temperature=0.0, min_tokens=6)
    out = run(lm, [Job("a", PROMPTS[1], params), Job("b", PROMPTS[2], greedy(12))], decode=decode)
    held = out.done["a"].token_ids
    assert len(held) >= 6
    assert not eos & set(held[:6])  # none could be picked before the 6th token
    assert held[:2] == tokens[:2]  # up to there it is the greedy run
    # The row beside it is not held back.
    assert (
        out.done["b"].token_ids == run(lm, [Job("b", PROMPTS[2], greedy(12))]).done["b"].token_ids
    )


def test_min_tokens_holds_back_stop_strings_until_reached(tiny_lm: LoadedModel) -> None:
    whole = run(tiny_lm, [Job("a", PROMPTS[1], greedy(30))]).done["a"]
    stop = whole.text[2:5]  # early in the text: it would end the row within a few tokens
    params = SamplingParams(max_new_tokens=30, temperature=0.0, stop=(stop,))
    early = run(tiny_lm, [Job("a", PROMPTS[1], params)]).done["a"]
    assert early.text == whole.text[: whole.text.index(stop)]
    held = dataclasses.replace(params, min_tokens=len(early.token_ids) + 3)
    late = run(tiny_lm, [Job("a", PROMPTS[1], held)]).done["a"]
    assert len(late.token_ids) > len(early.token_ids)
    assert late.text == whole.text[: len(late.text)]  # the same greedy run, further on
    assert late.text.startswith(whole.text[: whole.text.index(stop) + len(stop)])


def test_the_openai_routes_take_the_load_generators_fields(client: httpx.Client) -> None:
    body = {
        "model": TINY_NAME,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 20,
        "temperature": 0.7,
        "top_k": 50,
        "min_tokens": 5,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 20
    off = client.post(
        "/v1/completions", json={"model": TINY_NAME, "prompt": "Hi", "top_k": -1, "max_tokens": 3}
    )
    assert off.status_code == 200, off.text
    unknown = client.post("/v1/chat/completions", json={**body, "best_of": 2})
    assert unknown.status_code == 422
    assert "best_of" in unknown.json()["error"]["message"]


def test_min_tokens_over_max_new_tokens_is_refused_naming_both(client: httpx.Client) -> None:
    resp = client.post("/v1/jobs", json={"prompt": "Hi", "min_tokens": 9, "max_new_tokens": 4})
    assert resp.status_code == 422
    assert "min_tokens" in resp.json()["error"]["message"]
    default = client.post("/v1/jobs", json={"prompt": "Hi", "min_tokens": 100_000})
    assert default.status_code == 422
    assert "max_new_tokens" in default.json()["error"]["message"]
    # The OpenAI routes say it as plainly, without the request (its prompt) echoed back.
    openai = client.post(
        "/v1/completions",
        json={"model": TINY_NAME, "prompt": "secret words", "max_tokens": 5, "min_tokens": 9},
    )
    assert openai.status_code == 422
    message = openai.json()["error"]["message"]
    assert message == "Value error, `min_tokens` must not exceed `max_new_tokens`"
    assert "secret" not in openai.text


def test_health_answers_as_readyz(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/health").json() == client.get("/readyz").json()
