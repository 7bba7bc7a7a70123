"""Structured output requests as llguidance grammars, checked at the gateway: a JSON schema,
regex, choice or grammar the library refuses is answered `400` naming the problem before
anything is queued, and the worker receives the grammar ready to compile."""

from __future__ import annotations

import functools

import anyio
import orjson
from llguidance import LLMatcher

from common.settings import Settings
from gateway.errors import InvalidStructuredOutput, LimitExceeded
from gateway.schemas import StructuredOutputs

# Checked grammars, by their text: clients send the same few schemas again and again.
_CHECKED = 256
# JSON without free whitespace: a small model given room for it may pad an answer with
# newlines until max_new_tokens runs out. A schema's own `x-guidance` overrides it.
_JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_text(spec: StructuredOutputs) -> str:
    """llguidance's grammar for `spec`, unchecked."""
    if spec.json_ is not None or spec.json_object:
        schema = spec.json_ if spec.json_ is not None else {"type": "object"}
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)  # type: ignore[arg-type]
        except ValueError as e:
            raise InvalidStructuredOutput(f"structured_outputs.json: {e}") from e
    if spec.regex is not None:
        return LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        literals = " | ".join(orjson.dumps(choice).decode() for choice in spec.choice)
        return LLMatcher.grammar_from_lark(f"start: {literals}")
    assert spec.grammar is not None, "StructuredOutputs holds one kind"
    return LLMatcher.grammar_from_lark(spec.grammar)


@functools.lru_cache(maxsize=_CHECKED)
def _problem(grammar: str) -> str:
    """What llguidance finds wrong with `grammar` ("" when nothing)."""
    return LLMatcher.validate_grammar(grammar)


async def checked_grammar(spec: StructuredOutputs, settings: Settings) -> str:
    """The grammar of `spec`, checked off the event loop (a large schema takes a while)."""
    size = len(orjson.dumps(spec.model_dump(exclude_none=True)))
    if size > settings.max_grammar_chars:
        raise LimitExceeded(
            f"structured_outputs is {size} characters; the limit is {settings.max_grammar_chars} "
            "(GENQ_MAX_GRAMMAR_CHARS)"
        )
    grammar = grammar_text(spec)
    problem = await anyio.to_thread.run_sync(_problem, grammar)
    if problem:
        raise InvalidStructuredOutput(f"structured_outputs: {problem}")
    return grammar
