"""Putting jobs on a pool's queue in arq's own format, several per Redis round trip."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

import orjson
from arq.constants import expires_extra_ms
from arq.jobs import serialize_job as arq_payload
from redis.asyncio.client import Pipeline

from common import keys, logs, tracing
from common.catalog import ModelSpec
from common.contract import (
    GENERATE_FUNCTION,
    WorkItem,
    WorkRequest,
    required_features,
    serialize_payload,
)
from common.jobs import Job
from common.jobstore import JobStore
from common.settings import Settings
from gateway.schemas import GenerationRequest
from gateway.services.routing import Route

# Score offsets (in priority steps) on the arq queue, which runs the lowest score first. A job's
# score is its enqueue time plus this, so waiting ages a job: after one step a `low` job ranks
# with a fresh `normal` one, and nothing waits forever behind a stream of `high` work.
_PRIORITY_STEPS = {"high": -2, "normal": -1, "low": 0}


def fingerprint(
    model: str,
    request: GenerationRequest,
    *,
    exclude: set[str] | None = None,
    scope: str | None = None,
) -> str:
    """Digest of the canonical request as the named model would serve it; with `scope` (an API
    key's principal), only requests of that key have the same one."""
    body = request.model_dump(mode="json", exclude=exclude)
    body["model"] = model
    if scope is not None:
        body["scope"] = scope
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def is_deterministic(request: GenerationRequest) -> bool:
    return request.temperature == 0.0 or request.seed is not None


def stage_enqueue(
    pipe: Pipeline,
    store: JobStore,
    settings: Settings,
    job: Job,
    request: GenerationRequest,
    route: Route,
    *,
    owner: str,
    in_flight: bool,
    cache_scope: str | None,
) -> None:
    """Add a job's record, its work item and its place in the queue to `pipe`. `owner` is the
    API key's principal; `in_flight`: the job counts towards its concurrency limit; the worker
    matches the prompt only against cached prompts of `cache_scope` (None: of every key). The
    item carries the request id and the trace context of the request being handled, for the
    worker's logs and spans."""
    work = WorkRequest.model_validate(request.model_dump(mode="json"))
    item = WorkItem(
        job_id=job.id,
        request=work,
        # Drawn here, not by the worker, so that a re-run reproduces the tokens already streamed.
        seed=request.seed if request.seed is not None else secrets.randbits(63),
        max_new_tokens=new_tokens(request, route.spec, settings),
        model=route.model,
        cache_scope=cache_scope,
        # A worker that ignored these would do something else than asked: it must refuse.
        requires=required_features(work, cache_scope),
        request_id=logs.current().request_id,
        trace_context=tracing.inject(),
    )
    head_start_ms = -_PRIORITY_STEPS[request.priority] * settings.priority_step_s * 1000
    webhook = str(request.webhook) if request.webhook else None
    # Deliveries are traced too: they read the trace context from the record.
    trace_context = item.trace_context if webhook else None
    store.stage_create(
        pipe,
        job,
        pool=route.pool,
        owner=owner,
        webhook=webhook,
        in_flight=in_flight,
        trace_context=trace_context,
    )
    stage_item(pipe, item.model_dump(mode="json"), pool=route.pool, head_start_ms=head_start_ms)


def stage_item(pipe: Pipeline, item: dict[str, Any], *, pool: str, head_start_ms: int) -> None:
    """Add arq's payload for a work item and its place in the pool's queue to `pipe`.

    What arq's `enqueue_job` writes, minus its check for an existing id (ours are fresh UUIDs),
    so that a batch of jobs costs one round trip, and a wake-up for the pool's idle workers. A
    job ranks by enqueue time less its head start.
    """
    now_ms = int(time.time() * 1000)
    score = now_ms - head_start_ms
    payload = arq_payload(
        GENERATE_FUNCTION, (item,), {}, None, now_ms, serializer=serialize_payload
    )
    pipe.psetex(keys.arq_job(item["job_id"]), score - now_ms + expires_extra_ms, payload)
    pipe.zadd(keys.queue(pool), {item["job_id"]: score})
    # In the same round trip: an idle worker takes the job now, not at its next poll.
    pipe.publish(keys.wake(pool), b"")


def new_tokens(request: GenerationRequest, spec: ModelSpec, settings: Settings) -> int:
    """The request's `max_new_tokens`, or the default of the version serving it."""
    return request.max_new_tokens or default_max_new_tokens(spec, settings)


def default_max_new_tokens(spec: ModelSpec, settings: Settings) -> int:
    if spec.default_max_new_tokens is not None:
        return spec.default_max_new_tokens
    limit = spec.max_new_tokens or settings.max_new_tokens_limit
    return min(settings.default_max_new_tokens, limit)
