"""/api/v1/keys (admin): list API keys, revoke one. A key's secret and its hash are never shown."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from yardmaster.server.api.auth import requires, runtime
from yardmaster.server.api.errors import ApiError
from yardmaster.server.api.views import rfc3339
from yardmaster.server.backends.records import ApiKeyRecord
from yardmaster.server.security.principals import Principal
from yardmaster.server.security.scopes import AUTHENTICATED


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


@requires(AUTHENTICATED)
async def list_keys(request: Request, principal: Principal) -> Response:
    everyone = request.query_params.get("all") == "true"
    if everyone and not principal.may("users:admin"):
        raise ApiError(403, "forbidden", "listing everyone's keys needs the users:admin scope")
    keys = await runtime(request).keys.list(owner=None if everyone else principal.id)
    return JSONResponse({"keys": [key_view(k) for k in keys]})


@requires(AUTHENTICATED)
async def revoke_key(request: Request, principal: Principal) -> Response:
    """Refuses the key from now on and closes its client-channel sockets (4001) on every replica."""
    rt = runtime(request)
    key_id = request.path_params["key_id"]
    mine = principal.may("users:admin") or any(k.id == key_id for k in await rt.keys.list(owner=principal.id))
    key = await rt.keys.revoke(key_id) if mine else None
    if key is None:
        raise ApiError(404, "not-found", "no such key")
    return JSONResponse(key_view(key))


routes = [
    Route("/api/v1/keys", list_keys, methods=["GET"]),
    Route("/api/v1/keys/{key_id}", revoke_key, methods=["DELETE"]),
]
