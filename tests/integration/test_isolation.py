"""The isolation matrix, in-process: every route of `build_app` (path parameters filled in with a
resource of user A) × {no credential, user B's key, a key without the route's scope, A's expired
key, A's revoked key, an expired JWT of A, a tampered JWT} → the expected refusal (401 bad
credential, 403 missing scope, 404 another user's resource), with nothing changed in the Store by
the refused call; and the same credentials against the client channel's topics.

The routes are read from the app, so a route another module adds is in the matrix at once; one
whose resource kind this file does not know fails `test_every_route_is_in_the_matrix` until a
resource of that kind is added to `Resources.for_segment`."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Route
from starlette.testclient import WebSocketDenialResponse

from tests.support.inproc import JOB, App, in_process_app, signed_access_token
from yardmaster.server.api.auth import requirement_of
from yardmaster.server.security.scopes import AUTHENTICATED, PUBLIC, ROLE_SCOPES

PASSWORD = "a password of alice's, long enough"
# Bodies a successful call would act on, so a refusal that is not one shows in the Store snapshot.
BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/api/v1/jobs"): JOB,
    ("POST", "/api/v1/agents"): {"name": "intruder"},
    ("PATCH", "/api/v1/agents/{agent_id}"): {"capacity": 9},
    ("POST", "/api/v1/keys"): {"name": "intruder"},
    ("POST", "/api/v1/users"): {"username": "intruder", "password": "intruder's password, long"},
    ("PATCH", "/api/v1/users/{user_id}"): {"role": "admin"},
    ("PATCH", "/api/v1/users/me"): {"first_name": "Mallory"},
    ("POST", "/api/v1/users/me/password"): {"current_password": PASSWORD, "new_password": "taken over by mallory"},
}
CREDENTIALS = ("none", "other-user", "missing-scope", "expired-key", "revoked-key", "expired-jwt", "tampered-jwt")


@dataclass(frozen=True)
class Call:
    method: str
    template: str  # the route's path, e.g. /api/v1/jobs/{job_id}
    path: str  # with A's resources filled in
    requirement: str

    @property
    def has_params(self) -> bool:
        return self.template != self.path

    def __str__(self) -> str:
        return f"{self.method} {self.template}"


@dataclass
class World:
    app: App
    alice: str  # A's key, every scope of her role
    bob: str  # B's key
    job: str  # A's job
    alice_key_id: str
    agent: str
    expired: str
    revoked: str
    jwt: str | None  # A's valid access token (None: the server does not take access tokens)
    expired_jwt: str | None
    tampered_jwt: str | None
    without: dict[str, str]  # scope -> a key of alice (admin for admin scopes) with every other scope

    def resource_for(self, segment: str) -> str | None:
        """The id of A's resource of the kind named by the path segment before a parameter."""
        return {"jobs": self.job, "keys": self.alice_key_id, "agents": self.agent, "users": "alice"}.get(segment)


