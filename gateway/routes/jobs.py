"""Submit-and-poll job API and its event stream."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response, status
from sse_starlette import EventSourceResponse

from common.jobs import Job
from gateway.deps import CallerDep, GeneratorDep, JobsDep, ListenerDep, ServicesDep
from gateway.routes.common import ERRORS, IdempotencyKey, StrictJSONRoute
from gateway.schemas import BatchRequest, BatchResponse, GenerationRequest
from gateway.services.events import EVENT_ID_PATTERN
from gateway.services.sse import job_event_stream, sse_response

router = APIRouter(route_class=StrictJSONRoute, prefix="/v1/jobs", tags=["jobs"])


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
    last_event_id: Annotated[
        str,
        Header(
            description="Resume after this event id; empty or unset: from the start.",
            # Declared for clients; the service refuses any other id with its own message.
            json_schema_extra={"pattern": EVENT_ID_PATTERN},
        ),
    ] = "",
) -> EventSourceResponse:
    """`token` events, then `done` (data: the Job) or `error`. Resume with `Last-Event-ID`."""
    owner = caller.principal.id
    stream = await job_event_stream(services.jobs, job_id, last_event_id, listener, owner)
    return sse_response(stream, services.settings)
