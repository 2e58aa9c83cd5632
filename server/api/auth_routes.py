"""Sign-in routes: /api/v1/auth/login, /refresh, /logout and /.well-known/jwks.json.

A client gets its tokens in the body (the OAuth 2.0 token response) or, with `"cookie": true`
(browsers), as cookies: then the body holds the CSRF token the page sends back as X-CSRF-Token.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from yardmaster.server.api.auth import authenticate, client_address, public, read_body, runtime
from yardmaster.server.api.errors import ApiError, error_response
from yardmaster.server.security.rate_limits import ACCOUNT, SIGN_IN
from yardmaster.server.security.sessions import (
    ACCESS_COOKIE,
    CSRF_COOKIE,
    REFRESH_COOKIE,
    RefreshRefused,
    SignInRefused,
    Throttled,
    TokenResponse,
    clear_session_cookies,
    new_csrf_token,
    set_session_cookies,
)

BODY_LIMIT = 8 * 1024  # a password is at most 1 KiB
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1


class LoginBody(msgspec.Struct, kw_only=True):
    username: str  # or the email address
    password: str
    cookie: bool = False


class RefreshBody(msgspec.Struct, kw_only=True):
    refresh_token: str | None = None
    cookie: bool = False


class LogoutBody(msgspec.Struct, kw_only=True):
    refresh_token: str | None = None


B = TypeVar("B", LoginBody, RefreshBody, LogoutBody)


async def _decode(request: Request, cls: type[B], optional: bool = False) -> B:
    body = await read_body(request, BODY_LIMIT)
    if optional and not body.strip():
        return cls()
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as exc:
        # msgspec's message names the field and the expected type, never the value given.
        raise ApiError(422, "invalid-request", str(exc)) from None
    except msgspec.DecodeError:
        raise ApiError(422, "invalid-request", "the body must be a JSON object") from None


def _token_response(request: Request, session: TokenResponse, cookie: bool, csrf_token: str | None = None) -> Response:
    if not cookie:
        return JSONResponse(session.body(), headers=_NO_STORE)
    csrf = csrf_token or new_csrf_token()
    response = JSONResponse({"expires_in": session.expires_in, "csrf_token": csrf}, headers=_NO_STORE)
    set_session_cookies(response, session, secure=runtime(request).settings.tls, csrf_token=csrf)
    return response


@public(rate=SIGN_IN)  # the address here, the account below
async def login(request: Request) -> Response:
    rt = runtime(request)
    body = await _decode(request, LoginBody)
    await rt.limiter.check(SIGN_IN, [(ACCOUNT, body.username.casefold())])
    if body.cookie:
        rt.sessions.check_origin(request)  # no signing a browser into someone's account from another site
    try:
        _, session = await rt.sessions.sign_in(body.username, body.password, client_address(request))
    except Throttled as exc:
        raise ApiError(
            429, "too-many-attempts", "too many failed sign-ins; wait before trying again",
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from None
    except SignInRefused:
        raise ApiError(401, "invalid-credentials", "wrong username or password") from None
    return _token_response(request, session, body.cookie)


@public
async def refresh(request: Request) -> Response:
    rt = runtime(request)
    body = await _decode(request, RefreshBody, optional=True)
    token, from_cookie = body.refresh_token, False
    if token is None:
        token, from_cookie = request.cookies.get(REFRESH_COOKIE), True
        if token:
            rt.sessions.check_csrf(request)
    cookie = body.cookie or from_cookie
    if cookie and not from_cookie:
        rt.sessions.check_origin(request)
    try:
        if not token:
            raise RefreshRefused()
        session = await rt.sessions.refresh(token, client_address(request))
    except RefreshRefused:
        refused = error_response(401, "invalid-refresh-token", "the refresh token is invalid, expired or already used; sign in again")
        if from_cookie:
            clear_session_cookies(refused, secure=rt.settings.tls)
        return refused
    return _token_response(request, session, cookie, request.cookies.get(CSRF_COOKIE) if from_cookie else None)


@public
async def logout(request: Request) -> Response:
    """Ends the caller's session: the access token it came with (bearer or cookie) is refused
    from now on, and the refresh token's family (body, else the refresh cookie) is revoked. A
    refresh token alone is enough, so a client whose access token expired can still sign out."""
    rt = runtime(request)
    principal = await authenticate(request)  # a cookie-authenticated POST passes the CSRF check here
    body = await _decode(request, LogoutBody, optional=True)
    token = body.refresh_token
    if token is None and (token := request.cookies.get(REFRESH_COOKIE)):
        rt.sessions.check_csrf(request)
    if principal is None and not token:
        raise ApiError(401, "unauthorized", "sign out with an access token, a refresh token or the session cookies",
                       headers={"WWW-Authenticate": "Bearer"})
    await rt.sessions.logout(principal, token, client_address(request))
    response = Response(status_code=204, headers=_NO_STORE)
    if any(name in request.cookies for name in (ACCESS_COOKIE, REFRESH_COOKIE, CSRF_COOKIE)):
        clear_session_cookies(response, secure=rt.settings.tls)
    return response


@public
async def jwks(request: Request) -> Response:
    return JSONResponse(runtime(request).sessions.access.jwks(), headers={"Cache-Control": "public, max-age=300"})


routes = [
    Route("/api/v1/auth/login", login, methods=["POST"]),
    Route("/api/v1/auth/refresh", refresh, methods=["POST"]),
    Route("/api/v1/auth/logout", logout, methods=["POST"]),
    Route("/.well-known/jwks.json", jwks, methods=["GET"]),
]
