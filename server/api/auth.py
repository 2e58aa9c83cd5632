"""Authentication of HTTP requests, and the one place a route says what it needs.

Every route's endpoint is made with `requires(...)` (a scope, AUTHENTICATED or PUBLIC) and
declares its rate class (security/rate_limits.py); the route table test
(tests/unit/test_route_scopes.py) walks the app and refuses a route without either.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import msgspec

from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import Response

from yardmaster.protocol.jobs import validation_field
from yardmaster.server.api.errors import ApiError
from yardmaster.server.backends.base import RateDecision
from yardmaster.server.runtime import Runtime
from yardmaster.server.security import tokens
from yardmaster.server.security.principals import Principal, bearer_token, principal_for_api_key
from yardmaster.server.security.rate_limits import ADDRESS, ADMIN, API, UNAUTHENTICATED, USER
from yardmaster.server.security.scopes import AUTHENTICATED, PUBLIC, Requirement

log = logging.getLogger("yardmaster.api")

_BEARER = {"WWW-Authenticate": "Bearer"}

Endpoint = Callable[[Request], Awaitable[Response]]
PrincipalEndpoint = Callable[[Request, Principal], Awaitable[Response]]


def runtime(request: HTTPConnection) -> Runtime:
    return request.app.state.runtime  # type: ignore[no-any-return]


async def authenticate(request: HTTPConnection) -> Principal | None:
    """The caller of an HTTP request or WebSocket handshake: an API key or an access token as
    `Authorization: Bearer`, else the session cookie (which, for a state-changing request, must
    also pass the CSRF check)."""
    rt = runtime(request)
    header = request.headers.get("authorization")
    if header is not None:
        token = bearer_token(header)
        if token is None:
            return None
        if token.startswith(tokens.PREFIXES["api-key"]):
            return await principal_for_api_key(rt.store, token, rt.principal_cache)
        return await rt.sessions.principal_for_access_token(token)
    return await rt.sessions.principal_from_cookies(request)


async def require_principal(request: Request) -> Principal:
    principal = await authenticate(request)
    if principal is None:
        decision = await charge_address(request, UNAUTHENTICATED)
        headers = {**_BEARER, **runtime(request).limiter.headers(UNAUTHENTICATED, decision)}
        raise ApiError(
            401, "unauthorized", "a valid API key or access token is required (Authorization: Bearer …)", headers=headers
        )
    return principal


async def charge_address(conn: HTTPConnection, rate_class: str) -> RateDecision | None:
    """Charge the caller's address one request of `rate_class` (raises RateLimited when over)."""
    address = client_address(conn)
    return await runtime(conn).limiter.check(rate_class, [(ADDRESS, address)] if address else [])


def user_rate_class(rate_class: str | None, principal: Principal) -> str | None:
    """The class an authenticated request is charged to: admins' "api" calls are "admin"."""
    return ADMIN if rate_class == API and principal.is_admin else rate_class


def _with_headers(response: Response, headers: dict[str, str]) -> Response:
    if headers:
        response.headers.update(headers)
    return response


def requires(requirement: Requirement, rate: str | None = API) -> Callable[[PrincipalEndpoint], Endpoint]:
    """Make an endpoint that authenticates the caller, charges them a request of `rate` (a class
    of security/rate_limits.py), checks `requirement` (a scope, or AUTHENTICATED for any valid
    credential) and passes the principal on. A failed credential is charged to the address's
    "unauthenticated" bucket (401 until it is over, then 429)."""

    def wrap(fn: PrincipalEndpoint) -> Endpoint:
        @functools.wraps(fn)
        async def endpoint(request: Request) -> Response:
            principal = await require_principal(request)
            rate_class = user_rate_class(rate, principal)
            limiter = runtime(request).limiter
            decision = await limiter.check(rate_class, [(USER, principal.id)]) if rate_class else None
            if requirement != AUTHENTICATED and not principal.may(requirement):
                raise ApiError(403, "forbidden", f"this credential lacks the {requirement} scope")
            response = await fn(request, principal)
            return _with_headers(response, limiter.headers(rate_class, decision) if rate_class else {})

        endpoint.requirement = requirement  # type: ignore[attr-defined]
        endpoint.rate_class = rate  # type: ignore[attr-defined]
        return endpoint

    return wrap


@overload
def public(fn: Endpoint, *, rate: str | None = UNAUTHENTICATED) -> Endpoint: ...
@overload
def public(fn: None = None, *, rate: str | None = UNAUTHENTICATED) -> Callable[[Endpoint], Endpoint]: ...


def public(fn: Endpoint | None = None, *, rate: str | None = UNAUTHENTICATED) -> Endpoint | Callable[[Endpoint], Endpoint]:
    """An endpoint anyone may call, without a credential; each call is charged to the client
    address's bucket of `rate` (None: never limited, for the probes only)."""

    def wrap(fn: Endpoint) -> Endpoint:
        if rate is None:
            endpoint = fn
        else:
            @functools.wraps(fn)
            async def endpoint(request: Request) -> Response:
                decision = await charge_address(request, rate)
                response = await fn(request)
                return _with_headers(response, runtime(request).limiter.headers(rate, decision))

        endpoint.requirement = PUBLIC  # type: ignore[attr-defined]
        endpoint.rate_class = rate  # type: ignore[attr-defined]
        return endpoint

    return wrap(fn) if fn is not None else wrap


NOT_DECLARED = "not-declared"


def requirement_of(endpoint: Any) -> str | None:
    """What a route's endpoint declared with `requires` or `public` (None: nothing)."""
    value = getattr(endpoint, "requirement", None)
    return value if isinstance(value, str) else None


def rate_class_of(endpoint: Any) -> str | None:
    """The rate class a route's endpoint declared (None: exempt; NOT_DECLARED: nothing)."""
    return getattr(endpoint, "rate_class", NOT_DECLARED)  # type: ignore[no-any-return]


def client_address(request: HTTPConnection) -> str | None:
    """The caller's address: the socket peer, or behind YM_TRUSTED_PROXIES the first untrusted hop
    of X-Forwarded-For (uvicorn's ProxyHeadersMiddleware, outermost in app.py, put it in the scope)."""
    return request.client.host if request.client is not None else None


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


S = TypeVar("S", bound=msgspec.Struct)


async def read_struct(request: Request, cls: type[S], code: str, limit: int | None = None) -> S:
    """The JSON body as `cls` (at most `limit` bytes, default YM_MAX_REQUEST_BODY_BYTES); a body
    that does not fit is 422 `code`, naming the field when msgspec says which."""
    body = await read_body(request, limit or runtime(request).settings.max_request_body_bytes)
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as exc:
        raise ApiError(422, code, str(exc), field=validation_field(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(422, code, str(exc)) from None
