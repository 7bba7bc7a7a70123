"""Operator routes: reload a model's weights, split its traffic, point an alias elsewhere."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Header, status

from common.schemas import AliasTarget, ErrorBody, ModelCard, ReloadAccepted, TrafficSplit
from gateway.deps import AdminDep, ServicesDep
from gateway.errors import Unauthorized


async def _require_admin(
    services: ServicesDep, authorization: Annotated[str | None, Header()] = None
) -> None:
    token = services.settings.admin_token
    if token is None:
        return
    expected = f"Bearer {token.get_secret_value()}"
    if authorization is None or not secrets.compare_digest(authorization, expected):
        raise Unauthorized("admin routes need `Authorization: Bearer <GENQ_ADMIN_TOKEN>`")


router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(_require_admin)],
    responses={code: {"model": ErrorBody} for code in (401, 404, 422, 503)},
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
