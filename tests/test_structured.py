"""Structured output: in the engine, rows constrained by llguidance grammars sample only what
their grammar allows, end where it ends, on both decode paths, and leave their neighbours alone;
through the API, every spelling of it constrains the answer, and what the library refuses is a
400 naming the problem."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace

import httpx
import jsonschema
import pytest
from llguidance import LLMatcher

from gateway.schemas import StructuredOutputs
from gateway.services.structured import grammar_text
from tests.conftest import TINY_NAME, Stack
from tests.engine_driver import PROMPTS, Job, greedy, reference, run
from worker.engine.config import DecodeConfig
from worker.engine.model import LoadedModel

PATHS = {"eager": DecodeConfig(static="off"), "static": DecodeConfig(static="on")}

SCHEMAS: list[dict[str, object]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "kind": {"enum": ["cat", "dog", "fish"]},
        },
        "required": ["name", "age", "kind"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}},
                    "required": ["id"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["items", "ok"],
        "additionalProperties": False,
    },
]


def grammar(**spec: object) -> str:
    return grammar_text(StructuredOutputs.model_validate(spec))


@pytest.mark.parametrize("path", PATHS)
def test_every_sampled_answer_follows_its_schema_and_ends_with_it(
    tiny_lm: LoadedModel, path: str
) -> None:
    sampled = replace(greedy(120), temperature=0.8)
    jobs = [
        Job(
            f"{s}-{seed}",
            PROMPTS[seed % 3],
            replace(sampled, seed=seed, grammar=grammar(json=schema)),
        )
        for s, schema in enumerate(SCHEMAS)
        for seed in range(6)
    ]
    out = run(tiny_lm, jobs, decode=PATHS[path])
    assert not out.errors
    for job in jobs:
        done = out.done[job.id]
        assert done.finish_reason == "stop", (job.id, done.text)
        jsonschema.validate(json.loads(done.text), SCHEMAS[int(job.id.split("-")[0])])


def test_regex_and_choice_answers_match_and_a_free_neighbour_is_untouched(
    tiny_lm: LoadedModel,
) -> None:
    sampled = replace(greedy(30), temperature=1.0)
    pattern = r"(cat|dog)s? [0-9]{2}"
    choices = ["red", "green", "light blue"]
    jobs = [
        Job(f"re{i}", PROMPTS[i % 3], replace(sampled, seed=i, grammar=grammar(regex=pattern)))
        for i in range(4)
    ]
    jobs += [
        Job(f"ch{i}", PROMPTS[i % 3], replace(sampled, seed=i, grammar=grammar(choice=choices)))
        for i in range(4)
    ]
    jobs.append(Job("free", PROMPTS[1], greedy(12)))
    out = run(tiny_lm, jobs)
    for i in range(4):
        assert re.fullmatch(pattern, out.done[f"re{i}"].text)
        assert out.done[f"ch{i}"].text in choices
    assert out.done["free"].token_ids == reference(tiny_lm, PROMPTS[1], 12)


def test_a_seeded_constrained_row_samples_the_same_alone_as_in_a_batch(
    tiny_lm: LoadedModel,
) -> None:
    params = replace(greedy(80), temperature=0.9, seed=21, grammar=grammar(json=SCHEMAS[0]))
    alone = run(tiny_lm, [Job("a", PROMPTS[2], params)]).done["a"]
    crowd = [
        Job(f"b{i}", PROMPTS[i % 3], replace(params, seed=i, grammar=grammar(json=SCHEMAS[1])))
        for i in range(4)
    ]
    crowd.append(Job("free", PROMPTS[0], greedy(20)))
    batched = run(tiny_lm, [*crowd, Job("a", PROMPTS[2], params, at_step=3)]).done["a"]
    assert batched.token_ids == alone.token_ids


def test_a_grammar_the_library_refuses_fails_its_own_request_only(tiny_lm: LoadedModel) -> None:
    broken = LLMatcher.grammar_from_lark("start: undefined_rule")
    jobs = [
        Job("bad", PROMPTS[0], replace(greedy(5), grammar=broken)),
        Job("ok", PROMPTS[1], greedy(5)),
    ]
    out = run(tiny_lm, jobs)
    assert "grammar" in str(out.errors["bad"])
    assert out.done["ok"].token_ids == reference(tiny_lm, PROMPTS[1], 5)


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base, timeout=60) as c:
        yield c


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "nonsense"),
        ({"json": '{"type": "object"'}, "json"),
        ({"regex": "(unclosed"}, "structured_outputs"),
        ({"grammar": "start: undefined_rule"}, "undefined_rule"),
    ],
)
def test_a_schema_or_grammar_the_library_refuses_is_a_400_naming_the_problem(
    http: httpx.Client, spec: dict[str, object], named: str
) -> None:
    native = http.post("/v1/jobs", json={"prompt": "x", "structured_outputs": spec})
    assert native.status_code == 400, native.text
    assert native.json()["error"]["code"] == "invalid_structured_output"
    assert named in native.json()["error"]["message"]
    chat = http.post(
        "/v1/chat/completions",
        json={
            "model": TINY_NAME,
            "messages": [{"role": "user", "content": "x"}],
            "structured_outputs": spec,
        },
    )
    assert chat.status_code == 400, chat.text
    assert named in chat.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of"),
        ({"structured_outputs": {}}, "exactly one of"),
        ({"structured_outputs": {"choice": []}}, "choice"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_conflicting_or_malformed_structured_outputs_are_a_422_naming_them(
    http: httpx.Client, body: dict[str, object], named: str
) -> None:
    answer = http.post(
        "/v1/chat/completions",
        json={"model": TINY_NAME, "messages": [{"role": "user", "content": "x"}], **body},
    )
    assert answer.status_code == 422, answer.text
    assert named in answer.text


def test_a_structured_output_past_its_limit_is_refused_naming_the_setting(
    http: httpx.Client,
) -> None:
    huge = {"choice": [f"option {i} " * 20 for i in range(1000)]}
    answer = http.post("/v1/jobs", json={"prompt": "x", "structured_outputs": huge})
    assert answer.status_code == 422, answer.text
    assert "GENQ_MAX_GRAMMAR_CHARS" in answer.json()["error"]["message"]


def test_openai_spellings_constrain_the_answer(http: httpx.Client) -> None:
    def chat(**fields: object) -> str:
        body = {
            "model": TINY_NAME,
            "messages": [{"role": "user", "content": "Pick one"}],
            "max_tokens": 60,
            "temperature": 0.7,
            "seed": 3,
            **fields,
        }
        answer = http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        return str(choice["message"]["content"])

    assert chat(guided_choice=["yes", "no"]) in ("yes", "no")
    assert re.fullmatch("[a-c]{3}", chat(guided_regex="[a-c]{3}"))
    schema = {"name": "pet", "schema": SCHEMAS[0], "strict": True}
    pet = json.loads(chat(response_format={"type": "json_schema", "json_schema": schema}))
    jsonschema.validate(pet, SCHEMAS[0])
    completion = http.post(
        "/v1/completions",
        json={
            "model": TINY_NAME,
            "prompt": "x",
            "max_tokens": 20,
            "structured_outputs": {"regex": "[0-9]{4}"},
        },
    )
    assert re.fullmatch("[0-9]{4}", completion.json()["choices"][0]["text"])


def test_the_result_cache_tells_structured_outputs_apart(http: httpx.Client) -> None:
    plain = {"prompt": "Pick", "max_new_tokens": 12, "temperature": 0}
    first = http.post("/v1/generate", json={**plain, "structured_outputs": {"regex": "[ab]{4}"}})
    again = http.post("/v1/generate", json={**plain, "structured_outputs": {"regex": "[ab]{4}"}})
    other = http.post("/v1/generate", json={**plain, "structured_outputs": {"regex": "[cd]{4}"}})
    assert (again.json()["id"], again.json()["cached"]) == (first.json()["id"], True)
    assert other.json()["id"] != first.json()["id"]
    assert re.fullmatch("[cd]{4}", other.json()["result"]["text"])
