"""Submit-and-poll job API and its event stream."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response, status
from sse_starlette import EventSourceResponse

from common.schemas import BatchRequest, BatchResponse, ErrorBody, GenerationRequest, Job
from gateway.deps import JobsDep, ListenerDep, ServicesDep
from gateway.services.sse import job_event_stream, sse_response

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorBody} for code in (404, 413, 422, 429, 503)
}


IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=255,
        description="Retries with the same key and body get the same job for 24 h; "
        "the same key with another body is a 409.",
    ),
]


@router.post("", status_code=status.HTTP_202_ACCEPTED, responses={**ERRORS, 409: ERRORS[404]})
async def submit_job(
    body: GenerationRequest,
    jobs: JobsDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Job:
    """Queue a generation job; poll it at `Location` or stream its events."""
    job = await jobs.submit(body, idempotency_key=idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


@router.post("/batch", status_code=status.HTTP_202_ACCEPTED, responses=ERRORS)
async def submit_batch(body: BatchRequest, jobs: JobsDep) -> BatchResponse:
    """One job per item, queued in one round trip, listed in order; an invalid item gets an
    `error` instead of a `job` and does not stop the others."""
    return await jobs.submit_batch(body.requests)


@router.get("/{job_id}", responses=ERRORS)
async def get_job(job_id: str, jobs: JobsDep) -> Job:
    """The job's status; `position` while queued, `result` once succeeded."""
    return await jobs.get(job_id)


@router.delete("/{job_id}", responses=ERRORS)
async def cancel_job(job_id: str, jobs: JobsDep) -> Job:
    """Cancel: a queued job never runs; a running one stops within a step or two."""
    return await jobs.cancel(job_id)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
)
async def job_events(
    job_id: str,
    services: ServicesDep,
    listener: ListenerDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """`token` events, then `done` (data: the Job) or `error`. Resume with `Last-Event-ID`."""
    stream = await job_event_stream(services.jobs, job_id, last_event_id, listener)
    return sse_response(stream, services.settings)
