"""Logprobs, echo, token-id prompts, prompt lists and continuous usage through the OpenAI routes
(as the `openai` client sends them) and the native ones, on the tiny model's running stack: the
values are the model's own log-softmax."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest
import torch

from common.jobs import TokenLogprob
from gateway.schemas import GenerationRequest
from tests.conftest import TINY_NAME, Stack
from tests.engine_driver import reference
from tests.sse import read_stream
from worker.engine.generation import build_prompt_ids
from worker.engine.model import LoadedModel

PROMPT = "Once upon a time, in a land far away, there lived a small model that"


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base, timeout=60) as c:
        yield c


def log_softmax(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Row i: the model's log-probabilities of the token after ids[: i + 1]."""
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def prompt_ids(lm: LoadedModel, text: str = PROMPT) -> list[int]:
    return build_prompt_ids(lm, GenerationRequest(prompt=text))


def test_chat_logprobs_name_each_generated_token_and_its_likeliest(
    client: openai.OpenAI,
) -> None:
    done = client.chat.completions.create(
        model=TINY_NAME,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    (choice,) = done.choices
    assert choice.logprobs is not None
    content = choice.logprobs.content
    assert content is not None
    assert done.usage is not None
    assert len(content) == done.usage.completion_tokens == 8
    assert (
        b"".join(bytes(entry.bytes or []) for entry in content).decode(errors="replace")
        == choice.message.content
    )
    for entry in content:
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the likeliest.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.logprob <= 0


def test_a_streamed_chat_carries_each_chunks_logprobs_and_adds_up_to_the_answer(
    client: openai.OpenAI,
) -> None:
    kwargs: dict[str, object] = {
        "model": TINY_NAME,
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": 10,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 1,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(**kwargs, stream=True))  # type: ignore[call-overload]
    streamed = [
        entry
        for chunk in chunks
        for choice in chunk.choices
        if choice.logprobs is not None and choice.logprobs.content
        for entry in choice.logprobs.content
    ]
    expected = whole.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in expected]


def test_echoed_token_id_prompt_logprobs_equal_the_models_log_softmax(
    client: openai.OpenAI, tiny_lm: LoadedModel
) -> None:
    ids = prompt_ids(tiny_lm)
    done = client.completions.create(
        model=TINY_NAME, prompt=ids, max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    (choice,) = done.choices
    logprobs = choice.logprobs
    assert logprobs is not None
    assert logprobs.token_logprobs is not None
    assert logprobs.top_logprobs is not None
    assert logprobs.tokens is not None
    assert logprobs.text_offset is not None
    assert len(logprobs.tokens) == len(ids) + 3
    assert logprobs.token_logprobs[0] is None
    assert logprobs.top_logprobs[0] is None
    assert choice.text.startswith(PROMPT)
    assert "".join(logprobs.tokens[: len(ids)]) == PROMPT
    assert logprobs.text_offset[: len(ids)] == [
        len("".join(logprobs.tokens[:i])) for i in range(len(ids))
    ]
    generated = reference(tiny_lm, PROMPT, 3)
    expected = log_softmax(tiny_lm, ids + generated)
    for i, value in enumerate(logprobs.token_logprobs[1:]):
        token = (ids + generated)[i + 1]
        assert value == pytest.approx(expected[i, token].item(), abs=1e-4)
        # The two likeliest and the token itself, by text (texts of partial characters merge).
        top = logprobs.top_logprobs[i + 1]
        assert 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(expected[i].max().item(), abs=1e-4)


def test_max_tokens_0_with_echo_scores_the_prompt_alone(
    client: openai.OpenAI, tiny_lm: LoadedModel
) -> None:
    done = client.completions.create(
        model=TINY_NAME, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True
    )
    (choice,) = done.choices
    assert choice.text == PROMPT
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    assert len(choice.logprobs.token_logprobs) == len(prompt_ids(tiny_lm))
    assert done.usage is not None
    assert done.usage.completion_tokens == 0


def test_vllms_prompt_logprobs_list_each_prompt_token_by_id(
    http: httpx.Client, tiny_lm: LoadedModel
) -> None:
    ids = prompt_ids(tiny_lm)
    answer = http.post(
        "/v1/completions",
        json={"model": TINY_NAME, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 1},
    )
    assert answer.status_code == 200, answer.text
    entries = answer.json()["choices"][0]["prompt_logprobs"]
    assert entries[0] is None
    expected = log_softmax(tiny_lm, ids)
    for i, entry in enumerate(entries[1:]):
        token = str(ids[i + 1])
        assert entry[token]["logprob"] == pytest.approx(expected[i, ids[i + 1]].item(), abs=1e-4)


def test_a_prompt_list_gives_a_choice_per_prompt_and_n(
    client: openai.OpenAI, tiny_lm: LoadedModel
) -> None:
    prompts = ["Hello there", "Once upon a time"]
    done = client.completions.create(
        model=TINY_NAME, prompt=prompts, max_tokens=4, n=2, temperature=0
    )
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    alone = [
        client.completions.create(model=TINY_NAME, prompt=p, max_tokens=4, temperature=0)
        for p in prompts
    ]
    assert [c.text for c in done.choices] == [a.choices[0].text for a in alone for _ in "nn"]
    assert done.usage is not None
    assert done.usage.prompt_tokens == sum(len(prompt_ids(tiny_lm, p)) for p in prompts)
    id_prompts = [prompt_ids(tiny_lm, p) for p in prompts]
    by_ids = client.completions.create(
        model=TINY_NAME, prompt=id_prompts, max_tokens=4, temperature=0
    )
    assert [c.text for c in by_ids.choices] == [a.choices[0].text for a in alone]


def test_continuous_usage_stats_count_each_choices_tokens_so_far(
    http: httpx.Client, tiny_lm: LoadedModel
) -> None:
    body = {
        "model": TINY_NAME,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 6,
        "n": 2,
        "seed": 1,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    counts: dict[int, list[int]] = {0: [], 1: []}
    with http.stream("POST", "/v1/chat/completions", json=body) as answer:
        assert answer.status_code == 200
        lines = [line[6:] for line in answer.iter_lines() if line.startswith("data: {")]
    chunks = [orjson.loads(line) for line in lines]
    # The choices share their prompt: counted once in the total as in each choice's chunks.
    prompt_tokens = chunks[-1]["usage"]["prompt_tokens"]
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            if choice["delta"].get("content") and chunk["usage"] is not None:
                counts[choice["index"]].append(chunk["usage"]["completion_tokens"])
                assert chunk["usage"]["prompt_tokens"] == prompt_tokens
    for seen in counts.values():
        assert seen == sorted(seen)
        assert seen[-1] == 6
    assert chunks[-1]["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize(
    ("route", "body", "named"),
    [
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("completions", {"prompt": "x", "echo": True, "stream": True}, "echo"),
        ("completions", {"prompt": []}, "prompt"),
        ("completions", {"prompt": [[1, 2], []]}, "prompt"),
        ("completions", {"prompt": [-1]}, "prompt"),
        ("completions", {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ],
)
def test_bad_logprob_and_prompt_fields_get_a_422_naming_them(
    http: httpx.Client, route: str, body: dict[str, object], named: str
) -> None:
    fields: dict[str, object] = {"model": TINY_NAME, **body}
    if route.startswith("chat"):
        fields["messages"] = [{"role": "user", "content": "hi"}]
    answer = http.post(f"/v1/{route}", json=fields)
    assert answer.status_code == 422, answer.text
    assert named in answer.text


def test_a_token_id_outside_the_vocabulary_fails_its_request_with_a_400_naming_it(
    http: httpx.Client, tiny_lm: LoadedModel
) -> None:
    too_big = len(tiny_lm.tokenizer) + 5
    answer = http.post(
        "/v1/completions", json={"model": TINY_NAME, "prompt": [1, too_big], "max_tokens": 2}
    )
    assert answer.status_code == 400, answer.text
    assert str(too_big) in answer.json()["error"]["message"]


def test_native_token_events_carry_their_logprobs_and_counts_and_the_result_holds_all(
    http: httpx.Client, tiny_lm: LoadedModel
) -> None:
    body = {
        "prompt": PROMPT,
        "max_new_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 1,
        "prompt_logprobs": 0,
        "return_token_ids": True,
        "echo": True,
    }
    events = read_stream(http, "POST", "/v1/generate", json={**body, "stream": True})
    tokens = [orjson.loads(e.data) for e in events if e.event == "token"]
    (done,) = [orjson.loads(e.data) for e in events if e.event == "done"]
    result = done["result"]
    ids = prompt_ids(tiny_lm)
    assert tokens[0]["prompt_tokens"] == len(ids)
    assert all("prompt_tokens" not in event for event in tokens[1:])
    assert [event["tokens"] for event in tokens] == sorted(event["tokens"] for event in tokens)
    streamed = [TokenLogprob.model_validate(e) for event in tokens for e in event["logprobs"]]
    assert streamed == [TokenLogprob.model_validate(entry) for entry in result["logprobs"]]
    assert result["prompt_token_ids"] == ids
    assert result["token_ids"] == reference(tiny_lm, PROMPT, 6)
    # Each event's ids are those of the tokens its logprobs are of.
    assert [event["ids"] for event in tokens] == [
        [e["id"] for e in event["logprobs"]] for event in tokens
    ]
    assert [i for event in tokens for i in event["ids"]] == result["token_ids"]
    assert result["prompt_text"] == PROMPT
    expected = log_softmax(tiny_lm, ids + result["token_ids"])
    for i, entry in enumerate(result["logprobs"]):
        assert entry["id"] == result["token_ids"][i]
        assert entry["logprob"] == pytest.approx(
            expected[len(ids) - 1 + i, entry["id"]].item(), abs=1e-4
        )
        assert len(entry["top_logprobs"]) == 1
    assert [entry["id"] for entry in result["prompt_logprobs"]] == ids
    assert result["prompt_logprobs"][0]["logprob"] is None


def test_native_max_new_tokens_0_reads_the_prompt_alone(
    http: httpx.Client, tiny_lm: LoadedModel
) -> None:
    answer = http.post(
        "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 0, "return_token_ids": True}
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()["result"]
    assert (result["text"], result["token_ids"]) == ("", [])
    assert result["prompt_token_ids"] == prompt_ids(tiny_lm)
    assert result["usage"]["completion_tokens"] == 0


def test_the_result_cache_tells_requests_apart_by_their_logprob_fields(http: httpx.Client) -> None:
    plain = {"prompt": PROMPT, "max_new_tokens": 3, "temperature": 0}
    first = http.post("/v1/generate", json=plain).json()
    again = http.post("/v1/generate", json=plain).json()
    assert (again["id"], again["cached"]) == (first["id"], True)
    for extra in ({"logprobs": 1}, {"prompt_logprobs": 0}, {"echo": True}):
        other = http.post("/v1/generate", json={**plain, **extra}).json()
        assert other["id"] != first["id"]
        assert not other["cached"]