def tamper(token: str) -> str:
    """The same signature over a payload changed to say `sub: admin, role: admin`."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(sub="admin", role="admin")
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with in_process_app(Path(tmp_path_factory.mktemp("isolation")) / "data") as app:
        app.user("alice", password=PASSWORD)
        app.user("bob")
        alice, alice_key_id = app.key("alice")
        bob, _ = app.key("bob")
        job = app.submit(alice)["id"]
        agent = app.api("POST", "/api/v1/agents", None, {"name": "shared"}, status=201)["id"]
        without: dict[str, str] = {}
        for role, scopes in ROLE_SCOPES.items():
            owner = "alice" if role == "user" else "admin"
            for scope in scopes - (ROLE_SCOPES["user"] if role == "admin" else frozenset()):
                without[scope] = app.key(owner, sorted(scopes - {scope}))[0]
        jwt = signed_access_token(app.settings, "alice", "user")
        if jwt is not None and app.request("GET", "/api/v1/jobs", jwt).status_code != 200:
            jwt = None  # signed like the server's, yet refused: the sign-in work has not landed
        yield World(
            app=app, alice=alice, bob=bob, job=job, alice_key_id=alice_key_id, agent=agent,
            expired=app.key("alice", expires_at=time.time() - 1)[0],
            revoked=app.key("alice", revoked=True)[0],
            jwt=jwt,
            expired_jwt=signed_access_token(app.settings, "alice", "user", issued_ago_s=2 * 3600) if jwt else None,
            tampered_jwt=tamper(jwt) if jwt else None,
            without=without,
        )


def calls(world: World) -> list[Call]:
    """Every (method, route) that needs a credential, with A's resources in its path."""
    out: list[Call] = []
    for route in world.app.client.app.routes:  # type: ignore[attr-defined]
        if not isinstance(route, Route):
            continue
        requirement = requirement_of(route.endpoint)
        if requirement in (None, PUBLIC):
            continue  # None fails tests/unit/test_route_scopes.py
        path = route.path
        segments = path.strip("/").split("/")
        for i, segment in enumerate(segments):
            if segment.startswith("{"):
                resource = world.resource_for(segments[i - 1])
                if resource is None:
                    raise AssertionError(f"{route.path}: no resource of kind {segments[i - 1]!r} in the isolation matrix")
                path = path.replace(segment, resource)
        for method in sorted((route.methods or set()) - {"HEAD"}):
            out.append(Call(method, route.path, path, str(requirement)))
    return out


def credential(world: World, kind: str, call: Call) -> tuple[str | None, int] | None:
    """(the bearer token, the status it must get) for `call`; None where the cell does not apply."""
    if kind == "none":
        return None, 401
    if kind == "expired-key":
        return world.expired, 401
    if kind == "revoked-key":
        return world.revoked, 401
    if kind in ("expired-jwt", "tampered-jwt"):
        token = world.expired_jwt if kind == "expired-jwt" else world.tampered_jwt
        if token is None:
            pytest.skip("the server does not accept access tokens yet (server/security/sessions.py)")
        return token, 401
    if kind == "missing-scope":
        if call.requirement == AUTHENTICATED:
            return None  # any valid credential will do
        return world.without[call.requirement], 403
    assert kind == "other-user"
    if call.requirement not in (AUTHENTICATED, *ROLE_SCOPES["user"]):
        return world.bob, 403  # an admin's route
    if not call.has_params:
        return None  # acts on B's own things: the listings' filtering is tested below
    return world.bob, 404


def test_every_route_is_in_the_matrix(world: World) -> None:
    made = calls(world)
    templates = {c.template for c in made}
    assert {"/api/v1/jobs/{job_id}", "/api/v1/keys/{key_id}", "/api/v1/agents/{agent_id}", "/api/v1/audit"} <= templates
    assert len(made) >= 15


@pytest.mark.parametrize("kind", CREDENTIALS)
def test_refused_calls_get_the_expected_status_and_change_nothing(world: World, kind: str) -> None:
    app = world.app
    wrong: list[str] = []
    checked = 0
    for call in calls(world):
        cell = credential(world, kind, call)
        if cell is None:
            continue
        token, expected = cell
        before = app.snapshot()
        resp = app.request(call.method, call.path, token, BODIES.get((call.method, call.template)))
        after = app.snapshot()
        checked += 1
        if resp.status_code != expected:
            wrong.append(f"{call}: {resp.status_code} (expected {expected}) {resp.text[:200]}")
        elif after != before:
            wrong.append(f"{call}: refused with {expected}, yet the Store changed")
        if expected == 401 and resp.headers.get("www-authenticate") != "Bearer":
            wrong.append(f"{call}: 401 without WWW-Authenticate: Bearer")
    assert checked >= 3
    assert not wrong, "\n".join(wrong)


def test_the_owner_and_an_admin_reach_what_others_are_refused(world: World) -> None:
    """The 404s above come from ownership, not from ids that point nowhere."""
    app = world.app
    for call in calls(world):
        if call.method != "GET" or not call.has_params:
            continue
        for token in (world.alice, app.admin_key) if call.requirement in ROLE_SCOPES["user"] else (app.admin_key,):
            resp = app.request("GET", call.path, token)
            assert resp.status_code == 200, (str(call), resp.text)


