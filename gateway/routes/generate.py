"""Synchronous generation: wait for the result, or stream it."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from sse_starlette import EventSourceResponse

from common.jobs import Job
from gateway.deps import GeneratorDep, ListenerDep, ServicesDep
from gateway.errors import LimitExceeded
from gateway.routes.common import ERRORS, IdempotencyKey, StrictJSONRoute
from gateway.schemas import SyncGenerationRequest
from gateway.services.sse import job_event_stream, sse_response
from gateway.timing import server_timing

router = APIRouter(route_class=StrictJSONRoute, tags=["generate"])


@router.post(
    "/v1/generate",
    response_model=None,
    responses={
        200: {
            "model": Job,
            "content": {"text/event-stream": {}},
            "description": "The finished job, or its SSE stream with `stream: true`",
        },
        202: {"model": Job, "description": "Still running after `timeout_s`; see Location"},
        **ERRORS,
    },
)
async def generate(
    body: SyncGenerationRequest,
    services: ServicesDep,
    caller: GeneratorDep,
    listener: ListenerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Job | EventSourceResponse:
    """Run a job and answer with it finished (200), or still running at `timeout_s` (202); also
    202 when the wait is cut short (Redis lost, the gateway shutting down): the job goes on."""
    settings = services.settings
    timeout_s = body.timeout_s or settings.sync_timeout_s
    if timeout_s > settings.max_sync_timeout_s:
        raise LimitExceeded(
            f"timeout_s={timeout_s}; the limit is {settings.max_sync_timeout_s} "
            "(GENQ_MAX_SYNC_TIMEOUT_S)"
        )
    job = await services.jobs.submit(body.generation(), caller, idempotency_key=idempotency_key)
    if body.stream:
        owner = caller.principal.id
        stream = await job_event_stream(services.jobs, job.id, None, listener, owner)
        return sse_response(stream, settings)
    waited = await services.jobs.wait(job.id, timeout_s, known=job, listener=listener)
    job = waited.model_copy(update={"cached": job.cached})
    if not job.status.finished:
        response.status_code = status.HTTP_202_ACCEPTED
        response.headers["Location"] = f"/v1/jobs/{job.id}"
    else:
        response.headers["Server-Timing"] = server_timing(job.timings)
    return job
