"""The gateway's HTTP bodies: what clients send and what the native routes answer."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator

from common.heartbeats import ModelState
from common.jobs import Job

# No vocabulary comes near it; bounded so that an id always fits the queue's integers.
TOKEN_ID_LIMIT = 2**31
# The likeliest tokens a position's log-probabilities may list (OpenAI's and vLLM's 20).
MAX_LOGPROBS = 20


class Strict(BaseModel):
    """A client's body: unknown fields are refused, and so are values of another JSON type
    (`true` for a number, `1` for a boolean), which lax validation would convert."""

    model_config = ConfigDict(extra="forbid", strict=True)


# OpenAI's rule for a function's name.
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(Strict):
    name: str = Field(pattern=TOOL_NAME_PATTERN, description="Letters, digits, _ and -; 1 to 64.")
    description: str | None = None
    parameters: dict[str, object] | None = Field(
        None, description="The JSON schema of its arguments; unset: none."
    )
    strict: bool | None = Field(
        None, description="Accepted; calls forced by `tool_choice` follow the schema anyway."
    )


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionCall(Strict):
    name: str
    arguments: str = Field(description="The arguments, as a JSON object's text.")


class ToolCall(Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = Field(
        None, description="Unset only in an assistant's turn of `tool_calls` alone."
    )
    tool_calls: list[ToolCall] | None = Field(
        None, description="An assistant's: the calls it made (OpenAI's shape)."
    )
    tool_call_id: str | None = Field(None, description="A `tool` message's: the call it answers.")

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant's message holds `tool_calls`")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a `tool` message, and only one, names the `tool_call_id` it answers")
        if self.content is None and not self.tool_calls:
            raise ValueError("`content` may be left out only by an assistant's `tool_calls`")
        return self

    def chars(self) -> int:
        """Its text, the tool calls' names and arguments included."""
        calls = self.tool_calls or []
        return len(self.content or "") + sum(
            len(c.function.name) + len(c.function.arguments) for c in calls
        )


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs`: exactly one of them."""

    # `json` names a BaseModel method: the field is `json_`, written `json` both ways.
    model_config = ConfigDict(
        extra="forbid", strict=True, validate_by_name=True, serialize_by_alias=True
    )

    json_: dict[str, object] | str | None = Field(
        None, alias="json", description="A JSON schema (an object, or its text) the answer follows."
    )
    regex: str | None = Field(None, description="A regular expression the answer matches.")
    choice: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="The answer is one of these strings.", min_length=1
    )
    grammar: str | None = Field(
        None, description="A Lark grammar (llguidance's dialect) the answer follows."
    )
    json_object: bool | None = Field(None, description="`true`: the answer is a JSON object.")

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredOutputs:
        given = [self.json_, self.regex, self.choice, self.grammar, self.json_object or None]
        if sum(kind is not None for kind in given) != 1:
            raise ValueError(
                "give exactly one of `json`, `regex`, `choice`, `grammar` or `json_object: true`"
            )
        return self


class GenerationRequest(Strict):
    """What a client asks for. Static bounds live here; the configurable limits in
    `services/validation.py`."""

    prompt: str | None = Field(
        None,
        min_length=1,
        description="Raw prompt text; give this, `prompt_token_ids` or `messages`.",
    )
    prompt_token_ids: list[Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]] | None = Field(
        None, description="The prompt as the model's token ids, fed as they are.", min_length=1
    )
    messages: list[ChatMessage] | None = Field(
        None,
        min_length=1,
        description="Chat turns; the model's chat template is applied by the worker.",
    )
    tools: list[Tool] | None = Field(
        None,
        description="Functions the model may call, described to it by the chat template (with "
        "`messages`); the answer is its text (the OpenAI chat route reads tool calls out of it).",
    )
    model: str | None = Field(None, description="Served model name; unset means the default.")
    max_new_tokens: int | None = Field(
        None,
        ge=0,
        description="Tokens to generate at most; 0 reads the prompt alone (its tokens, "
        "`prompt_logprobs`, `echo`).",
    )
    add_special_tokens: bool = Field(
        True, description="Whether the tokenizer adds its special tokens (BOS) to `prompt`."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1000, description="0 turns top-k off.")
    min_tokens: int = Field(
        0,
        ge=0,
        description="Tokens generated before end-of-sequence or a stop string may end the "
        "generation (vLLM's min_tokens).",
    )
    ignore_eos: bool = Field(
        False,
        description="Go on past end-of-sequence tokens: exactly max_new_tokens are generated "
        "(vLLM's ignore_eos, for benchmarks), unless a stop string ends it first.",
    )
    stop: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Generation ends before the first of these strings."
    )
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]] = Field(
        default_factory=list,
        description="Token ids that end the generation like end-of-sequence (vLLM's).",
    )
    presence_penalty: float = Field(
        0.0,
        ge=-2.0,
        le=2.0,
        description="Taken off the score of every token generated so far, once (OpenAI's).",
    )
    frequency_penalty: float = Field(
        0.0,
        ge=-2.0,
        le=2.0,
        description="Taken off the score of every token generated so far, per time it was "
        "generated (OpenAI's).",
    )
    repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        le=10.0,
        description="Divides the positive scores of tokens of the prompt or generated so far and "
        "multiplies the negative ones (vLLM's); 1 turns it off.",
    )
    min_p: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Tokens less likely than min_p times the likeliest are never sampled; 0 "
        "turns it off.",
    )
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(
        default_factory=dict,
        description='Added to the scores of token ids before sampling, e.g. {"50256": -100} '
        "(OpenAI's); -100 bans a token in effect, 100 makes it all but certain.",
    )
    bad_words: list[Annotated[str, Field(min_length=1, pattern=r"\S")]] = Field(
        default_factory=list,
        description="Words never generated, alone or inside the text (vLLM's).",
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Report each generated token's log-probability (the model's raw "
        "log-softmax, before penalties and temperature) with this many likeliest tokens at its "
        "position; in the result and in each token event.",
    )
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Report each prompt token's log-probability, with this many likeliest tokens "
        "at its position (vLLM's prompt_logprobs).",
    )
    echo: bool = Field(False, description="The result holds the prompt's text (`prompt_text`).")
    structured_outputs: StructuredOutputs | None = Field(
        None,
        description="Constrain the answer to a JSON schema, a regex, a choice of strings or a "
        "grammar (vLLM's); it ends where they do.",
    )
    return_token_ids: bool = Field(
        False, description="The result holds the prompt's and the generated tokens' ids."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    priority: Literal["high", "normal", "low"] = "normal"
    webhook: AnyHttpUrl | None = Field(
        None, description="Receives the finished Job (POST, signed); host must be allowed."
    )

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        inputs = (self.prompt, self.prompt_token_ids, self.messages)
        if sum(given is not None for given in inputs) != 1:
            raise ValueError("give exactly one of `prompt`, `prompt_token_ids` or `messages`")
        if self.tools is not None:
            if self.messages is None:
                raise ValueError("`tools` come with `messages`: the chat template renders them")
            names = [tool.function.name for tool in self.tools]
            if twice := sorted({name for name in names if names.count(name) > 1}):
                raise ValueError(f"tool names must differ; given more than once: {twice}")
        if self.max_new_tokens is not None and self.min_tokens > self.max_new_tokens:
            raise ValueError("`min_tokens` must not exceed `max_new_tokens`")
        for key in self.logit_bias:
            if not (key.isascii() and key.isdigit() and int(key) < TOKEN_ID_LIMIT):
                raise ValueError(f"`logit_bias` keys are token ids; {key[:20]!r} is not one")
        return self


class PromptReading(GenerationRequest):
    """A request that reads its prompt alone (the tokenizer routes, with `max_new_tokens` 0): an
    empty prompt is one too, of no tokens (or the tokenizer's special ones)."""

    prompt: str | None = None


class SyncGenerationRequest(GenerationRequest):
    """`POST /v1/generate`: a generation request plus how to answer it."""

    timeout_s: float | None = Field(
        None, gt=0, description="How long to wait for the result before answering 202."
    )
    stream: bool = Field(False, description="Answer with the job's SSE event stream.")

    def generation(self) -> GenerationRequest:
        return GenerationRequest.model_validate(self.model_dump(exclude={"timeout_s", "stream"}))


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


# A version as one live worker holds it: its heartbeat's `HeldModelInfo`, as clients see it.
class WorkerHolding(BaseModel):
    worker: str
    state: ModelState
    reason: str | None = None
    decode: str | None = Field(
        None,
        description="How the worker decodes it: `cuda_graphs`, `static` or `eager`, "
        "`+compiled` when torch.compile'd.",
    )
    decode_note: str | None = Field(
        None, description="Why it decodes otherwise than configured (a fallback)."
    )


class ModelVersion(BaseModel):
    id: str = Field(description="name@version, what a request may name to get this version.")
    version: str
    pool: str
    source: str | None = Field(
        None, description="Where its weights come from; shown to API keys with `admin` only."
    )
    state: Literal["not_loaded", "loading", "ready", "reloading", "failed"] = Field(
        description="ready if any live worker serves it; failed only if every holder failed."
    )
    reason: str | None = Field(
        None, description="Why it failed, when it did; shown to API keys with `admin` only."
    )
    traffic_weight: int | None = Field(
        None, description="Its weight in the model's traffic split, when one is set."
    )
    default: bool = Field(description="What the bare name serves without a traffic split.")
    max_model_len: int | None = Field(
        None,
        description="Prompt and generated tokens a request may hold at most (vLLM's "
        "max_model_len), as the workers holding it serve it; null until one has loaded it.",
    )
    workers: list[WorkerHolding] | None = Field(
        None, description="The live workers holding it; shown to API keys with `admin` only."
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "genq"
    aliases: list[str] = Field(description="Aliases that point to this model or one version.")
    workers: int = Field(description="Live workers with a version of the model ready.")
    versions: list[ModelVersion]
    max_model_len: int | None = Field(
        None, description="The `max_model_len` of the version the bare name serves by default."
    )


class ReloadAccepted(BaseModel):
    model: str
    serves: str | None = Field(
        None, description="The version the name now serves (unset while a traffic split is on)."
    )
    versions: list[str] = Field(description="Its versions in the re-read registry.")
    workers_notified: int = Field(description="Workers listening for the reload command.")


class TrafficSplit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    weights: dict[str, int] = Field(
        description='Weight of each version, e.g. {"1": 90, "2": 10}.', min_length=1
    )


class AliasTarget(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    target: str = Field(description="A model name or name@version.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PoolStats(BaseModel):
    pool: str
    depth: int = Field(description="Jobs in the queue, due or deferred.")
    ready: int = Field(description="Jobs due to run now.")
    running: int
    oldest_age_s: float | None
    workers_alive: int


class QueueStats(BaseModel):
    pools: list[PoolStats]


class BatchRequest(BaseModel):
    """Items are validated one by one: a bad item is reported, the others still run."""

    model_config = ConfigDict(extra="forbid", strict=True)

    requests: list[dict[str, object]] = Field(min_length=1)


class BatchItem(BaseModel):
    index: int
    job: Job | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    items: list[BatchItem]
