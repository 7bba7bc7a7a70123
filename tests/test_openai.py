"""The OpenAI-compatible routes, through the official `openai` client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from httpx_sse import connect_sse
from openai.types import CompletionChoice
from openai.types.chat import ChatCompletionMessageParam

from common.settings import Settings
from tests.conftest import TINY_KEY, TINY_NAME, Stack
from tests.sse import read_stream

# Runs past end-of-sequence: every choice has max_tokens tokens.
ALL_TOKENS = {"ignore_eos": True}


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base, timeout=60) as c:
        yield c


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [TINY_NAME]


def test_completion(client: openai.OpenAI) -> None:
    done = client.completions.create(
        model=TINY_NAME, prompt="Once upon a time", max_tokens=12, temperature=0
    )
    assert done.object == "text_completion"
    assert done.model == TINY_KEY
    (choice,) = done.choices
    assert choice.finish_reason in ("length", "stop")
    assert done.usage is not None
    assert done.usage.completion_tokens <= 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_completion_stream_adds_up_to_the_completion(client: openai.OpenAI) -> None:
    kwargs = {"model": TINY_NAME, "prompt": "Hello", "max_tokens": 20, "temperature": 0.0}
    whole = client.completions.create(**kwargs).choices[0].text  # type: ignore[call-overload]
    chunks = list(
        client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_chat_completion_and_stream(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi there"}]
    done = client.chat.completions.create(
        model=TINY_NAME, messages=messages, max_tokens=15, temperature=0, seed=1
    )
    assert done.object == "chat.completion"
    text = done.choices[0].message.content
    assert done.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=TINY_NAME, messages=messages, max_tokens=15, temperature=0, seed=1, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_usage_counts_prompt_tokens_served_from_the_prefix_cache(client: openai.OpenAI) -> None:
    system = "You are a careful assistant: answer briefly, precisely, and in plain words."

    def ask(question: str) -> int:
        done = client.chat.completions.create(
            model=TINY_NAME,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            max_tokens=4,
            temperature=0,
        )
        assert done.usage is not None
        assert done.usage.prompt_tokens_details is not None
        return done.usage.prompt_tokens_details.cached_tokens or 0

    ask("What is the capital of France?")
    # The second prompt starts with the first's chat template and system prompt.
    assert ask("Tell me about the quick brown fox.") >= 16


def test_stop_and_seed(client: openai.OpenAI) -> None:
    def sample(stop: list[str] | None = None) -> CompletionChoice:
        done = client.completions.create(
            model=TINY_NAME, prompt="Once", max_tokens=20, seed=9, stop=stop
        )
        return done.choices[0]

    first = sample().text
    assert sample().text == first
    stop = first[5:7]
    cut = sample([stop])
    assert cut.finish_reason == "stop"
    assert cut.text == first[: first.index(stop)]


def test_unsupported_parameters_get_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError, match="GENQ_MAX_CHOICES"):
        client.completions.create(model=TINY_NAME, prompt="x", n=Settings().max_choices + 1)
    with pytest.raises(openai.UnprocessableEntityError, match=r"n: .* greater than or equal to 1"):
        client.completions.create(model=TINY_NAME, prompt="x", n=0)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="gpt-17", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.completions.create(model=TINY_NAME, prompt="word " * 1100, max_tokens=10)


def test_n_choices_are_the_answers_to_seed_plus_i_and_their_usage_adds_up(
    client: openai.OpenAI,
) -> None:
    kwargs: dict[str, Any] = {
        "model": TINY_NAME,
        "prompt": "Once upon a time",
        "max_tokens": 12,
        "extra_body": ALL_TOKENS,
    }
    done = client.completions.create(**kwargs, n=3, seed=40)
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert [c.finish_reason for c in done.choices] == ["length"] * 3
    assert len({c.text for c in done.choices}) == 3
    singles = [client.completions.create(**kwargs, seed=40 + i) for i in range(3)]
    assert [c.text for c in done.choices] == [s.choices[0].text for s in singles]
    usages = [s.usage for s in singles]
    assert done.usage is not None
    assert usages[0] is not None
    assert all(u is not None for u in usages)
    assert done.usage.prompt_tokens == usages[0].prompt_tokens
    assert done.usage.completion_tokens == sum(u.completion_tokens for u in usages if u)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert done.usage.prompt_tokens_details == usages[0].prompt_tokens_details


def test_greedy_choices_are_equal(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something"}]
    kwargs: dict[str, Any] = {"model": TINY_NAME, "messages": messages, "max_tokens": 10}
    greedy = client.chat.completions.create(**kwargs, temperature=0).choices[0].message.content
    done = client.chat.completions.create(**kwargs, temperature=0, n=2)
    assert [c.index for c in done.choices] == [0, 1]
    assert [c.message.content for c in done.choices] == [greedy, greedy]


def test_a_retry_with_the_same_idempotency_key_gets_the_same_choices(
    client: openai.OpenAI,
) -> None:
    # Unseeded: without the key, each request would draw seeds of its own.
    kwargs: dict[str, Any] = {
        "model": TINY_NAME,
        "prompt": "Retry me",
        "max_tokens": 12,
        "n": 2,
        "extra_body": ALL_TOKENS,
        "extra_headers": {"Idempotency-Key": f"choices-{time.time_ns()}"},
    }
    first = client.completions.create(**kwargs)
    retry = client.completions.create(**kwargs)
    assert retry.id == first.id
    assert [c.text for c in retry.choices] == [c.text for c in first.choices]
    assert first.choices[0].text != first.choices[1].text


def test_a_stream_of_n_choices_interleaves_them_and_sums_their_usage(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story"}]
    body: dict[str, Any] = {
        "model": TINY_NAME,
        "messages": messages,
        "max_tokens": 8,
        "seed": 7,
        "n": 2,
    }
    stream = {"stream": True, "stream_options": {"include_usage": True}, **ALL_TOKENS}
    events = read_stream(http, "POST", "/v1/chat/completions", json={**body, **stream})
    assert events[-1].data == "[DONE]"
    chunks = [orjson.loads(e.data) for e in events[:-1]]
    *deltas, last = chunks
    assert last["choices"] == []
    assert len({c["id"] for c in chunks}) == 1
    assert all(len(c["choices"]) == 1 for c in deltas)
    by_index: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for c in deltas:
        by_index[c["choices"][0]["index"]].append(c["choices"][0])
    done = client.chat.completions.create(**body, extra_body=ALL_TOKENS)
    for index, choices in by_index.items():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1)
        assert choices[-1]["finish_reason"] == "length"
        text = "".join(c["delta"].get("content") or "" for c in choices)
        assert text == done.choices[index].message.content
    assert done.usage is not None
    assert last["usage"] == done.usage.model_dump(exclude_none=True)


def test_a_client_that_leaves_a_stream_of_n_choices_cancels_every_job(
    http: httpx.Client,
) -> None:
    # Long enough (seconds on the tiny model) for the client to leave mid-generation; unseeded,
    # so that no earlier job serves it.
    body = {"model": TINY_NAME, "prompt": "Leave me", "max_tokens": 900, "n": 2, **ALL_TOKENS}
    with connect_sse(http, "POST", "/v1/completions", json={**body, "stream": True}) as source:
        job_ids = source.response.headers["x-genq-job-id"].split(", ")
        first = next(source.iter_sse())
        assert orjson.loads(first.data)["object"] == "text_completion"  # it is running
    assert len(set(job_ids)) == 2
    for job_id in job_ids:
        deadline = time.monotonic() + 30
        while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, f"job {job_id} was not cancelled"
            time.sleep(0.05)
        assert job["status"] == "cancelled"
        assert job["result"]["usage"]["completion_tokens"] < 900
