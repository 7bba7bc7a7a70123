"""Tool calling on the OpenAI chat route: tools rendered by the chat template, calls forced by a
JSON schema (`required`, a named function) or read out of the model's own format (`auto`), as
answers and as streamed deltas; the tools' answers in a second turn. The official `openai`
client on the tiny model's stack, and the default model where the model's own behaviour
matters."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam, ChatCompletionToolParam

from common.contract import TOOLS, WorkRequest, required_features
from common.settings import Settings
from gateway.openai.tools import Call, ToolReader, call_schema, parse_hermes
from gateway.schemas import GenerationRequest, Tool
from tests.conftest import TINY_NAME, Stack
from worker.engine.chat import template_input, tool_objects
from worker.engine.generation import build_prompt_ids
from worker.engine.model import LoadedModel

WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}, "seconds": {"type": "boolean"}},
            "required": ["zone", "seconds"],
            "additionalProperties": False,
        },
    },
}
TOOLS_GIVEN = [WEATHER, TIME]
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Paris?"}]


def parameters(name: str) -> dict[str, Any]:
    (tool,) = [tool for tool in TOOLS_GIVEN if tool["function"]["name"] == name]
    return dict(tool["function"].get("parameters") or {})


def assert_valid_call(answer: ChatCompletion) -> tuple[str, dict[str, Any]]:
    """The answer's one tool call, its arguments valid for its function."""
    (choice,) = answer.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, parameters(call.function.name))
    return call.function.name, arguments


@pytest.fixture
def client(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0) as c:
        yield c


# The readers


def test_hermes_calls_are_read_with_the_text_around_them() -> None:
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    )
    read = parse_hermes(text)
    assert read is not None
    assert read.content == "Let me check.\n\n"
    assert [(c.name, json.loads(c.arguments)) for c in read.calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "UTC"}),
    ]
    # SmolLM2 writes a list of calls in one tag; a call left open at the end is read too.
    listed = parse_hermes('<tool_call>[{"name": "a", "arguments": {}}, {"name": "b"}]')
    assert listed is not None
    assert listed.content is None
    assert [(c.name, c.arguments) for c in listed.calls] == [("a", "{}"), ("b", "{}")]


@pytest.mark.parametrize(
    "text",
    [
        "no call here",
        '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',
        '<tool_call>{"arguments": {}}</tool_call>',
        "<tool_call>[]</tool_call>",
    ],
)
def test_an_answer_without_a_call_that_parses_stays_text(text: str) -> None:
    assert parse_hermes(text) is None
    assert ToolReader("auto", parser="hermes").read(text) is None


def test_forced_answers_are_read_as_their_calls() -> None:
    required = ToolReader("required", parallel=False)
    read = required.read('[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]')
    assert read is not None
    assert [(c.name, c.arguments) for c in read.calls] == [("a", '{"x": 1}')]
    named = ToolReader("named", function="f").read('{"x":1}')
    assert named is not None
    assert [(c.name, c.arguments) for c in named.calls] == [("f", '{"x":1}')]
    # Cut short by max_tokens: text, and the finish reason says why.
    assert required.read('[{"name": "a", "par') is None


@pytest.mark.parametrize(
    "text",
    [
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n',
        '\n<tool_call>{"name": "get_weather", "arguments": {}}</tool_call> and after',
        "a < b, <tool and <tool_cal are no calls",
        '<tool_call>{"name": broken}</tool_call>',
        "  ",
    ],
)
def test_a_streamed_auto_answer_adds_up_to_the_whole_one(text: str) -> None:
    reader = ToolReader("auto", parser="hermes")
    whole = reader.read(text)
    rng = random.Random(7)
    for _ in range(20):
        stream, sent, at = reader.stream(), "", 0
        while at < len(text):
            step = rng.randint(1, 4)
            sent += stream.feed(text[at : at + step])
            at += step
        rest, read = stream.finish(text)
        sent += rest
        if whole is None:
            assert read is None
            assert sent == text
        else:
            assert read is not None
            assert sent == (whole.content or "")
            assert [(c.name, c.arguments) for c in read.calls] == [
                (c.name, c.arguments) for c in whole.calls
            ]


