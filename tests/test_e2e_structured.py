"""Structured output end to end with the default model: the official client's typed parsing,
sampled answers that all validate, and a constrained native stream resumed after a drop."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Literal

import httpx
import jsonschema
import openai
import orjson
import pytest
from httpx_sse import connect_sse
from pydantic import BaseModel, Field

from bench.structured import STRUCTURED_SCHEMAS
from common.settings import DEFAULT_MODEL_NAME

MODEL = DEFAULT_MODEL_NAME
SCHEMAS: list[dict[str, object]] = [
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "country": {"type": "string", "maxLength": 40},
            "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
        },
        "required": ["city", "country", "population_millions"],
        "additionalProperties": False,
    },
    STRUCTURED_SCHEMAS[1],  # a book: an enum, bounded integers, an array of objects
]
ASKS = ["Describe a big city as JSON.", "Invent a short book, as JSON."]
JSON_ASKS = [
    "A JSON object with a color and a number.",
    "Answer in JSON: what is 2+2?",
    "A JSON object with a name and an age.",
]


class Pet(BaseModel):
    name: str = Field(max_length=20)
    species: Literal["cat", "dog", "parrot"]
    age: int = Field(ge=0, le=30)


@pytest.fixture
def client(default_stack: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{default_stack}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_the_clients_parse_returns_a_typed_object(client: openai.OpenAI) -> None:
    done = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a pet as JSON."}],
        response_format=Pet,
        temperature=0,
        max_tokens=80,
    )
    pet = done.choices[0].message.parsed
    assert isinstance(pet, Pet)
    assert done.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("which", [0, 1])
def test_every_sampled_answer_validates(client: openai.OpenAI, which: int) -> None:
    done = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": ASKS[which]}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": SCHEMAS[which], "strict": True},
        },
        temperature=0.8,
        seed=which,
        n=8,
        max_tokens=200,
    )
    assert len(done.choices) == 8
    for choice in done.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMAS[which])


def test_json_object_choice_and_regex_answers_hold(client: openai.OpenAI) -> None:
    def ask(content: str, extra_body: dict[str, object]) -> list[str]:
        done = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            temperature=0.8,
            seed=5,
            n=4,
            max_tokens=120,
            extra_body=extra_body,
        )
        return [choice.message.content or "" for choice in done.choices]

    # Free-form objects: greedy, since this small model sampling an object with no schema
    # rambles on past any max_tokens (the grammar keeps it JSON, not short).
    for content in JSON_ASKS:
        done = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            temperature=0,
            max_tokens=200,
            response_format={"type": "json_object"},
        )
        assert done.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(done.choices[0].message.content or ""), dict)
    colors = ["red", "green", "blue"]
    for text in ask("Name a color.", {"structured_outputs": {"choice": colors}}):
        assert text in colors
    date = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9])"
    for text in ask("When is the next holiday?", {"guided_regex": date}):
        assert re.fullmatch(date, text)


def test_a_constrained_native_stream_resumed_after_a_drop_validates(default_stack: str) -> None:
    body = {
        "messages": [{"role": "user", "content": ASKS[1]}],
        "structured_outputs": {"json": SCHEMAS[1]},
        "temperature": 0.8,
        "seed": 9,
        "max_new_tokens": 200,
    }
    with httpx.Client(base_url=default_stack, timeout=120) as http:
        job = http.post("/v1/jobs", json=body).json()
        events = f"/v1/jobs/{job['id']}/events"
        seen = []
        with connect_sse(http, "GET", events) as source:
            for event in source.iter_sse():
                seen.append(event)
                if len(seen) == 3:
                    break  # the connection drops here
        with connect_sse(http, "GET", events, headers={"Last-Event-ID": seen[-1].id}) as source:
            seen += list(source.iter_sse())
    tokens = [orjson.loads(e.data) for e in seen if e.event == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    (done,) = [orjson.loads(e.data) for e in seen if e.event == "done"]
    text = done["result"]["text"]
    assert "".join(t["text"] for t in tokens) == text
    jsonschema.validate(json.loads(text), SCHEMAS[1])
