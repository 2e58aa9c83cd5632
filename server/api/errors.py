"""API errors as JSON bodies `{"error": {"code", "message", "field"?}}`; internals never leak."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from yardmaster.server.backends.base import BackendUnavailable
from yardmaster.server.core.quotas import QuotaExceeded
from yardmaster.server.security.rate_limits import RateLimited, rate_limit_headers

log = logging.getLogger("yardmaster.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None,
    **details: object,
) -> JSONResponse:
    body: dict[str, object] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    body.update(details)
    return JSONResponse({"error": body}, status_code=status, headers=headers)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


_HTTP_CODES = {404: "not-found", 405: "method-not-allowed", 413: "too-large"}


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "http-error"), str(exc.detail))


async def unavailable(request: Request, exc: Exception) -> Response:
    log.warning("backend unavailable", extra={"reason": str(exc), "path": request.url.path})
    return error_response(503, "unavailable", "state backend unavailable; retry shortly", headers={"Retry-After": "1"})


def rate_limited_response(exc: RateLimited) -> JSONResponse:
    """429 `rate-limited` with Retry-After and the RateLimit header fields."""
    headers = {"Retry-After": str(exc.retry_after_s), **rate_limit_headers(exc.rate_class, exc.policy, exc.decision)}
    return error_response(429, "rate-limited", str(exc), headers=headers, retry_after_s=exc.retry_after_s,
                          rate_class=exc.rate_class)


def quota_exceeded_response(exc: QuotaExceeded) -> JSONResponse:
    """429 `quota-exceeded` naming the quota, with Retry-After."""
    return error_response(429, "quota-exceeded", str(exc), headers={"Retry-After": str(exc.retry_after_s)},
                          quota=exc.quota, limit=exc.limit, retry_after_s=exc.retry_after_s)


async def rate_limited(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RateLimited)
    return rate_limited_response(exc)


async def quota_exceeded(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, QuotaExceeded)
    return quota_exceeded_response(exc)


async def internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return error_response(500, "internal", "internal server error")


EXCEPTION_HANDLERS = {
    ApiError: api_error,
    HTTPException: http_error,
    BackendUnavailable: unavailable,
    RateLimited: rate_limited,
    QuotaExceeded: quota_exceeded,
    Exception: internal_error,
}
