"""One error envelope, `{"error": {"code", "message"}}`, and one mapping of exceptions to it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY
from starlette.routing import compile_path

from common.contract import ErrorCode
from gateway import metrics
from gateway.redisclient import CircuitOpen, PoolExhausted

logger = logging.getLogger(__name__)


class ApiError(Exception):
    status_code = 500
    code = "internal_error"
    # Why a request was refused before any work, for `genq_requests_rejected_total`; None:
    # not a refusal (a missing job, an outage).
    rejection: str | None = None

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers or {}


class JobNotFound(ApiError):
    status_code = 404
    code = "job_not_found"


class ModelNotFound(ApiError):
    status_code = 404
    code = "model_not_found"


class LimitExceeded(ApiError):
    status_code = 422
    code = "limit_exceeded"
    rejection = "validation"


class BadRequest(ApiError):
    status_code = 422
    code = "invalid_request"
    rejection = "validation"


class InvalidStructuredOutput(ApiError):
    """A JSON schema, regex, choice or grammar the grammar library refuses."""

    status_code = 400
    code = "invalid_structured_output"
    rejection = "validation"


class InvalidRouting(ApiError):
    status_code = 422
    code = "invalid_routing"
    rejection = "validation"


class Unauthorized(ApiError):
    status_code = 401
    code = "unauthorized"
    rejection = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="genq"'})


class Forbidden(ApiError):
    status_code = 403
    code = "forbidden"
    rejection = "forbidden"


class IdempotencyConflict(ApiError):
    status_code = 409
    code = "idempotency_conflict"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"
    rejection = "body_too_large"


class QueueFull(ApiError):
    status_code = 429
    code = "queue_full"
    rejection = "queue_full"


class RateLimited(ApiError):
    """`limit`: which of the key's limits refused it (requests_per_minute, tokens_per_minute,
    concurrent)."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, limit: str, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.rejection = limit


class Unavailable(ApiError):
    status_code = 503
    code = "redis_unavailable"


class NotAcknowledged(ApiError):
    """Jobs written to the primary that fewer replicas than required confirmed in time."""

    status_code = 503
    code = "not_replicated"


class RedisBusy(ApiError):
    status_code = 503
    code = "redis_pool_exhausted"


class ShuttingDown(ApiError):
    status_code = 503
    code = "shutting_down"


class JobExpired(ApiError):
    status_code = 404
    code = "job_expired"


class GatewayTimeout(ApiError):
    status_code = 504
    code = "timeout"


# HTTP status of a failed generation, by the job's error code, where a route must answer with
# one (OpenAI routes); bad input is the client's, the rest the server's.
_FAILED_JOB_STATUS: dict[ErrorCode, int] = {
    ErrorCode.generation_failed: 400,
    ErrorCode.context_length_exceeded: 400,
    ErrorCode.invalid_prompt: 400,
    ErrorCode.numerical_error: 502,
    ErrorCode.detokenization_failed: 502,
    ErrorCode.job_timeout: 504,
    ErrorCode.out_of_memory: 503,
    ErrorCode.model_unavailable: 503,
    ErrorCode.worker_lost: 503,
    ErrorCode.engine_error: 503,
    ErrorCode.unsupported_feature: 503,
    ErrorCode.invalid_work_item: 503,
}


class GenerationFailed(ApiError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        known = code in ErrorCode.__members__
        self.status_code = _FAILED_JOB_STATUS[ErrorCode(code)] if known else 500


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    retry_after_s: int | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """`type` and `param` make the envelope an OpenAI error object too, for its clients."""
    headers = dict(headers or {})
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = error_body(code, message, type=kind, param=extra.pop("param", None), **extra)
    return JSONResponse(body, status_code=status, headers=headers)


def _error_msg(error: dict[str, Any]) -> str:
    """Pydantic's message; a body that is not JSON also says why (strict JSON: no NaN, no lone
    surrogates, nesting within the parser's limit)."""
    msg = str(error.get("msg"))
    reason = (error.get("ctx") or {}).get("error")
    return f"{msg}: {reason}" if error.get("type") == "json_invalid" and reason else msg


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def describe_validation(error: ValidationError) -> str:
    """A model's validation errors in one line, naming each field, without the input (a
    client's prompt) echoed back as pydantic's own message does."""
    return _validation_message([dict(e) for e in error.errors(include_input=False)])


def map_exception(exc: Exception) -> ApiError:
    """The ApiError a route answers for `exc`; streams use it to build their error event."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PoolExhausted):
        return RedisBusy(
            f"{exc}: this gateway serves as many requests at once as {exc.setting} allows; "
            "retry shortly or raise it",
            retry_after_s=1,
        )
    if isinstance(exc, CircuitOpen):
        return Unavailable(f"the job store is unreachable: {exc}", retry_after_s=exc.retry_after_s)
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return Unavailable("the job store (Redis) is unreachable; retry shortly", retry_after_s=1)
    return ApiError("internal error")


_HTTP_METHODS = frozenset({"delete", "get", "head", "options", "patch", "post", "put", "trace"})


def _allowed_methods(request: Request) -> str | None:
    """The methods the API documents at the request's path: those of the first path template of
    the schema that matches it, as routing picks routes in that order (`/v1/jobs/batch` before
    `/v1/jobs/{job_id}`). None for a path the schema does not document."""
    path = request.scope["path"]
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].match(path):
            return ", ".join(sorted(m.upper() for m in operations if m in _HTTP_METHODS))
    return None


def count_rejection(reason: str) -> None:
    metrics.REJECTED.labels(reason).inc()


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        err = map_exception(exc)
        if err.rejection is not None:
            count_rejection(err.rejection)
        if isinstance(err, Unavailable | RedisBusy):
            # An open breaker is logged once, when it opens, not once per request.
            if not isinstance(exc, CircuitOpen):
                logger.warning("%s on %s %s: %s", err.code, request.method, request.url.path, exc)
        elif err.status_code >= 500 and not isinstance(err, ShuttingDown):
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            err.status_code,
            err.code,
            err.message,
            retry_after_s=err.retry_after_s,
            headers=err.headers,
        )

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        count_rejection("validation")
        errors = [
            {"loc": list(e.get("loc", ())), "msg": _error_msg(e), "type": e.get("type")}
            for e in exc.errors()
        ]
        return error_response(
            422, "invalid_request", _validation_message(errors) or "invalid request", details=errors
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 413:
            # FastAPI's body limit, counted as the bytes arrive (chunked bodies too).
            limit = request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)
            message = f"request body over {limit} bytes (GENQ_MAX_BODY_BYTES)"
            count_rejection("body_too_large")
            return error_response(413, PayloadTooLarge.code, message)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405 and (allowed := _allowed_methods(request)) is not None:
            # A 405 must say what is allowed (`Allow`, RFC 9110). Starlette names the methods of
            # the path's first route only; a path may have several (GET and DELETE of a job).
            headers = {**(headers or {}), "Allow": allowed}
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for exc_type in (ApiError, RedisConnectionError, RedisTimeoutError, Exception):
        app.add_exception_handler(exc_type, on_api_error)
