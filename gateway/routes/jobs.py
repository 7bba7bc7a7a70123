"""Submit-and-poll job API and its event stream."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response, status
from sse_starlette import EventSourceResponse

from common.jobs import Job
from gateway.deps import CallerDep, GeneratorDep, JobsDep, ListenerDep, ServicesDep
from gateway.schemas import BatchRequest, BatchResponse, ErrorBody, GenerationRequest
from gateway.security import StrictJSONRoute
from gateway.services.sse import job_event_stream, sse_response

router = APIRouter(route_class=StrictJSONRoute, prefix="/v1/jobs", tags=["jobs"])

# What any authenticated route may answer besides its own: no or a bad key, the wrong scope, a
# body too large or malformed, Redis away (or this gateway's pools full, or it shutting down).
AUTH_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (401, 403, 413, 422, 503)
}
ERRORS: dict[int | str, dict[str, object]] = {
    **AUTH_ERRORS,
    **{code: {"model": ErrorBody} for code in (404, 409, 429)},
}


IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=255,
        description="Retries with the same key and body get the same job for 24 h; "
        "the same key with another body is a 409.",
    ),
]


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses=ERRORS)
async def submit_job(
    body: GenerationRequest,
    jobs: JobsDep,
    caller: GeneratorDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Job:
    """Queue a generation job; poll it at `Location` or stream its events."""
    job = await jobs.submit(body, caller, idempotency_key=idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.post("/batch", status_code=status.HTTP_202_ACCEPTED, responses=ERRORS)
async def submit_batch(body: BatchRequest, jobs: JobsDep, caller: GeneratorDep) -> BatchResponse:
    """One job per item, queued in one round trip, listed in order; an invalid item gets an
    `error` instead of a `job` and does not stop the others."""
    return await jobs.submit_batch(body.requests, caller)


@router.get("/{job_id}", responses=ERRORS)
async def get_job(job_id: str, jobs: JobsDep, caller: CallerDep) -> Job:
    """The job's status; `position` while queued, `result` once succeeded. Only the API key
    that created the job sees it; any other gets 404."""
    return await jobs.get(job_id, caller.principal.id)


@router.delete("/{job_id}", responses=ERRORS)
async def cancel_job(job_id: str, jobs: JobsDep, caller: CallerDep) -> Job:
    """Cancel: a queued job never runs; a running one stops within a step or two."""
    return await jobs.cancel(job_id, caller.principal.id)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
)
async def job_events(
    job_id: str,
    services: ServicesDep,
    caller: CallerDep,
    listener: ListenerDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """`token` events, then `done` (data: the Job) or `error`. Resume with `Last-Event-ID`."""
    owner = caller.principal.id
    stream = await job_event_stream(services.jobs, job_id, last_event_id, listener, owner)
    return sse_response(stream, services.settings)
