"""A job as Redis holds it and as it crosses the queue: its record, status, result, error,
timings, webhook deliveries, and the token events of its stream. Written by the gateway and the
worker alike."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


FinishReason = Literal["stop", "length", "cancelled"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = Field(
        0, description="Prompt tokens whose keys and values came from the worker's prefix cache."
    )


class Logprob(BaseModel):
    id: int = Field(description="The token id.")
    token: str = Field(description="Its text (a part of a character reads as U+FFFD).")
    logprob: float | None = Field(
        description="Its log-probability under the model: the raw log-softmax of the logits, "
        "before penalties, biases and temperature (vLLM's default); null for a prompt's first "
        "token, which nothing comes before."
    )
    bytes: list[int] | None = Field(
        None,
        description="Its UTF-8 bytes, where they are not `token`'s: a token holding part of a "
        "character.",
    )


class TokenLogprob(Logprob):
    top_logprobs: list[Logprob] = Field(
        default_factory=list, description="The likeliest tokens at its position, best first."
    )


class JobResult(BaseModel):
    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprob] | None = Field(
        None, description="With `logprobs`: each generated token's, in order."
    )
    prompt_logprobs: list[TokenLogprob] | None = Field(
        None,
        description="With `prompt_logprobs`: each prompt token's, in order (the first without "
        "a logprob: nothing comes before it).",
    )
    prompt_text: str | None = Field(
        None, description="With `echo`: the prompt as the model read it, decoded from its tokens."
    )
    prompt_token_ids: list[int] | None = Field(None, description="With `return_token_ids`.")
    token_ids: list[int] | None = Field(
        None, description="With `return_token_ids`: the generated tokens."
    )


class JobError(BaseModel):
    code: str
    message: str


class Timings(BaseModel):
    queued_s: float | None = Field(None, description="From submission to the start of generation.")
    model_load_s: float | None = Field(
        None, description="Time the job waited for its model to load on the worker (cold start)."
    )
    time_to_first_token_s: float | None = Field(
        None, description="From the start of generation (the prefill) to the first token."
    )
    prefill_s: float | None = Field(
        None, description="The prompt's prefill, up to and including the first token."
    )
    decode_s: float | None = Field(None, description="From the first token to the last.")
    generation_s: float | None = Field(None, description="Prefill and decode.")
    total_s: float | None = Field(None, description="From submission to the end.")
    tokens_per_s: float | None = None


class WebhookDelivery(BaseModel):
    """One delivery attempt. The receiver's status code, or none when no answer came (the
    target refused, unreachable or too slow): the reason stays in the worker's log, so that
    webhooks cannot be used to probe the network."""

    attempt: int
    at: float = Field(description="Epoch seconds.")
    delivered: bool
    status_code: int | None = None


# The job as clients see it: in the API's answers, its closing event and webhook bodies (no
# docstring: it would show in the OpenAPI schema). `position`, `estimated_start_at` and `cached`
# are the gateway's to fill in when it answers: the record (`common.jobstore`) never stores
# them, and the worker writes them at their defaults.
class Job(BaseModel):
    id: str
    status: JobStatus
    model: str = Field(description="name@version: routed at submission, the one that served it.")
    created_at: float = Field(description="Epoch seconds.")
    started_at: float | None = None
    finished_at: float | None = None
    position: int | None = Field(None, description="0-based place in the queue while queued.")
    estimated_start_at: float | None = Field(
        None,
        description="While queued: when it should start (epoch seconds), from the rate at which "
        "the pool has been starting jobs; null until that rate is known.",
    )
    attempt: int = Field(0, description="How many times a worker has started the job.")
    result: JobResult | None = None
    error: JobError | None = None
    timings: Timings = Field(default_factory=Timings)
    webhook_deliveries: list[WebhookDelivery] = Field(
        default_factory=list, description="Every attempt to deliver the job to its webhook."
    )
    cached: bool = Field(
        False,
        description="This is an earlier identical job (finished or running), not a new one.",
    )


class TokenEvent(BaseModel):
    index: int = Field(description="0-based position of this event among the job's token events.")
    text: str
    tokens: int | None = Field(
        None, description="Tokens generated so far, this event's included (continuous usage)."
    )
    prompt_tokens: int | None = Field(None, description="On the first event: the prompt's tokens.")
    logprobs: list[TokenLogprob] | None = Field(
        None, description="With `logprobs`: those of the tokens this event's text came from."
    )
    ids: list[int] | None = Field(
        None,
        description="The ids of the tokens generated since the previous event (this event's "
        "text comes from them, and from earlier ones whose text was held back). A re-run of "
        "the job goes on from them.",
    )

    def encoded(self) -> str:
        """The stream entry's data: fields left unset take no room in Redis."""
        return self.model_dump_json(exclude_none=True)
