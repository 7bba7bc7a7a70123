"""Operator routes (API keys with the `admin` scope): reload a model's weights, split its
traffic, point an alias elsewhere."""

from __future__ import annotations

from fastapi import APIRouter, Depends, status

from gateway.deps import AdminDep, require_admin
from gateway.routes.common import AUTH_ERRORS, StrictJSONRoute
from gateway.schemas import AliasTarget, ErrorBody, ModelCard, ReloadAccepted, TrafficSplit

router = APIRouter(
    route_class=StrictJSONRoute,
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={**AUTH_ERRORS, 404: {"model": ErrorBody}},
)


@router.post("/models/{name}/reload", status_code=status.HTTP_202_ACCEPTED)
async def reload_model(name: str, admin: AdminDep) -> ReloadAccepted:
    """Re-read the registry; every worker holding `name` loads its new weights in the
    background and swaps them in between decode steps, failing and draining nothing."""
    return await admin.reload(name)


@router.put("/models/{name}/traffic")
async def set_traffic(name: str, body: TrafficSplit, admin: AdminDep) -> ModelCard:
    """Split requests for the bare name between its versions by weight (a canary)."""
    return await admin.set_traffic(name, body.weights)


@router.delete("/models/{name}/traffic")
async def clear_traffic(name: str, admin: AdminDep) -> ModelCard:
    """Drop the run-time split: back to the registry file's, or the last listed version."""
    return await admin.clear_traffic(name)


@router.put("/aliases/{alias}", status_code=status.HTTP_204_NO_CONTENT)
async def set_alias(alias: str, body: AliasTarget, admin: AdminDep) -> None:
    """Point an alias at a model or a version, atomically (blue-green switch)."""
    await admin.set_alias(alias, body.target)
