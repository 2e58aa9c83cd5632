"""/api/v1/auth/oidc: single sign-on through an OpenID provider (server/security/oidc.py).

`login?next=/path` redirects the browser to the provider, with a short-lived HttpOnly cookie that
binds the sign-in to this browser; `callback` finishes it, sets the session cookies and
redirects to `next` (a path on this origin, else "/"). Both answer 404 when OIDC is not set up.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from yardmaster.server.api.auth import client_address, public, runtime
from yardmaster.server.api.errors import ApiError, error_response
from yardmaster.server.security.oidc import BINDING_COOKIE, STATE_TTL_S, OidcRefused, OidcService
from yardmaster.server.security.sessions import set_session_cookies

PREFIX = "/api/v1/auth/oidc"


def _service(request: Request) -> OidcService:
    service: OidcService | None = runtime(request).oidc
    if service is None:
        raise ApiError(404, "not-found", "OIDC sign-in is not configured on this server")
    return service


def _forget_binding(response: Response, secure: bool) -> None:
    response.delete_cookie(BINDING_COOKIE, path=PREFIX, secure=secure, httponly=True, samesite="lax")


@public
async def oidc_login(request: Request) -> Response:
    service = _service(request)
    secure = runtime(request).settings.tls
    try:
        begun = await service.begin(request.query_params.get("next"))
    except OidcRefused as exc:
        return error_response(exc.status, exc.code, exc.message)
    response = RedirectResponse(begun.url, status_code=302, headers={"Cache-Control": "no-store"})
    # SameSite=Lax: the provider's redirect back is a top-level GET navigation, which carries it.
    response.set_cookie(
        BINDING_COOKIE, begun.binding, max_age=int(STATE_TTL_S), path=PREFIX, secure=secure, httponly=True, samesite="lax"
    )
    return response


@public
async def oidc_callback(request: Request) -> Response:
    service = _service(request)
    rt = runtime(request)
    secure = rt.settings.tls
    address = client_address(request)
    try:
        signed_in = await service.finish(request.query_params, request.cookies.get(BINDING_COOKIE), address)
    except OidcRefused as exc:
        response: Response = error_response(exc.status, exc.code, exc.message, headers={"Cache-Control": "no-store"})
        if exc.code != "invalid-state":  # this browser's sign-in was used up; a foreign link leaves it be
            _forget_binding(response, secure)
        return response
    session = await rt.sessions.issue(signed_in.user, address)
    response = RedirectResponse(signed_in.next_path, status_code=302)
    set_session_cookies(response, session, secure=secure)
    _forget_binding(response, secure)
    return response


routes = [
    Route(f"{PREFIX}/login", oidc_login, methods=["GET"]),
    Route(f"{PREFIX}/callback", oidc_callback, methods=["GET"]),
]
