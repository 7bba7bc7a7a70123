"""What crosses the queue between gateways and workers: one versioned work item, the names of the
job functions, the payload codec and the codes a job can fail with.

A rolling deploy runs gateways and workers of two releases side by side, so the item evolves by
these rules:
- a new field that an older worker may safely ignore is simply added: workers ignore fields they
  do not know;
- a field that changes what a worker must do (an older worker would silently do the wrong thing)
  is added together with a feature name in `requires`; a worker that does not implement every
  required feature fails the job with `unsupported_feature`, naming what it lacks;
- `WORK_ITEM_VERSION` moves only when the layout itself breaks; a worker refuses a newer
  version with `invalid_work_item`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

WORK_ITEM_VERSION = 1

# arq function names: the gateway enqueues them, workers register them.
GENERATE_FUNCTION = "generate"
DELIVER_WEBHOOK_FUNCTION = "deliver_webhook"

# Optional features a work item may require, as this release's workers implement them.
# `prefix_cache_scope`: the worker matches a prompt only against cached prompts of the same
# `cache_scope` (an API key), so a key cannot learn how other keys' prompts begin.
PREFIX_CACHE_SCOPE = "prefix_cache_scope"
# `min_tokens`, `ignore_eos`: the request's fields of those names (vLLM's meanings); a worker
# that ignored them would end the generation early.
MIN_TOKENS = "min_tokens"
IGNORE_EOS = "ignore_eos"
# `penalties` (presence, frequency, repetition), `min_p`, `logit_bias`, `stop_token_ids`,
# `bad_words`: the
# request's fields of those names (vLLM's meanings); a worker that ignored them would sample
# other tokens, or end elsewhere.
PENALTIES = "penalties"
MIN_P = "min_p"
LOGIT_BIAS = "logit_bias"
STOP_TOKEN_IDS = "stop_token_ids"
BAD_WORDS = "bad_words"
# `logprobs`, `prompt_logprobs`: log-probabilities in the result and the token events;
# `prompt_token_ids`: a prompt given as token ids; `echo`, `return_token_ids`: the prompt's text,
# or its and the generated tokens' ids, in the result; `add_special_tokens` false: a text prompt
# encoded without them; `prompt_only`: max_new_tokens 0, the prompt read (and scored) alone.
# A worker that ignored them would answer without what was asked, or fail the job obscurely.
LOGPROBS = "logprobs"
PROMPT_TOKEN_IDS = "prompt_token_ids"
ECHO = "echo"
RETURN_TOKEN_IDS = "return_token_ids"
ADD_SPECIAL_TOKENS = "add_special_tokens"
PROMPT_ONLY = "prompt_only"
# `grammar`: structured output, an llguidance grammar the tokens must follow; a worker that
# ignored it would answer in free text.
GRAMMAR = "grammar"
# `tools`: function tools, tool calls of assistant messages and `role: tool` answers, rendered by
# the chat template; a worker that ignored them would leave them out of the prompt.
TOOLS = "tools"
SUPPORTED_FEATURES: frozenset[str] = frozenset(
    {
        PREFIX_CACHE_SCOPE,
        MIN_TOKENS,
        IGNORE_EOS,
        PENALTIES,
        MIN_P,
        LOGIT_BIAS,
        STOP_TOKEN_IDS,
        BAD_WORDS,
        LOGPROBS,
        PROMPT_TOKEN_IDS,
        ECHO,
        RETURN_TOKEN_IDS,
        ADD_SPECIAL_TOKENS,
        PROMPT_ONLY,
        GRAMMAR,
        TOOLS,
    }
)


def required_features(
    request: WorkRequest, cache_scope: str | None, max_new_tokens: int
) -> list[str]:
    """The features a worker must implement to run this request as asked."""
    wanted = {
        PREFIX_CACHE_SCOPE: cache_scope is not None,
        MIN_TOKENS: request.min_tokens > 0,
        IGNORE_EOS: request.ignore_eos,
        PENALTIES: bool(
            request.presence_penalty
            or request.frequency_penalty
            or request.repetition_penalty != 1.0
        ),
        MIN_P: request.min_p > 0.0,
        LOGIT_BIAS: bool(request.logit_bias),
        STOP_TOKEN_IDS: bool(request.stop_token_ids),
        BAD_WORDS: bool(request.bad_words),
        LOGPROBS: request.logprobs is not None or request.prompt_logprobs is not None,
        PROMPT_TOKEN_IDS: request.prompt_token_ids is not None,
        ECHO: request.echo,
        RETURN_TOKEN_IDS: request.return_token_ids,
        ADD_SPECIAL_TOKENS: not request.add_special_tokens,
        PROMPT_ONLY: max_new_tokens == 0,
        GRAMMAR: request.grammar is not None,
        TOOLS: bool(request.tools)
        or any(m.tool_calls or m.tool_call_id is not None for m in request.messages or []),
    }
    return [feature for feature, needed in wanted.items() if needed]


class ErrorCode(StrEnum):
    """`error.code` of a failed job."""

    generation_failed = "generation_failed"  # anything else; the message says what
    context_length_exceeded = "context_length_exceeded"
    job_timeout = "job_timeout"  # ran past GENQ_JOB_TIMEOUT_S
    out_of_memory = "out_of_memory"
    model_unavailable = "model_unavailable"  # not served by the pool, or failed to load
    worker_lost = "worker_lost"  # its workers died GENQ_MAX_TRIES times
    invalid_prompt = "invalid_prompt"  # the chat template or the tokenizer refused it
    numerical_error = "numerical_error"  # the model gave logits that cannot be sampled
    detokenization_failed = "detokenization_failed"
    engine_error = "engine_error"  # a fault of a whole engine step, not of this request
    unsupported_feature = "unsupported_feature"  # needs a feature its worker lacks
    invalid_work_item = "invalid_work_item"  # its queue payload cannot be read


class _Lenient(BaseModel):
    # A newer gateway may send more: ignoring it is the compatibility rule above.
    model_config = ConfigDict(extra="ignore", frozen=True)


class WorkFunction(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class WorkTool(_Lenient):
    """A function the model may call, as OpenAI describes one (`type` is always "function")."""

    type: str = "function"
    function: WorkFunction


class WorkFunctionCall(_Lenient):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class WorkToolCall(_Lenient):
    id: str
    type: str = "function"
    function: WorkFunctionCall


class WorkMessage(_Lenient):
    role: str
    content: str = ""
    # Each comes with `tools` in `requires`.
    tool_calls: list[WorkToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a `tool` message's: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _no_content(cls, content: object) -> object:
        # An assistant's turn of tool calls alone has no content; templates take "" for it.
        return "" if content is None else content


class WorkRequest(_Lenient):
    """The part of a validated generation request that a worker acts on."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None  # comes with `prompt_token_ids` in `requires`
    messages: list[WorkMessage] | None = None
    model: str | None = Field(None, description="The name the client asked for.")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = Field(default_factory=list)
    min_tokens: int = 0  # a non-zero value comes with the `min_tokens` feature in `requires`
    ignore_eos: bool = False  # True comes with the `ignore_eos` feature in `requires`
    # Each set comes with its feature in `requires`.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] = Field(default_factory=dict)
    stop_token_ids: list[int] = Field(default_factory=list)
    bad_words: list[str] = Field(default_factory=list)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    echo: bool = False
    return_token_ids: bool = False
    add_special_tokens: bool = True
    grammar: str | None = None  # llguidance's, checked by the gateway
    tools: list[WorkTool] | None = None  # comes with `tools` in `requires`


