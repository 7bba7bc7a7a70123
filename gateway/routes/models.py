"""Served models and queue statistics."""

from __future__ import annotations

from fastapi import APIRouter

from common.schemas import ErrorBody, ModelList, QueueStats
from gateway.deps import ModelsDep, QueueDep

router = APIRouter(prefix="/v1", tags=["models"], responses={503: {"model": ErrorBody}})


@router.get("/models")
async def list_models(models: ModelsDep) -> ModelList:
    """OpenAI-style list of the models workers have registered, with live worker counts."""
    return await models.listing()


@router.get("/queue")
async def queue_stats(queue: QueueDep) -> QueueStats:
    """Per pool: depth, ready, running, age of the job at the head, workers alive."""
    return await queue.stats()
