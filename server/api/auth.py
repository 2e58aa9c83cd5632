"""Authentication of HTTP requests."""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect, Request

from yardmaster.server.api.errors import ApiError
from yardmaster.server.runtime import Runtime
from yardmaster.server.security.principals import Principal, bearer_token, principal_for_api_key

log = logging.getLogger("yardmaster.api")


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


async def require_principal(request: Request) -> Principal:
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise ApiError(401, "unauthorized", "missing Authorization: Bearer <API key>", headers={"WWW-Authenticate": "Bearer"})
    rt = runtime(request)
    principal = await principal_for_api_key(rt.store, token, rt.principal_cache)
    if principal is None:
        raise ApiError(401, "unauthorized", "invalid, revoked or expired API key", headers={"WWW-Authenticate": "Bearer"})
    return principal


async def require_admin(request: Request) -> Principal:
    principal = await require_principal(request)
    if not principal.is_admin:
        raise ApiError(403, "forbidden", "admin role required")
    return principal


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, "too-large", f"request body over {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "too-large", f"request body over {limit} bytes")
    except ClientDisconnect:
        # The client went away mid-body: no server error, and nobody is left to read an answer.
        log.debug("client closed the connection before its request body was complete", extra={"path": request.url.path})
        raise ApiError(499, "client-closed", "the client closed the connection before its request body was complete") from None
    return bytes(body)