class WorkItem(_Lenient):
    version: int = WORK_ITEM_VERSION
    job_id: str
    request: WorkRequest
    # Drawn once at submission, so that a re-run after a worker died generates the same tokens
    # and the ones already streamed are not sent twice.
    seed: int
    max_new_tokens: int
    model: str = Field(description="name@version the gateway routed the job to.")
    cache_scope: str | None = Field(
        None,
        description="Prefix-cache partition (the API key's principal): the prompt may reuse "
        "only cached prompts of the same scope. None: any. Comes with `prefix_cache_scope` in "
        "`requires`.",
    )
    requires: list[str] = Field(default_factory=list)
    # For the worker's logs and spans: the submitting request's id, and its trace context as W3C
    # headers (`traceparent`, `tracestate`; empty while tracing is off). Older workers ignore
    # both, which costs them nothing but the correlation.
    request_id: str | None = None
    trace_context: dict[str, str] = Field(default_factory=dict)


class InvalidWorkItem(ValueError):
    """The payload cannot be run by this worker; `code` says why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def decode_item(raw: object) -> WorkItem:
    """The work item of a job function's argument, or InvalidWorkItem."""
    try:
        item = WorkItem.model_validate(raw)
    except ValidationError as e:
        # Without the input values: they hold the prompt, and this message is logged.
        errors = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in e.errors(include_input=False)
        )
        raise InvalidWorkItem(
            ErrorCode.invalid_work_item, f"the queued work item cannot be read: {errors}"
        ) from e
    if item.version > WORK_ITEM_VERSION:
        raise InvalidWorkItem(
            ErrorCode.invalid_work_item,
            f"work item version {item.version} is newer than this worker's "
            f"({WORK_ITEM_VERSION}); upgrade the workers",
        )
    missing = sorted(set(item.requires) - SUPPORTED_FEATURES)
    if missing:
        raise InvalidWorkItem(
            ErrorCode.unsupported_feature,
            f"this worker does not support {', '.join(missing)}; upgrade the workers",
        )
    return item


def serialize_payload(obj: dict[str, Any]) -> bytes:
    """arq payloads are msgpack: plain data, so reading a payload can never execute code."""
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def deserialize_payload(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, raw=False)  # type: ignore[no-any-return]
