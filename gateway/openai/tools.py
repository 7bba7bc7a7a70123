"""Tool calls on the chat route, as vLLM makes them.

`tool_choice: "required"` and a named function constrain the answer with a JSON schema (the
structured output path), so that it always parses: a JSON array of `{"name", "parameters"}`
objects, one of the tools each, or the named function's arguments object. `"auto"` leaves the
model free and reads the calls out of its text in the model family's own format, which the
registry names per model (`tool_call_parser`); an answer that does not parse is text, as vLLM
leaves it. `"none"` reads nothing.

A streamed answer holds back what may become a tool call and reads it when its job ends, so that
the stream's deltas add up to the answer `read` gives."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.schemas import Tool

# How an answer's tool calls are made: forced by a grammar, or read out of free text.
ToolMode = Literal["required", "named", "auto"]

_EMPTY_PARAMETERS: dict[str, object] = {"type": "object", "properties": {}}


def call_schema(tools: list[Tool], function: str | None, parallel: bool) -> dict[str, object]:
    """The JSON schema the answer follows: `function`'s arguments, or (None) vLLM's array of
    calls of any of `tools`, a single one unless `parallel`."""
    if function is not None:
        (tool,) = [tool for tool in tools if tool.function.name == function]
        return tool.function.parameters or _EMPTY_PARAMETERS
    calls: list[object] = []
    defs: dict[str, object] = {}
    for tool in tools:
        parameters = dict(tool.function.parameters or _EMPTY_PARAMETERS)
        # A parameters schema's own `$defs` move to the root, where its `$ref`s point.
        own = parameters.pop("$defs", None)
        if isinstance(own, dict):
            defs.update(own)
        calls.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [tool.function.name]},
                    "parameters": parameters,
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, object] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


@dataclass(frozen=True, slots=True)
class Call:
    name: str
    arguments: str  # a JSON object's text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


@dataclass(frozen=True, slots=True)
class Read:
    """An answer read as tool calls: the text outside them (None: nothing but whitespace)."""

    content: str | None
    calls: list[Call]


# The start of a Hermes-style call, and each call: vLLM's pattern, which takes a call left open
# at the end of the answer too.
HERMES_START = "<tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)


def parse_hermes(text: str) -> Read | None:
    """The `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` calls of `text` (a JSON
    array of such objects in one tag too, as SmolLM2 writes them); None when it has none, or
    one of them does not parse."""
    if HERMES_START not in text:
        return None
    calls: list[Call] = []
    outside: list[str] = []
    at = 0
    for match in _HERMES_CALL.finditer(text):
        outside.append(text[at : match.start()])
        at = match.end()
        body = match.group(1) if match.group(1) is not None else match.group(2)
        try:
            parsed = json.loads(body)
        except ValueError:
            return None
        for each in parsed if isinstance(parsed, list) else [parsed]:
            call = _call(each, arguments="arguments")
            if call is None:
                return None
            calls.append(call)
    outside.append(text[at:])
    if not calls:
        return None
    content = "".join(outside)
    return Read(content if content.strip() else None, calls)


def _call(obj: object, arguments: str) -> Call | None:
    """A call of `{"name": ..., <arguments>: {...}}`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = obj.get(arguments, {})
    # Some models write the arguments as JSON text already.
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return Call(obj["name"], text)


PARSERS = {"hermes": parse_hermes}


@dataclass(frozen=True, slots=True)
class ToolReader:
    """How one choice's answer becomes tool calls. `function`: the named function; `parser`:
    the model's format, for `auto` (None: the model has none, and its answers are text)."""

    mode: ToolMode
    function: str | None = None
    parser: str | None = None
    parallel: bool = True

    def read(self, text: str) -> Read | None:
        """The answer's calls, or None: it stays text (no call, or one that does not parse:
        a forced answer cut short by `max_tokens`)."""
        read = self._read(text)
        if read is not None and not self.parallel:
            return Read(read.content, read.calls[:1])
        return read

    def _read(self, text: str) -> Read | None:
        if self.mode == "auto":
            return None if self.parser is None else PARSERS[self.parser](text)
        try:
            parsed = json.loads(text)
        except ValueError:
            return None
        if self.mode == "named":
            assert self.function is not None, "a named choice names its function"
            return Read(None, [Call(self.function, text)]) if isinstance(parsed, dict) else None
        if not isinstance(parsed, list):
            return None
        calls = [_call(each, arguments="parameters") for each in parsed]
        if not calls or any(call is None for call in calls):
            return None
        return Read(None, [call for call in calls if call is not None])

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """One streamed choice: the content that can be sent as it comes, and the rest at the end.

    A forced answer is all calls, so nothing is sent before the end. An `auto` answer is sent
    up to its first call's tag (holding back what may be the start of one, and leading
    whitespace, which the whole answer's content would not hold), the rest is read at the end:
    what was sent is always the start of the whole answer's content."""

    def __init__(self, reader: ToolReader) -> None:
        self.reader = reader
        self.text = ""
        self.sent = 0  # characters of `text`
        self.tagged = False

    def feed(self, text: str) -> str:
        """The content to send now, of the text so far and `text`."""
        self.text += text
        if self.reader.mode != "auto":
            return ""
        if self.reader.parser is None:
            self.sent = len(self.text)
            return text
        if self.tagged:
            return ""
        start = self.text.find(HERMES_START)
        if start >= 0:
            self.tagged = True
            free = self.text[:start]
        else:
            free = self.text[: len(self.text) - _partial_tag(self.text)]
        if not free.strip():
            return ""
        out, self.sent = free[self.sent :], len(free)
        return out

    def finish(self, text: str) -> tuple[str, Read | None]:
        """The content still to send and the calls of the whole answer `text`."""
        read = self.reader.read(text)
        if read is None:
            return text[self.sent :], None
        return (read.content or "")[self.sent :], read


def _partial_tag(text: str) -> int:
    """The length of the longest end of `text` that starts a call's tag."""
    for size in range(min(len(HERMES_START) - 1, len(text)), 0, -1):
        if HERMES_START.startswith(text[-size:]):
            return size
    return 0
