"""OpenAI-compatible request and response bodies (the subset genq serves)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from gateway.openai.tools import ToolMode, ToolReader, call_schema
from gateway.schemas import MAX_LOGPROBS, TOKEN_ID_LIMIT, Strict, StructuredOutputs, Tool, ToolCall

FinishReason = Literal["stop", "length", "tool_calls"]
TokenId = Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]
# Limits declared in the schema, so that a client (or a schema-driven fuzzer) knows them.
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="Every chunk carries its choice's usage so far (vLLM's)."
    )


class JsonSchemaFormat(Strict):
    # `schema` names a BaseModel method: the field is `schema_`, written `schema` both ways.
    model_config = ConfigDict(
        extra="forbid", strict=True, validate_by_name=True, serialize_by_alias=True
    )

    name: str
    schema_: dict[str, object] | None = Field(
        None, alias="schema", description="The JSON schema; unset: any JSON object."
    )
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` comes with, and only with, type `json_schema`")
        return self

    def structured(self) -> dict[str, object] | None:
        if self.type == "json_object":
            return {"json_object": True}
        if self.json_schema is not None:
            return {"json": self.json_schema.schema_ or {"type": "object"}}
        return None


class SamplingFields(Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(
        1,
        ge=1,
        description="Choices to generate, each a job of its own, seeded `seed + i` as vLLM seeds "
        "them; at most GENQ_MAX_CHOICES.",
    )
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions, which load generators (vLLM's `bench serve`, guidellm) send.
    top_k: int = Field(0, ge=-1, le=1000, description="0 or -1 turns top-k off (vLLM).")
    min_tokens: int = Field(0, ge=0, description="Tokens before end-of-sequence may end it.")
    ignore_eos: bool = Field(False, description="Go on past end-of-sequence (benchmarks).")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="1 turns it off (vLLM).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="0 turns it off (vLLM).")
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]] | None = None
    bad_words: list[Annotated[str, Field(min_length=1, pattern=r"\S")]] | None = None
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Each prompt token's logprob (vLLM's)."
    )
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's: a JSON schema, regex, choice or grammar the answer follows."
    )
    # vLLM's older spellings of `structured_outputs`.
    guided_json: dict[str, object] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)
    guided_grammar: str | None = None

    @model_validator(mode="after")
    def _one_structured_output(self) -> SamplingFields:
        if len(self._structured()) > 1:
            raise ValueError(
                "give one of `response_format` (json), `structured_outputs` or a `guided_*` field"
            )
        return self

    def _structured(self) -> list[dict[str, object]]:
        """Every structured output the request names, as vLLM's `structured_outputs`."""
        specs: list[dict[str, object]] = []
        if self.structured_outputs is not None:
            specs.append(self.structured_outputs.model_dump(exclude_none=True))
        if self.response_format is not None and (spec := self.response_format.structured()):
            specs.append(spec)
        guided = {
            "json": self.guided_json,
            "regex": self.guided_regex,
            "choice": self.guided_choice,
            "grammar": self.guided_grammar,
        }
        specs += [{kind: value} for kind, value in guided.items() if value is not None]
        return specs

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling(self) -> dict[str, object]:
        """The native request's fields these set, vLLM's extensions included."""
        return {
            "model": self.model,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop_list(),
            "seed": self.seed,
            "top_k": max(self.top_k, 0),
            "min_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "min_p": self.min_p,
            "logit_bias": self.logit_bias or {},
            "stop_token_ids": self.stop_token_ids or [],
            "bad_words": self.bad_words or [],
            "prompt_logprobs": self.prompt_logprobs,
            "structured_outputs": next(iter(self._structured()), None),
        }

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


Prompt = str | list[TokenId]