def test_the_required_schema_takes_one_call_of_any_tool_unless_parallel() -> None:
    tools = [Tool.model_validate(tool) for tool in TOOLS_GIVEN]
    one = call_schema(tools, None, parallel=False)
    call = {"name": "get_time", "parameters": {"zone": "UTC", "seconds": True}}
    jsonschema.validate([call], one)
    for wrong in ([], [call, call], [{"name": "get_time", "parameters": {"city": "Paris"}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, one)
    jsonschema.validate([call, call], call_schema(tools, None, parallel=True))
    assert call_schema(tools, "get_time", parallel=True) == parameters("get_time")


# The prompt


def test_a_template_without_tools_gets_them_in_the_hermes_convention(tiny_lm: LoadedModel) -> None:
    request = GenerationRequest.model_validate(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                *ASK,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
                {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
            ],
            "tools": TOOLS_GIVEN,
        }
    )
    prompt = str(tiny_lm.tokenizer.decode(build_prompt_ids(tiny_lm, request)))
    assert prompt.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(WEATHER) in prompt
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>\n'
    ) in prompt
    assert (
        "<|im_start|>user\n<tool_response>\n22 C\n</tool_response>\n<tool_response>\nsunny\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ) in prompt


def test_a_template_that_renders_tools_gets_them_as_transformers_passes_them() -> None:
    template = "{{ tools | tojson }}{% for m in messages %}{{ m | tojson }}{% endfor %}"
    request = GenerationRequest.model_validate(
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
                        }
                    ],
                }
            ],
            "tools": [TIME],
        }
    )
    assert request.messages is not None
    assert request.tools is not None
    messages, tools = template_input(template, request.messages, tool_objects(request.tools))
    assert tools == [TIME]
    call = {
        "id": "c",
        "type": "function",
        "function": {"name": "get_time", "arguments": {"zone": "UTC"}},
    }
    assert messages == [{"role": "assistant", "content": "", "tool_calls": [call]}]


def test_a_work_item_with_tools_requires_a_worker_that_renders_them() -> None:
    plain = WorkRequest.model_validate({"messages": ASK})
    assert TOOLS not in required_features(plain, None, 8)
    with_tools = WorkRequest.model_validate({"messages": ASK, "tools": [WEATHER]})
    answered = WorkRequest.model_validate(
        {"messages": [{"role": "tool", "tool_call_id": "c", "content": "22 C"}]}
    )
    assert TOOLS in required_features(with_tools, None, 8)
    assert TOOLS in required_features(answered, None, 8)


# On the tiny model's stack


def test_a_required_tool_call_parses_and_a_second_turn_answers_in_text(
    client: openai.OpenAI,
) -> None:
    answer = client.chat.completions.create(
        model=TINY_NAME,
        messages=ASK,
        tools=TOOLS_GIVEN,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
        seed=1,
    )
    assert_valid_call(answer)
    message = answer.choices[0].message
    (call,) = message.tool_calls or []
    history: list[Any] = [*ASK, message, {"role": "tool", "tool_call_id": call.id, "content": "22"}]
    then = client.chat.completions.create(
        model=TINY_NAME, messages=history, tools=TOOLS_GIVEN, max_tokens=8, seed=1
    )
    (choice,) = then.choices
    assert choice.message.tool_calls is None
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")


def test_a_named_function_is_called_with_arguments_of_its_schema(client: openai.OpenAI) -> None:
    for seed in range(3):
        answer = client.chat.completions.create(
            model=TINY_NAME,
            messages=ASK,
            tools=TOOLS_GIVEN,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            max_tokens=64,
            temperature=1.0,
            seed=seed,
        )
        name, _ = assert_valid_call(answer)
        assert name == "get_time"


def test_streamed_tool_call_deltas_add_up_to_the_answers_call(client: openai.OpenAI) -> None:
    asked: dict[str, Any] = {
        "model": TINY_NAME,
        "messages": ASK,
        "tools": TOOLS_GIVEN,
        "tool_choice": "required",
        "max_tokens": 64,
        "seed": 11,
        "parallel_tool_calls": False,
    }
    whole = client.chat.completions.create(**asked)
    expected = assert_valid_call(whole)
    calls: dict[int, dict[str, str]] = {}
    finish, content = None, ""
    for chunk in client.chat.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                assert delta.function is not None
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [expected]


