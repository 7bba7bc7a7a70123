"""Configurable request limits, checked before anything is written; each message names its limit."""

from __future__ import annotations

from common.catalog import ModelSpec
from common.settings import Settings
from common.webhooks import WebhookPolicy, WebhookRefused
from gateway.errors import LimitExceeded
from gateway.schemas import GenerationRequest


def check_limits(request: GenerationRequest, settings: Settings, webhooks: WebhookPolicy) -> None:
    s = settings
    if request.prompt is not None and len(request.prompt) > s.max_prompt_chars:
        raise LimitExceeded(
            f"prompt is {len(request.prompt)} characters; the limit is {s.max_prompt_chars} "
            "(GENQ_MAX_PROMPT_CHARS)"
        )
    if request.messages is not None:
        if len(request.messages) > s.max_messages:
            raise LimitExceeded(
                f"{len(request.messages)} messages; the limit is {s.max_messages} "
                "(GENQ_MAX_MESSAGES)"
            )
        chars = sum(len(m.content) for m in request.messages)
        if chars > s.max_prompt_chars:
            raise LimitExceeded(
                f"messages hold {chars} characters; the limit is {s.max_prompt_chars} "
                "(GENQ_MAX_PROMPT_CHARS)"
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


def check_model_limits(request: GenerationRequest, spec: ModelSpec, max_new_tokens: int) -> None:
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
