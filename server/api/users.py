"""/api/v1/users (admin), /api/v1/users/me (anyone signed in) and /api/v1/auth/register (public,
off unless YM_ALLOW_SIGNUP=true). Translation only: the decisions are core.users'. A password
or its hash never appears in a response."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from yardmaster.server.api.auth import client_address, public, read_struct, requires, runtime
from yardmaster.server.api.errors import ApiError
from yardmaster.server.api.jobs import int_param
from yardmaster.server.api.views import rfc3339
from yardmaster.server.backends.records import UserRecord
from yardmaster.server.core.users import AdminChange, NewUser, PasswordChange, Profile, Registration, UserError
from yardmaster.server.core.usage import limits_for, usage_of
from yardmaster.server.security.principals import Principal
from yardmaster.server.security.rate_limits import ACCOUNT, SIGN_IN
from yardmaster.server.security.scopes import AUTHENTICATED

# A user body is small (metadata ≤ 16 KiB as JSON); escapes can make its text larger than that.
MAX_BODY_BYTES = 64 * 1024
MAX_PAGE = 500

B = TypeVar("B", NewUser, Registration, Profile, AdminChange, PasswordChange)


def user_view(user: UserRecord) -> dict[str, Any]:
    return {
        "id": user.id,
        "username": user.username,
        "email": user.email,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "image_url": user.image_url,
        "phone": user.phone,
        "metadata": user.metadata,
        "role": user.role,
        "created_at": rfc3339(user.created_at),
        "last_login_at": rfc3339(user.last_login_at),
        "disabled": user.disabled_at is not None,
        "disabled_at": rfc3339(user.disabled_at),
    }


async def _decode(request: Request, cls: type[B]) -> B:
    limit = min(MAX_BODY_BYTES, runtime(request).settings.max_request_body_bytes)
    return await read_struct(request, cls, "invalid-user", limit)


def _refused(exc: UserError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message, field=exc.field)


# ---- admin --------------------------------------------------------------------------------------


@requires("users:admin")
async def create_user(request: Request, principal: Principal) -> Response:
    new = await _decode(request, NewUser)
    try:
        user = await runtime(request).users.create(new, actor=principal.id, client_address=client_address(request))
    except UserError as exc:
        raise _refused(exc) from None
    return JSONResponse(user_view(user), status_code=201)


@requires("users:admin")
async def list_users(request: Request, principal: Principal) -> Response:
    limit = int_param(request, "limit", 100, 1, MAX_PAGE)
    after = request.query_params.get("after") or None
    users = await runtime(request).users.list(limit=limit + 1, after=after)
    page = users[:limit]
    return JSONResponse({"users": [user_view(u) for u in page], "next": page[-1].id if len(users) > limit else None})


@requires("users:admin")
async def get_user(request: Request, principal: Principal) -> Response:
    try:
        user = await runtime(request).users.get(request.path_params["user_id"])
    except UserError as exc:
        raise _refused(exc) from None
    return JSONResponse(user_view(user))


@requires("users:admin")
async def update_user(request: Request, principal: Principal) -> Response:
    """Change a user's role or disable/enable them. Disabling revokes their API keys and refresh
    tokens and closes their client sockets on every replica (4001)."""
    change = await _decode(request, AdminChange)
    try:
        user = await runtime(request).users.admin_update(
            request.path_params["user_id"], change, actor=principal.id, client_address=client_address(request)
        )
    except UserError as exc:
        raise _refused(exc) from None
    return JSONResponse(user_view(user))


@requires("users:admin")
async def delete_user(request: Request, principal: Principal) -> Response:
    try:
        await runtime(request).users.delete(
            request.path_params["user_id"], actor=principal.id, client_address=client_address(request)
        )
    except UserError as exc:
        raise _refused(exc) from None
    return Response(status_code=204)


# ---- the caller's own account -------------------------------------------------------------------


@requires(AUTHENTICATED)
async def get_me(request: Request, principal: Principal) -> Response:
    """The account, with its usage of each quota and the limits that apply to it."""
    rt = runtime(request)
    try:
        user = await rt.users.get(principal.id)
    except UserError as exc:
        raise _refused(exc) from None
    usage = await usage_of(rt.broker, rt.store, user.id)
    view = {**user_view(user), "usage": msgspec.to_builtins(usage), "limits": msgspec.to_builtins(limits_for(rt.settings, user.role))}
    return JSONResponse(view)


@requires(AUTHENTICATED)
async def update_me(request: Request, principal: Principal) -> Response:
    """Names, image URL, phone and metadata; not the role (422 naming it)."""
    profile = await _decode(request, Profile)
    try:
        user = await runtime(request).users.update_profile(principal.id, profile, client_address=client_address(request))
    except UserError as exc:
        raise _refused(exc) from None
    return JSONResponse(user_view(user))


@requires(AUTHENTICATED, rate=SIGN_IN)
async def change_my_password(request: Request, principal: Principal) -> Response:
    change = await _decode(request, PasswordChange)
    try:
        await runtime(request).users.change_password(principal.id, change, client_address=client_address(request))
    except UserError as exc:
        raise _refused(exc) from None
    return Response(status_code=204)


# ---- self-registration --------------------------------------------------------------------------


@public(rate=SIGN_IN)  # the address here, the account below
async def register(request: Request) -> Response:
    rt = runtime(request)
    if not rt.settings.allow_signup:
        raise ApiError(403, "signup-disabled", "self-registration is off on this server (YM_ALLOW_SIGNUP)")
    reg = await _decode(request, Registration)
    await rt.limiter.check(SIGN_IN, [(ACCOUNT, reg.username.casefold())])
    try:
        user = await rt.users.register(reg, client_address=client_address(request))
    except UserError as exc:
        raise _refused(exc) from None
    return JSONResponse(user_view(user), status_code=201)


# "me" before "{user_id}": the first route whose path and method match wins.
routes = [
    Route("/api/v1/users/me", get_me, methods=["GET"]),
    Route("/api/v1/users/me", update_me, methods=["PATCH"]),
    Route("/api/v1/users/me/password", change_my_password, methods=["POST"]),
    Route("/api/v1/users", create_user, methods=["POST"]),
    Route("/api/v1/users", list_users, methods=["GET"]),
    Route("/api/v1/users/{user_id}", get_user, methods=["GET"]),
    Route("/api/v1/users/{user_id}", update_user, methods=["PATCH"]),
    Route("/api/v1/users/{user_id}", delete_user, methods=["DELETE"]),
    Route("/api/v1/auth/register", register, methods=["POST"]),
]
