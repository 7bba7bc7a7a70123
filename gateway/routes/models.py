"""Served models and queue statistics."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.auth import Scope
from gateway.deps import ListingDep, QueueDep, ReaderDep
from gateway.routes.common import AUTH_ERRORS, StrictJSONRoute
from gateway.schemas import ModelList, QueueStats

router = APIRouter(
    route_class=StrictJSONRoute, prefix="/v1", tags=["models"], responses=AUTH_ERRORS
)


@router.get("/models")
async def list_models(listing: ListingDep, caller: ReaderDep) -> ModelList:
    """OpenAI-style list of the models workers have registered, with live worker counts; their
    sources, workers and load failures only for API keys with the `admin` scope."""
    return await listing.models(details=caller.principal.can(Scope.admin))


@router.get("/queue")
async def queue_stats(queue: QueueDep, caller: ReaderDep) -> QueueStats:
    """Per pool: depth, ready, running, age of the job at the head, workers alive."""
    return await queue.stats()
