"""The route table: every HTTP route declares what it needs in one place (`api.auth.requires` or
`api.auth.public`), only the routes listed here answer without a credential, and the WebSocket
routes (which authenticate their own handshakes) are the listed ones. Walks `build_app`'s routes,
so a route added anywhere is covered without touching this file, unless it is public."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from yardmaster.server.api.auth import NOT_DECLARED, rate_class_of, requirement_of
from yardmaster.server.app import build_app
from yardmaster.server.security import rate_limits
from yardmaster.server.security.scopes import ALL_SCOPES, AUTHENTICATED, PUBLIC
from yardmaster.server.settings import RATE_CLASSES, load_settings

# Each authenticates its handshake itself: the agent channel with an agent token, the client
# channel with `api.auth.authenticate` (or a ticket).
WEBSOCKET_ROUTES = {"/ws/agent", "/ws/client"}

# The only paths that may answer without a credential: probes, and the ways to get a credential.
PUBLIC_PATHS = {
    "/healthz",
    "/readyz",
    "/metrics",
    "/.well-known/jwks.json",
    "/api/v1/auth/login",
    "/api/v1/auth/refresh",
    "/api/v1/auth/logout",  # a session cookie or an access token, checked by the handler
    "/api/v1/auth/register",  # 403 signup-disabled unless YM_ALLOW_SIGNUP=true
    "/api/v1/auth/oidc/login",
    "/api/v1/auth/oidc/callback",
}

VALID = ALL_SCOPES | {PUBLIC, AUTHENTICATED}

# Probes must never be refused: the only routes exempt from rate limits.
RATE_EXEMPT_PATHS = {"/healthz", "/readyz", "/metrics"}
# The classes an HTTP route may declare (handshakes and client messages are the channels').
HTTP_RATE_CLASSES = {
    rate_limits.UNAUTHENTICATED, rate_limits.SIGN_IN, rate_limits.SUBMIT, rate_limits.SANDBOX_CREATE, rate_limits.API,
}


def walk(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, BaseRoute]]:
    for route in routes:
        if isinstance(route, Mount):
            yield from walk(list(route.routes), prefix + route.path)
        else:
            yield prefix + getattr(route, "path", "?"), route


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, BaseRoute]]:
    data = Path(tmp_path_factory.mktemp("routes")) / "data"
    return list(walk(list(build_app(load_settings({"YM_DATA_DIR": str(data)})).routes)))


def test_every_http_route_declares_a_valid_requirement(table: list[tuple[str, BaseRoute]]) -> None:
    http = [(path, r) for path, r in table if isinstance(r, Route)]
    assert len(http) >= 15  # the walk found the API, not an empty table
    undeclared = [f"{sorted(r.methods or ())} {path}" for path, r in http if requirement_of(r.endpoint) is None]
    assert not undeclared, f"routes without requires(...)/public: {undeclared}"
    invalid = {path: requirement_of(r.endpoint) for path, r in http if requirement_of(r.endpoint) not in VALID}
    assert not invalid, invalid


def test_only_the_listed_paths_are_public(table: list[tuple[str, BaseRoute]]) -> None:
    public = {path for path, r in table if isinstance(r, Route) and requirement_of(r.endpoint) == PUBLIC}
    assert {"/healthz", "/readyz", "/metrics"} <= public
    assert public <= PUBLIC_PATHS, f"public routes not on the list: {sorted(public - PUBLIC_PATHS)}"
    # The API proper is never public by accident: jobs, agents, keys, users, audit.
    for path in ("/api/v1/jobs", "/api/v1/agents", "/api/v1/keys", "/api/v1/users", "/api/v1/audit"):
        assert path not in public


def test_websocket_routes_are_the_listed_ones_and_nothing_else_is_unknown(table: list[tuple[str, BaseRoute]]) -> None:
    sockets = {path for path, r in table if isinstance(r, WebSocketRoute)}
    assert sockets == WEBSOCKET_ROUTES
    others = [f"{type(r).__name__} {path}" for path, r in table if not isinstance(r, (Route, WebSocketRoute))]
    assert not others, f"route kinds this test cannot check: {others}"


def test_admin_areas_need_admin_scopes(table: list[tuple[str, BaseRoute]]) -> None:
    """What only an admin may do declares an admin scope, so no user key reaches it."""
    needs = {(path, m): requirement_of(r.endpoint) for path, r in table if isinstance(r, Route) for m in r.methods or ()}
    assert needs[("/api/v1/audit", "GET")] == "users:admin"
    assert needs[("/api/v1/agents", "POST")] == "agents:admin"
    assert needs[("/api/v1/cluster", "GET")] == "agents:admin"
    for (path, method), requirement in needs.items():
        if path.startswith("/api/v1/agents/"):
            assert requirement == "agents:admin", (method, path)
        if path.startswith("/api/v1/users") and not path.startswith("/api/v1/users/me"):
            assert requirement == "users:admin", (method, path)


def test_every_http_route_declares_a_rate_class_and_only_probes_are_exempt(table: list[tuple[str, BaseRoute]]) -> None:
    assert HTTP_RATE_CLASSES <= set(RATE_CLASSES)
    http = [(path, r) for path, r in table if isinstance(r, Route)]
    undeclared = [path for path, r in http if rate_class_of(r.endpoint) == NOT_DECLARED]
    assert not undeclared, f"routes without a rate class: {undeclared}"
    exempt = {path for path, r in http if rate_class_of(r.endpoint) is None}
    assert exempt == RATE_EXEMPT_PATHS
    invalid = {path: rate_class_of(r.endpoint) for path, r in http if rate_class_of(r.endpoint) not in HTTP_RATE_CLASSES | {None}}
    assert not invalid, invalid


def test_the_rate_classes_of_submission_and_sign_in(table: list[tuple[str, BaseRoute]]) -> None:
    classes = {(path, m): rate_class_of(r.endpoint) for path, r in table if isinstance(r, Route) for m in r.methods or ()}
    assert classes[("/api/v1/jobs", "POST")] == rate_limits.SUBMIT
    assert classes[("/api/v1/jobs", "GET")] == rate_limits.API
    for sign_in in (("/api/v1/auth/login", "POST"), ("/api/v1/auth/register", "POST"), ("/api/v1/users/me/password", "POST")):
        assert classes[sign_in] == rate_limits.SIGN_IN, sign_in
    public = {path for path, r in table if isinstance(r, Route) and requirement_of(r.endpoint) == PUBLIC}
    for path in public - RATE_EXEMPT_PATHS - {"/api/v1/auth/login", "/api/v1/auth/register"}:
        assert {rate_class_of(r.endpoint) for p, r in table if p == path} == {rate_limits.UNAUTHENTICATED}, path
