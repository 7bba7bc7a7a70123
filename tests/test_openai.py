"""The OpenAI-compatible routes, through the official `openai` client."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from openai.types import CompletionChoice
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import TINY_KEY, TINY_NAME, Stack


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0) as c:
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
    with pytest.raises(openai.UnprocessableEntityError, match="only n=1"):
        client.completions.create(model=TINY_NAME, prompt="x", n=2)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.completions.create(model="gpt-17", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.completions.create(model=TINY_NAME, prompt="word " * 1100, max_tokens=10)
