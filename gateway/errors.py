"""One error envelope, `{"error": {"code", "message"}}`, and one mapping of exceptions to it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.contract import ErrorCode
from gateway import metrics
from gateway.redisclient import CircuitOpen, PoolExhausted

logger = logging.getLogger(__name__)


class ApiError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class JobNotFound(ApiError):
    status_code = 404
    code = "job_not_found"


class ModelNotFound(ApiError):
    status_code = 404
    code = "model_not_found"


class LimitExceeded(ApiError):
    status_code = 422
    code = "limit_exceeded"


class BadRequest(ApiError):
    status_code = 422
    code = "invalid_request"


class InvalidRouting(ApiError):
    status_code = 422
    code = "invalid_routing"


class Unauthorized(ApiError):
    status_code = 401
    code = "unauthorized"


class IdempotencyConflict(ApiError):
    status_code = 409
    code = "idempotency_conflict"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"


class QueueFull(ApiError):
    status_code = 429
    code = "queue_full"


class Unavailable(ApiError):
    status_code = 503
    code = "redis_unavailable"


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
    status: int, code: str, message: str, *, retry_after_s: int | None = None, **extra: Any
) -> JSONResponse:
    """`type` and `param` make the envelope an OpenAI error object too, for its clients."""
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = error_body(code, message, type=kind, param=extra.pop("param", None), **extra)
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(errors: list[dict[str, Any]]) -> str:
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


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


# Refusals counted in `genq_requests_rejected_total`, by status.
_REJECTION_REASONS = {
    401: "auth",
    403: "auth",
    413: "too_large",
    422: "validation",
    429: "queue_full",
}


def count_rejection(status: int) -> None:
    reason = _REJECTION_REASONS.get(status)
    if reason is not None:
        metrics.REJECTED.labels(reason).inc()


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        err = map_exception(exc)
        count_rejection(err.status_code)
        if isinstance(err, Unavailable | RedisBusy):
            # An open breaker is logged once, when it opens, not once per request.
            if not isinstance(exc, CircuitOpen):
                logger.warning("%s on %s %s: %s", err.code, request.method, request.url.path, exc)
        elif err.status_code >= 500 and not isinstance(err, ShuttingDown):
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            err.status_code, err.code, err.message, retry_after_s=err.retry_after_s
        )

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        count_rejection(422)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        return error_response(
            422, "invalid_request", _validation_message(errors) or "invalid request", details=errors
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for exc_type in (ApiError, RedisConnectionError, RedisTimeoutError, Exception):
        app.add_exception_handler(exc_type, on_api_error)
