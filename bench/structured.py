"""What structured output costs apart from the engine loop (`python -m bench.engine
--structured`): compiling the schemas' grammars, and one step's masks along a valid answer."""

from __future__ import annotations

import time

import orjson
import torch
from llguidance import LLMatcher

from gateway.schemas import StructuredOutputs
from gateway.services.structured import grammar_text
from worker.engine.grammar import Grammars, Masks
from worker.engine.model import LoadedModel, vocab
from worker.engine.rows import new_row
from worker.engine.sampling import SamplingParams

ROWS = 16
STRUCTURED_SCHEMAS: list[dict[str, object]] = [
    # Long enough (8 records or more) that a row runs to its max_new_tokens, as a plain one does:
    # the engine loop then compares the cost of the masks, not the lengths of the answers.
    {
        "type": "array",
        "minItems": 8,
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "kind": {"enum": ["person", "place", "thing"]},
                "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
            },
            "required": ["name", "kind", "year"],
            "additionalProperties": False,
        },
    },
    {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 60},
            "genre": {"enum": ["fantasy", "mystery", "science fiction", "romance"]},
            "chapters": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "number": {"type": "integer", "minimum": 1, "maximum": 30},
                        "name": {"type": "string", "maxLength": 40},
                    },
                    "required": ["number", "name"],
                    "additionalProperties": False,
                },
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["title", "genre", "chapters"],
        "additionalProperties": False,
    },
]
# A valid answer to STRUCTURED_SCHEMAS[0], which the masks follow token by token.
ANSWER = [
    {"name": "Ada Lovelace", "kind": "person", "year": 1815},
    {"name": "London", "kind": "place", "year": 1066},
] * 4


def grammar(schema: dict[str, object]) -> str:
    return grammar_text(StructuredOutputs.model_validate({"json": schema}))


def costs(lm: LoadedModel) -> dict[str, object]:
    """compile_ms per schema (the model's tokenizer made ready first), and the masks of ROWS
    rows following ANSWER: mask_us_per_step and mask_us_per_row."""
    grammars = Grammars(lm.tokenizer, vocab(lm))
    grammars.matcher(LLMatcher.grammar_from_regex("warm"))  # builds llguidance's tokenizer
    compile_ms = []
    for schema in STRUCTURED_SCHEMAS:
        started = time.perf_counter()
        grammars.matcher(grammar(schema))
        compile_ms.append(round((time.perf_counter() - started) * 1e3, 2))
    params = SamplingParams(max_new_tokens=256, grammar=grammar(STRUCTURED_SCHEMAS[0]))
    rows = [new_row(lm, str(i), [1], params) for i in range(ROWS)]
    for row in rows:
        row.matcher = grammars.matcher(grammar(STRUCTURED_SCHEMAS[0]))
    text = orjson.dumps(ANSWER).decode()
    tokens = lm.tokenizer(text, add_special_tokens=False).input_ids
    masks = Masks()
    logits = torch.empty((ROWS, vocab(lm)), device=lm.device)
    started = time.perf_counter()
    for token in tokens:
        masks.ahead(rows, vocab(lm))
        masks.take(rows, logits)
        for row in rows:
            assert row.matcher is not None
            assert row.matcher.consume_token(token), row.matcher.get_error()
    step_us = (time.perf_counter() - started) / len(tokens) * 1e6
    return {
        "compile_ms": compile_ms,
        "mask_us_per_step": round(step_us, 1),
        "mask_us_per_row": round(step_us / ROWS, 1),
    }
