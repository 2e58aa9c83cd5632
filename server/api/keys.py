"""/api/v1/keys: a user's own API keys (create, list, revoke); admins (users:admin) list and revoke
anyone's. A key's secret is shown once, in the creation response; its hash never."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from yardmaster.server.api.auth import client_address, read_struct, requires, runtime
from yardmaster.server.api.errors import ApiError
from yardmaster.server.api.views import rfc3339
from yardmaster.server.backends.records import ApiKeyRecord
from yardmaster.server.core.keys import ScopeNotGrantable, grantable
from yardmaster.server.security.principals import Principal
from yardmaster.server.security.scopes import AUTHENTICATED, ScopeError

# Parentheses are reserved for the names bootstrap gives admin keys ("admin (first start)"), so a key
# made here is never mistaken for one of those and retired by an admin-key rotation.
_NAME_END = r"[^\s()\x00-\x1f\x7f]"  # no space at either end, no control characters or parentheses anywhere
KeyName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=100, pattern=rf"^{_NAME_END}([^()\x00-\x1f\x7f]*{_NAME_END})?\Z")
]
ExpiresInDays = Annotated[int, msgspec.Meta(ge=1, le=3650)]


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: KeyName
    expires_in_days: ExpiresInDays | None = None  # None: never expires
    scopes: Annotated[list[str], msgspec.Meta(max_length=32)] | None = None  # None: all of the caller's


def key_view(key: ApiKeyRecord) -> dict[str, Any]:
    """`prefix` is what identifies a key to its owner (the token's prefix and last 4 characters);
    `scopes` null: a key made before scopes existed, which may do all its owner's role allows."""
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.hint,
        "scopes": key.scopes,
        "owner": key.owner,
        "created_at": rfc3339(key.created_at),
        "expires_at": rfc3339(key.expires_at),
        "last_used_at": rfc3339(key.last_used_at),
        "revoked_at": rfc3339(key.revoked_at),
    }


@requires(AUTHENTICATED)
async def create_key(request: Request, principal: Principal) -> Response:
    """201 with the key's view and, once, the key itself (`key`)."""
    spec = await read_struct(request, KeyCreate, "invalid-key")
    try:
        scopes = grantable(principal, spec.scopes)
    except ScopeNotGrantable as exc:
        raise ApiError(403, "forbidden", str(exc), field="scopes") from None
    except ScopeError as exc:
        raise ApiError(422, "invalid-key", str(exc), field="scopes") from None
    rt = runtime(request)
    token, key = await rt.keys.create(principal, spec.name, scopes, spec.expires_in_days)
    await rt.audit.record(
        "key.created",
        actor=principal.id,
        target=key.id,
        client_address=client_address(request),
        details={"name": key.name, "scopes": key.scopes, "expires_at": rfc3339(key.expires_at)},
    )
    return JSONResponse({**key_view(key), "key": token}, status_code=201, headers={"Cache-Control": "no-store"})


@requires(AUTHENTICATED)
async def list_keys(request: Request, principal: Principal) -> Response:
    everyone = request.query_params.get("all") == "true"
    if everyone and not principal.may("users:admin"):
        raise ApiError(403, "forbidden", "listing everyone's keys needs the users:admin scope")
    keys = await runtime(request).keys.list(owner=None if everyone else principal.id)
    return JSONResponse({"keys": [key_view(k) for k in keys]})


@requires(AUTHENTICATED)
async def revoke_key(request: Request, principal: Principal) -> Response:
    """Refuses the key from now on and closes its client-channel sockets (4001) on every replica.
    Another user's key answers 404, as an unknown one does, unless the caller has users:admin."""
    rt = runtime(request)
    key_id = request.path_params["key_id"]
    admin = principal.may("users:admin")
    if not admin and await rt.keys.find(key_id, owner=principal.id) is None:
        raise ApiError(404, "not-found", "no such key")
    outcome = await rt.keys.revoke_once(key_id)
    if outcome is None:
        raise ApiError(404, "not-found", "no such key")
    if outcome.newly:
        await rt.audit.record(
            "key.revoked",
            actor=principal.id,
            target=key_id,
            client_address=client_address(request),
            details={"name": outcome.key.name, "owner": outcome.key.owner},
        )
    return JSONResponse(key_view(outcome.key))


routes = [
    Route("/api/v1/keys", create_key, methods=["POST"]),
    Route("/api/v1/keys", list_keys, methods=["GET"]),
    Route("/api/v1/keys/{key_id}", revoke_key, methods=["DELETE"]),
]
