"""/api/v1/keys (admin): list API keys, revoke one. A key's secret and its hash are never shown."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from yardmaster.server.api.auth import require_admin, runtime
from yardmaster.server.api.errors import ApiError
from yardmaster.server.api.views import rfc3339
from yardmaster.server.backends.records import ApiKeyRecord


def key_view(key: ApiKeyRecord) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "hint": key.hint,
        "role": key.role,
        "owner": key.owner,
        "created_at": rfc3339(key.created_at),
        "expires_at": rfc3339(key.expires_at),
        "last_used_at": rfc3339(key.last_used_at),
        "revoked_at": rfc3339(key.revoked_at),
    }


async def list_keys(request: Request) -> Response:
    await require_admin(request)
    keys = await runtime(request).keys.list()
    return JSONResponse({"keys": [key_view(k) for k in keys]})


async def revoke_key(request: Request) -> Response:
    """Refuses the key from now on and closes its client-channel sockets (4001) on every replica."""
    await require_admin(request)
    key = await runtime(request).keys.revoke(request.path_params["key_id"])
    if key is None:
        raise ApiError(404, "not-found", "no such key")
    return JSONResponse(key_view(key))


routes = [
    Route("/api/v1/keys", list_keys, methods=["GET"]),
    Route("/api/v1/keys/{key_id}", revoke_key, methods=["DELETE"]),
]
