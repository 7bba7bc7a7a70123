"""A request checked against every limit and routed to a version: what the enqueue path takes.
Nothing is written before it passes; each refusal names its limit."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from common.catalog import ModelSpec
from common.settings import Settings
from common.webhooks import WebhookPolicy, WebhookRefused
from gateway.errors import LimitExceeded
from gateway.schemas import GenerationRequest
from gateway.services.routing import ModelRouter, Route
from gateway.services.structured import checked_grammar


@dataclass(frozen=True, slots=True)
class Validated:
    request: GenerationRequest
    route: Route
    max_new_tokens: int  # the request's, or the default of the version serving it
    grammar: str | None = None  # its structured output, as llguidance's checked grammar


class RequestValidator:
    def __init__(self, settings: Settings, router: ModelRouter) -> None:
        self.settings = settings
        self.router = router
        self.webhooks = WebhookPolicy.from_settings(settings)

    async def validate(self, request: GenerationRequest) -> Validated:
        """The server's limits come first: they need no Redis round trip, so a request over one
        is refused as such, whether its model exists or Redis answers. Then the model name is
        resolved, and the limits of the version serving it are checked."""
        _check_limits(request, self.settings, self.webhooks)
        grammar = None
        if request.structured_outputs is not None:
            grammar = await checked_grammar(request.structured_outputs, self.settings)
        route = await self.router.resolve(request.model)
        max_new_tokens = _max_new_tokens(request, route.spec, self.settings)
        _check_model_limits(request, route.spec, max_new_tokens)
        return Validated(request, route, max_new_tokens, grammar)


def _max_new_tokens(request: GenerationRequest, spec: ModelSpec, settings: Settings) -> int:
    """The request's `max_new_tokens`, or the default of the version serving it."""
    if request.max_new_tokens is not None:
        return request.max_new_tokens
    if spec.default_max_new_tokens is not None:
        return spec.default_max_new_tokens
    limit = spec.max_new_tokens or settings.max_new_tokens_limit
    return min(settings.default_max_new_tokens, limit)


def _check_limits(request: GenerationRequest, settings: Settings, webhooks: WebhookPolicy) -> None:
    s = settings
    if request.prompt is not None and len(request.prompt) > s.max_prompt_chars:
        raise LimitExceeded(
            f"prompt is {len(request.prompt)} characters; the limit is {s.max_prompt_chars} "
            "(GENQ_MAX_PROMPT_CHARS)"
        )
    if request.prompt_token_ids is not None and len(request.prompt_token_ids) > s.max_prompt_chars:
        raise LimitExceeded(
            f"prompt_token_ids holds {len(request.prompt_token_ids)} tokens; the limit is "
            f"{s.max_prompt_chars} (GENQ_MAX_PROMPT_CHARS bounds a prompt of token ids too)"
        )
    if request.messages is not None:
        if len(request.messages) > s.max_messages:
            raise LimitExceeded(
                f"{len(request.messages)} messages; the limit is {s.max_messages} "
                "(GENQ_MAX_MESSAGES)"
            )
        if request.tools is not None and len(request.tools) > s.max_tools:
            raise LimitExceeded(
                f"{len(request.tools)} tools; the limit is {s.max_tools} (GENQ_MAX_TOOLS)"
            )
        chars = sum(m.chars() for m in request.messages)
        tools = [tool.model_dump(exclude_none=True) for tool in request.tools or []]
        tool_chars = len(orjson.dumps(tools)) if tools else 0
        if chars + tool_chars > s.max_prompt_chars:
            with_tools = " with their tools" if tools else ""
            raise LimitExceeded(
                f"messages{with_tools} hold {chars + tool_chars} characters; the limit is "
                f"{s.max_prompt_chars} (GENQ_MAX_PROMPT_CHARS)"
            )
    if request.max_new_tokens is not None and request.max_new_tokens > s.max_new_tokens_limit:
        raise LimitExceeded(
            f"max_new_tokens={request.max_new_tokens}; the limit is {s.max_new_tokens_limit} "
            "(GENQ_MAX_NEW_TOKENS_LIMIT)"
        )
    if len(request.stop) > s.max_stop_sequences:
        raise LimitExceeded(
            f"{len(request.stop)} stop strings; the limit is {s.max_stop_sequences} "
            "(GENQ_MAX_STOP_SEQUENCES)"
        )
    if len(request.stop_token_ids) > s.max_stop_sequences:
        raise LimitExceeded(
            f"{len(request.stop_token_ids)} stop token ids; the limit is {s.max_stop_sequences} "
            "(GENQ_MAX_STOP_SEQUENCES)"
        )
    if len(request.logit_bias) > s.max_logit_bias:
        raise LimitExceeded(
            f"{len(request.logit_bias)} logit_bias entries; the limit is {s.max_logit_bias} "
            "(GENQ_MAX_LOGIT_BIAS)"
        )
    if len(request.bad_words) > s.max_bad_words:
        raise LimitExceeded(
            f"{len(request.bad_words)} bad words; the limit is {s.max_bad_words} "
            "(GENQ_MAX_BAD_WORDS)"
        )
    for word in request.bad_words:
        if len(word) > s.max_stop_chars:
            raise LimitExceeded(
                f"bad word of {len(word)} characters; the limit is {s.max_stop_chars} "
                "(GENQ_MAX_STOP_CHARS)"
            )
    for stop in request.stop:
        if len(stop) > s.max_stop_chars:
            raise LimitExceeded(
                f"stop string of {len(stop)} characters; the limit is {s.max_stop_chars} "
                "(GENQ_MAX_STOP_CHARS)"
            )

    if request.webhook is not None:
        if s.webhook_secret is None:
            raise LimitExceeded("webhooks are off: the server has no GENQ_WEBHOOK_SECRET")
        try:
            webhooks.check_url(str(request.webhook))
        except WebhookRefused as e:
            raise LimitExceeded(str(e)) from e


def _check_model_limits(request: GenerationRequest, spec: ModelSpec, max_new_tokens: int) -> None:
    """The registry's limits of the version that will serve the request; `max_new_tokens`:
    what the job will run with (the request's, or that version's default)."""
    if request.min_tokens > max_new_tokens:
        raise LimitExceeded(
            f"min_tokens={request.min_tokens} exceeds the max_new_tokens of this request "
            f"({max_new_tokens}); ask for more max_new_tokens"
        )
    if (
        request.max_new_tokens is not None
        and spec.max_new_tokens is not None
        and request.max_new_tokens > spec.max_new_tokens
    ):
        raise LimitExceeded(
            f"max_new_tokens={request.max_new_tokens}; {spec.key} allows at most "
            f"{spec.max_new_tokens} (max_new_tokens in its registry entry)"
        )
