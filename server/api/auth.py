"""Authentication of HTTP requests."""

from __future__ import annotations

from starlette.requests import Request

from yardmaster.server.api.errors import ApiError
from yardmaster.server.runtime import Runtime
from yardmaster.server.security.principals import Principal, bearer_token, principal_for_api_key


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


async def require_principal(request: Request) -> Principal:
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise ApiError(401, "unauthorized", "missing Authorization: Bearer <API key>", headers={"WWW-Authenticate": "Bearer"})
    principal = await principal_for_api_key(runtime(request).store, token)
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
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "too-large", f"request body over {limit} bytes")
    return bytes(body)