def test_listings_show_only_the_callers_own(world: World) -> None:
    app = world.app
    assert app.api("GET", "/api/v1/jobs", world.bob)["jobs"] == []
    assert [j["id"] for j in app.api("GET", "/api/v1/jobs", world.alice)["jobs"]] == [world.job]
    assert world.job in {j["id"] for j in app.api("GET", "/api/v1/jobs")["jobs"]}  # the admin: all
    assert {k["owner"] for k in app.api("GET", "/api/v1/keys", world.bob)["keys"]} == {"bob"}


def test_another_users_job_answers_as_an_unknown_one(world: World) -> None:
    app = world.app
    for suffix, method in (("", "GET"), ("/logs", "GET"), ("/cancel", "POST")):
        theirs = app.request(method, f"/api/v1/jobs/{world.job}{suffix}", world.bob)
        unknown = app.request(method, f"/api/v1/jobs/job_unknown{suffix}", world.bob)
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.json() == unknown.json() == {"error": {"code": "not-found", "message": "no such job"}}


# ---- the client channel ---------------------------------------------------------------------------


def open_socket(world: World, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return world.app.client.websocket_connect("ws://127.0.0.1:8080/ws/client", headers=headers)


def subscribe(ws: Any, topic: str) -> dict[str, Any]:
    ws.send_json({"type": "subscribe", "topic": topic})
    return ws.receive_json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["none", "expired-key", "revoked-key", "expired-jwt", "tampered-jwt"])
def test_bad_credentials_are_refused_at_the_client_channel_handshake(world: World, kind: str) -> None:
    token, _ = credential(world, kind, Call("GET", "/ws/client", "/ws/client", "jobs:read")) or (None, 0)
    with pytest.raises(WebSocketDenialResponse) as refused:
        with open_socket(world, token):
            pass
    assert refused.value.status_code == 401


def test_another_users_job_topic_answers_forbidden_as_an_unknown_one(world: World) -> None:
    with open_socket(world, world.bob) as ws:
        theirs = subscribe(ws, f"job:{world.job}")
        unknown = subscribe(ws, "job:job_unknown")
    assert theirs == {"type": "error", "code": "forbidden", "message": "no such job", "job_id": world.job}
    assert unknown == {**theirs, "job_id": "job_unknown"}
    for token in (world.alice, world.app.admin_key):  # the owner, an admin
        with open_socket(world, token) as ws:
            assert subscribe(ws, f"job:{world.job}")["type"] == "subscribed"


def test_job_topics_need_jobs_read(world: World) -> None:
    with open_socket(world, world.without["jobs:read"]) as ws:
        for topic in ("jobs", f"job:{world.job}"):
            answer = subscribe(ws, topic)
            assert answer["type"] == "error" and answer["code"] == "forbidden", answer
            assert "jobs:read" in answer["message"]
        ws.send_json({"type": "ping", "id": "alive"})
        assert ws.receive_json() == {"type": "pong", "id": "alive"}


def test_the_jobs_topic_carries_only_the_callers_jobs(world: World) -> None:
    app = world.app
    with open_socket(world, world.bob) as bob, open_socket(world, app.admin_key) as admin:
        assert subscribe(bob, "jobs") == {"type": "subscribed", "topic": "jobs"}
        assert subscribe(admin, "jobs") == {"type": "subscribed", "topic": "jobs"}
        alices = app.submit(world.alice)["id"]
        bobs = app.submit(world.bob)["id"]
        # Events arrive in publish order: the first Bob gets is his own job's, not Alice's.
        first = bob.receive_json()
        assert (first["type"], first["job_id"]) == ("job-state", bobs)
        seen = [admin.receive_json()["job_id"], admin.receive_json()["job_id"]]
        assert seen == [alices, bobs]
