"""What every router shares: strict JSON bodies, the errors any route may answer, and the
Idempotency-Key header."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
from fastapi import Header, Request, Response
from fastapi.routing import APIRoute

from gateway.schemas import ErrorBody

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


class StrictJSONRequest(Request):
    """Bodies parsed as strict JSON (orjson): NaN, Infinity, numbers out of a double's range,
    lone surrogates and nesting past 1024 levels are a 422 naming the problem, not a 500 later."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
