"""The worker's spans of a job, in the trace the gateway started (`common.tracing`).

One `genq.job` span per attempt, a child of the gateway's `genq.enqueue` span, holds the spans
of what the attempt spent its time on: `genq.model_load` when it waited for its model, then
`genq.prefill` and `genq.decode`. Beside it, `genq.queue_wait` covers submission to pick-up. The
engine times its rows on its own thread; their spans are laid out from those timings when the
generation ends. Attributes follow OpenTelemetry's `gen_ai.*` conventions, with vLLM's
`gen_ai.latency.*` names for the timings.

Everything here is a no-op while tracing is off.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from common import tracing
from common.contract import WorkItem
from common.jobs import Job, JobStatus
from worker.engine import Generation


def _ns(epoch_s: float) -> int:
    return int(epoch_s * 1e9)


@contextmanager
def job_span(job: Job, item: WorkItem, attempt: int, pool: str) -> Iterator[None]:
    """The attempt's span, current while the attempt runs; its queue wait beside it."""
    if not tracing.enabled():
        yield
        return
    tracer = tracing.tracer()
    parent = tracing.extract(item.trace_context)
    picked_up = time.time()
    tracer.start_span(
        "genq.queue_wait",
        context=parent,
        start_time=_ns(job.created_at),
        attributes={"genq.job.id": job.id, "genq.pool": pool},
    ).end(end_time=_ns(picked_up))
    r = item.request
    attributes: dict[str, str | int | float] = {
        "genq.job.id": job.id,
        "genq.attempt": attempt,
        "genq.pool": pool,
        "gen_ai.operation.name": "chat" if r.messages is not None else "text_completion",
        "gen_ai.request.model": item.model,
        "gen_ai.request.max_tokens": item.max_new_tokens,
        "gen_ai.request.temperature": r.temperature,
        "gen_ai.request.top_p": r.top_p,
        "gen_ai.request.seed": item.seed,
        "gen_ai.response.id": job.id,
        "gen_ai.latency.time_in_queue": max(0.0, picked_up - job.created_at),
    }
    if r.top_k:
        attributes["gen_ai.request.top_k"] = r.top_k
    with tracer.start_as_current_span(
        "genq.job",
        context=parent,
        kind=SpanKind.CONSUMER,
        start_time=_ns(picked_up),
        attributes=attributes,
    ):
        yield


def model_loaded(model: str, load_s: float) -> None:
    """The job waited `load_s` for its model, ending now."""
    if not tracing.enabled() or load_s <= 0:
        return
    now = time.time()
    tracing.tracer().start_span(
        "genq.model_load", start_time=_ns(now - load_s), attributes={"gen_ai.request.model": model}
    ).end(end_time=_ns(now))


def generated(job: Job, outcome: Generation) -> None:
    """Prefill and decode spans of the generation that ended just now, and its figures on the
    attempt's span."""
    if not tracing.enabled():
        return
    now = time.time()
    span = trace.get_current_span()
    span.set_attributes(
        {
            "gen_ai.response.model": job.model,
            "gen_ai.response.finish_reasons": [outcome.finish_reason],
            "gen_ai.usage.input_tokens": outcome.prompt_tokens,
            "gen_ai.usage.output_tokens": outcome.completion_tokens,
            "genq.usage.cached_input_tokens": outcome.cached_prompt_tokens,
        }
    )
    if outcome.prefill_s is None or outcome.decode_s is None:
        return
    first_token_at = now - outcome.decode_s
    span.set_attributes(
        {
            "gen_ai.latency.time_to_first_token": max(0.0, first_token_at - job.created_at),
            "gen_ai.latency.time_in_model_prefill": outcome.prefill_s,
            "gen_ai.latency.time_in_model_decode": outcome.decode_s,
        }
    )
    tracer = tracing.tracer()
    tracer.start_span(
        "genq.prefill",
        start_time=_ns(first_token_at - outcome.prefill_s),
        attributes={"gen_ai.usage.input_tokens": outcome.prompt_tokens},
    ).end(end_time=_ns(first_token_at))
    tracer.start_span(
        "genq.decode",
        start_time=_ns(first_token_at),
        attributes={"gen_ai.usage.output_tokens": outcome.completion_tokens},
    ).end(end_time=_ns(now))


def ended(final: Job) -> None:
    """How the attempt ended, on its span."""
    if not tracing.enabled():
        return
    span = trace.get_current_span()
    span.set_attribute("genq.job.status", final.status.value)
    if final.finished_at is not None:
        span.set_attribute("gen_ai.latency.e2e", max(0.0, final.finished_at - final.created_at))
    if final.status is JobStatus.failed and final.error is not None:
        span.set_attribute("error.type", final.error.code)
        span.set_status(Status(StatusCode.ERROR, final.error.message))