class CompletionRequest(SamplingFields):
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(
        description="A prompt (text or token ids), or a list of them: one choice each (times "
        "`n`), in order."
    )
    max_tokens: int | None = Field(
        16, ge=0, description="OpenAI's default; 0 reads the prompt alone (with `echo`)."
    )
    echo: bool = Field(False, description="The prompt comes first in each choice's text.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Each token's logprob with this many likeliest tokens (and the chosen one).",
    )
    add_special_tokens: bool = Field(True, description="Add the tokenizer's BOS (vLLM's).")

    @model_validator(mode="after")
    def _echo_whole(self) -> CompletionRequest:
        if self.echo and self.stream:
            raise ValueError("`echo` is served without `stream`: send stream=false")
        return self

    def prompts(self) -> list[Prompt]:
        """The prompts, each a text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]
        return cast("list[Prompt]", prompt)

    def generations(self) -> list[dict[str, object]]:
        """The native requests this asks for, one per prompt, as fields to validate. Echoed
        logprobs need the prompt's; a prompt of token ids is echoed as the worker decodes it."""
        prompt_logprobs = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(self.logprobs, prompt_logprobs or 0)
        common = {
            **self.sampling(),
            "max_new_tokens": self.max_tokens,
            "logprobs": self.logprobs,
            "prompt_logprobs": prompt_logprobs,
            "add_special_tokens": self.add_special_tokens,
        }
        return [
            {**common, "prompt": prompt}
            if isinstance(prompt, str)
            else {**common, "prompt_token_ids": prompt, "echo": self.echo}
            for prompt in self.prompts()
        ]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessageIn(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = Field(
        None, description="Unset (or null) only in an assistant's turn of `tool_calls` alone."
    )
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's calls.")
    tool_call_id: str | None = Field(None, description="A `tool` message's: the call it answers.")

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def native_messages(messages: list[ChatMessageIn]) -> list[dict[str, object]]:
    """The native request's `messages`: text content, a developer's turn as the system's; the
    native request checks the tool fields."""
    native: list[dict[str, object]] = []
    for m in messages:
        message: dict[str, object] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.text(),
        }
        if m.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        native.append(message)
    return native


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Each generated token's logprob.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="With `logprobs`: this many likeliest tokens."
    )
    tools: list[Tool] | None = Field(
        None, description="Functions the model may call; at most GENQ_MAX_TOOLS."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None,
        description='"auto" (the default with `tools`) reads calls out of the answer in the '
        'model\'s format; "required" and a named function force them with a JSON schema; '
        '"none" reads none.',
    )
    parallel_tool_calls: bool = Field(
        True, description="false: an answer makes one tool call at most."
    )

    @model_validator(mode="after")
    def _top_with_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        return self

    @model_validator(mode="after")
    def _tool_choice_of_tools(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise ValueError("`tool_choice` needs `tools` to choose from")
        if isinstance(choice, NamedToolChoice):
            names = [tool.function.name for tool in self.tools or []]
            if choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names function {choice.function.name!r}, which is not one of "
                    f"`tools`: {', '.join(names)}"
                )
        if self.tool_mode in ("required", "named") and self._structured():
            raise ValueError(
                "a forced `tool_choice` constrains the answer itself: give no `response_format`, "
                "`structured_outputs` or `guided_*` with it"
            )
        return self

    @property
    def tool_mode(self) -> ToolMode | None:
        """How the answer's tool calls are made; None: they are not (no tools, or "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def tool_reader(self, parser: str | None) -> ToolReader | None:
        """How a choice's answer becomes tool calls, for a model of tool-call format `parser`."""
        mode = self.tool_mode
        if mode is None:
            return None
        choice = self.tool_choice
        function = choice.function.name if isinstance(choice, NamedToolChoice) else None
        return ToolReader(mode, function, parser, self.parallel_tool_calls)

    def generations(self) -> list[dict[str, object]]:
        """The native request this asks for, as fields to validate."""
        max_new_tokens = self.max_completion_tokens or self.max_tokens
        messages = native_messages(self.messages)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        fields = {**self.sampling(), "messages": messages, "max_new_tokens": max_new_tokens}
        if self.tools:
            fields["tools"] = [tool.model_dump(exclude_none=True) for tool in self.tools]
        reader = self.tool_reader(None)
        if reader is not None and reader.mode != "auto":
            schema = call_schema(self.tools or [], reader.function, self.parallel_tool_calls)
            fields["structured_outputs"] = {"json": schema}
        return [{**fields, "logprobs": logprobs}]


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class _Choice(BaseModel):
    index: int = 0


class _Response(BaseModel):
    id: str
    created: int
    model: str


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    logprob: float | None
    decoded_token: str


class CompletionChoice(_Choice):
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(
        None, description="vLLM's: per prompt token, it and its likeliest by token id."
    )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class Completion(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class DeltaToolCall(ToolCallOut):
    """A streamed call, whole in one delta: its `index` among the choice's calls."""

    index: int


def _unset(value: object) -> bool:
    return value is None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=_unset)


class ChatChoice(_Choice):
    message: ChatMessageOut
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: OpenAIUsage


class ChatDelta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = Field(None, exclude_if=_unset)


class ChatChunkChoice(_Choice):
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: OpenAIUsage | None = None


OpenAIRequest = CompletionRequest | ChatCompletionRequest


# vLLM's tokenizer routes: `model` is optional there (unset: the default model), and each
# field keeps vLLM's name and default.
class TokenizeCompletionRequest(Strict):
    model: str | None = Field(None, description="Served model name; unset means the default.")
    prompt: str = Field(description="The text; empty is no tokens (or the special ones alone).")
    add_special_tokens: bool = Field(
        True, description="Whether the tokenizer adds its special tokens (BOS) to `prompt`."
    )

    def generation(self) -> dict[str, object]:
        """The prompt fields of the native request this asks for."""
        return {
            "model": self.model,
            "prompt": self.prompt,
            "add_special_tokens": self.add_special_tokens,
        }


class TokenizeChatRequest(Strict):
    model: str | None = Field(None, description="Served model name; unset means the default.")
    messages: list[ChatMessageIn] = Field(min_length=1)
    # vLLM's fields, each with the one value genq serves: declared, so the schema says so.
    add_generation_prompt: Literal[True] = Field(
        True,
        description="The chat template ends with the assistant's turn opened; the worker "
        "applies it so for every request, so only `true` is taken.",
    )
    add_special_tokens: Literal[False] = Field(
        False,
        description="The chat template places the special tokens; the tokenizer adds none of "
        "its own, so only `false` is taken.",
    )

    def generation(self) -> dict[str, object]:
        """The prompt fields of the native request this asks for."""
        return {"model": self.model, "messages": native_messages(self.messages)}


def _tokenize_kind(body: Any) -> str:
    # The body's shape picks the model, so that a 422 names the fields of that one alone.
    if isinstance(body, dict):
        return "chat" if "messages" in body else "completion"
    return "chat" if isinstance(body, TokenizeChatRequest) else "completion"


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("completion")]
    | Annotated[TokenizeChatRequest, Tag("chat")],
    Discriminator(_tokenize_kind),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None = Field(
        description="Prompt and generated tokens a request may hold at most, as the workers "
        "holding the model serve it; null until one has loaded it."
    )
    tokens: list[int]


class DetokenizeRequest(Strict):
    model: str | None = Field(None, description="Served model name; unset means the default.")
    tokens: list[Annotated[int, Field(ge=0, lt=TOKEN_ID_LIMIT)]] = Field(min_length=1)

    def generation(self) -> dict[str, object]:
        """The prompt fields of the native request this asks for."""
        return {"model": self.model, "prompt_token_ids": self.tokens, "echo": True}


class DetokenizeResponse(BaseModel):
    prompt: str