def test_tool_choice_none_and_auto_answer_text_the_model_writes(client: openai.OpenAI) -> None:
    asked: dict[str, Any] = {"model": TINY_NAME, "messages": ASK, "max_tokens": 8, "seed": 3}
    plain = client.chat.completions.create(**asked, tools=TOOLS_GIVEN, tool_choice="none")
    auto = client.chat.completions.create(**asked, tools=TOOLS_GIVEN)
    # The tiny model's vocabulary cannot write a call's tag: both are its text.
    assert plain.choices[0].message.content == auto.choices[0].message.content
    assert auto.choices[0].message.tool_calls is None
    assert auto.choices[0].finish_reason in ("stop", "length")


def test_bad_tools_and_tool_choices_are_422s_naming_the_problem(client: openai.OpenAI) -> None:
    create = client.chat.completions.create
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {
                "tools": TOOLS_GIVEN,
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "'nope'",
        ),
        ({"tool_choice": "required"}, "`tool_choice` needs `tools`"),
        ({"tools": [WEATHER, WEATHER]}, "given more than once: \\['get_weather'\\]"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "name"),
        (
            {
                "tools": TOOLS_GIVEN,
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "forced `tool_choice`",
        ),
    ]
    for fields, match in cases:
        with pytest.raises(openai.UnprocessableEntityError, match=match):
            create(model=TINY_NAME, messages=ASK, **fields)
    unanswered: list[Any] = [*ASK, {"role": "tool", "content": "22"}]
    with pytest.raises(openai.UnprocessableEntityError, match="tool_call_id"):
        create(model=TINY_NAME, messages=unanswered)


def test_many_distinct_tools_are_counted_by_name(client: openai.OpenAI) -> None:
    many = [
        {"type": "function", "function": {"name": f"f{i}"}} for i in range(Settings().max_tools + 1)
    ]
    with pytest.raises(openai.UnprocessableEntityError, match="GENQ_MAX_TOOLS"):
        client.chat.completions.create(model=TINY_NAME, messages=ASK, tools=many)  # type: ignore[arg-type]


def test_a_parameters_schema_the_grammar_library_refuses_is_a_400(client: openai.OpenAI) -> None:
    broken: ChatCompletionToolParam = {
        "type": "function",
        "function": {
            "name": "broken",
            "parameters": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
        },
    }
    choices: list[Any] = ["required", {"type": "function", "function": {"name": "broken"}}]
    for choice in choices:
        with pytest.raises(openai.BadRequestError, match=r"tools: .*missing") as caught:
            client.chat.completions.create(
                model=TINY_NAME, messages=ASK, tools=[broken], tool_choice=choice
            )
        assert caught.value.code == "invalid_structured_output"
    # Not forced, the schema is only text for the model.
    client.chat.completions.create(model=TINY_NAME, messages=ASK, tools=[broken], max_tokens=2)


# The default model


def test_the_default_model_calls_a_tool_and_answers_with_its_result(default_stack: str) -> None:
    with openai.OpenAI(base_url=f"{default_stack}/v1", api_key="unused", max_retries=0) as client:
        forced = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=ASK,
            tools=TOOLS_GIVEN,
            tool_choice="required",
            temperature=0,
            max_tokens=64,
        )
        assert_valid_call(forced)
        (call,) = forced.choices[0].message.tool_calls or []
        history: list[Any] = [
            *ASK,
            forced.choices[0].message,
            {"role": "tool", "tool_call_id": call.id, "content": "22 degrees, sunny"},
        ]
        then = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=history,
            tools=TOOLS_GIVEN,
            tool_choice="none",
            temperature=0,
            max_tokens=32,
        )
        assert then.choices[0].message.content
        # `auto` reads what the model writes: its own text with "none", read by the parser.
        asked: dict[str, Any] = {
            "model": "smollm2-135m-instruct",
            "messages": ASK,
            "tools": TOOLS_GIVEN,
            "temperature": 0,
            "max_tokens": 64,
        }
        text = client.chat.completions.create(**asked, tool_choice="none")
        raw = text.choices[0].message.content or ""
        auto = client.chat.completions.create(**asked, tool_choice="auto")
        read = parse_hermes(raw)
        message = auto.choices[0].message
        if read is None:
            assert message.content == raw
            assert message.tool_calls is None
        else:
            assert auto.choices[0].finish_reason == "tool_calls"
            assert message.content == read.content
            assert [
                Call(c.function.name, c.function.arguments, c.id) for c in message.tool_calls or []
            ] == [
                Call(c.name, c.arguments, got.id)
                for c, got in zip(read.calls, message.tool_calls or [], strict=True)
            ]
