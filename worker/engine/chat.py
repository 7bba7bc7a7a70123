"""A request's messages and tools as a chat template takes them.

A template that renders tools (one that names `tools` or `tool_calls`, as Qwen's, Hermes' and
Llama 3.1's do) gets them as vLLM passes them through transformers: OpenAI's tool objects, and an
assistant's tool calls with their arguments as objects, which templates write with `tojson`.

A template that does not (SmolLM2's) would drop them without a word, and the model could not know
what it may call. Such a template gets the Hermes convention written into the messages instead,
as Qwen 2.5's template renders it: the tools in the system prompt, an assistant's calls as
`<tool_call>` blocks in its text, the tools' answers as `<tool_response>` blocks in a user turn.
The gateway's `hermes` parser reads those calls back."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class FunctionCall(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def arguments(self) -> str: ...


class ToolCall(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def function(self) -> FunctionCall: ...


class Message(Protocol):
    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str | None: ...

    @property
    def tool_calls(self) -> Sequence[ToolCall] | None: ...

    @property
    def tool_call_id(self) -> str | None: ...


class Function(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str | None: ...

    @property
    def parameters(self) -> Mapping[str, object] | None: ...


class Tool(Protocol):
    @property
    def function(self) -> Function: ...


Rendered = list[dict[str, Any]]

_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def renders_tools(template: str) -> bool:
    """Whether the chat template itself renders tools and tool calls."""
    return "tools" in template or "tool_calls" in template


def tool_objects(tools: Sequence[Tool]) -> Rendered:
    """OpenAI's tool objects, as templates read them."""
    rendered: Rendered = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.function.name}
        if tool.function.description is not None:
            function["description"] = tool.function.description
        if tool.function.parameters is not None:
            function["parameters"] = dict(tool.function.parameters)
        rendered.append({"type": "function", "function": function})
    return rendered


def template_input(
    template: str, messages: Sequence[Message], tools: Rendered | None
) -> tuple[Rendered, Rendered | None]:
    """The messages and tools (`tool_objects`) to give `template`."""
    if renders_tools(template):
        return [_as_template_reads(m) for m in messages], tools
    return _hermes(messages, tools), None


def _as_template_reads(message: Message) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": message.role, "content": message.content or ""}
    if message.tool_calls:
        rendered["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": _arguments(call)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


def _arguments(call: ToolCall) -> object:
    """A call's arguments as an object; text that is not JSON stays text."""
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


def _hermes(messages: Sequence[Message], tools: Rendered | None) -> Rendered:
    rendered: Rendered = []
    for message in messages:
        content = message.content or ""
        if message.role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if rendered and rendered[-1].get("answers_tools"):
                rendered[-1]["content"] += "\n" + response
            else:
                rendered.append({"role": "user", "content": response, "answers_tools": True})
            continue
        if message.tool_calls:
            calls = "\n".join(_call_block(call) for call in message.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        rendered.append({"role": message.role, "content": content})
    if tools:
        described = _TOOLS_PROMPT.format(
            tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        )
        if rendered and rendered[0]["role"] == "system":
            rendered[0]["content"] = f"{rendered[0]['content']}\n\n{described}"
        else:
            rendered.insert(0, {"role": "system", "content": described})
    return [{"role": m["role"], "content": m["content"]} for m in rendered]


def _call_block(call: ToolCall) -> str:
    written = {"name": call.function.name, "arguments": _arguments(call)}
    return f"<tool_call>\n{json.dumps(written, ensure_ascii=False)}\n</tool_call>"
