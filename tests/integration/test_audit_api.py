"""GET /api/v1/audit in-process: who may read it, its filters and cursor, 422 naming a bad
parameter, the entries the API writes (agents, an admin's cancel of another user's job), and no
issued credential anywhere in the whole trail."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.inproc import App, in_process_app
from yardmaster.server.security import tokens
from yardmaster.server.security.scopes import ROLE_SCOPES

ENTRY_FIELDS = {"id", "at", "action", "actor", "target", "client_address", "details"}
PASSWORD = "correct horse battery staple"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with in_process_app(tmp_path / "data") as app:
        app.user("alice", password=PASSWORD)
        app.user("bob")
        yield app


def whole_trail(app: App, page: int = 7) -> list[dict[str, Any]]:
    """Every entry, following the cursor in pages of `page`."""
    entries: list[dict[str, Any]] = []
    cursor = ""
    while True:
        body = app.api("GET", f"/api/v1/audit?limit={page}{cursor}")
        entries += body["entries"]
        if body["next"] is None:
            assert len(body["entries"]) < page
            return entries
        assert body["next"] == body["entries"][-1]["id"]
        cursor = f"&before={body['next']}"


def test_only_users_admin_reads_the_trail(app: App) -> None:
    alice, _ = app.key("alice")
    admin_without, _ = app.key("admin", sorted(ROLE_SCOPES["admin"] - {"users:admin"}))
    for key, status in ((None, 401), ("ymk_garbage", 401), (alice, 403), (admin_without, 403)):
        resp = app.request("GET", "/api/v1/audit", key)
        assert resp.status_code == status, (key, resp.text)
    assert app.request("GET", "/api/v1/audit", app.admin_key).status_code == 200


def test_agent_changes_and_an_admins_cancel_are_audited(app: App) -> None:
    alice, _ = app.key("alice")
    agent = app.api("POST", "/api/v1/agents", None, {"name": "a1", "labels": ["gpu"], "capacity": 3}, status=201)
    app.api("PATCH", f"/api/v1/agents/{agent['id']}", None, {"capacity": 5})
    app.api("POST", f"/api/v1/agents/{agent['id']}/drain", None, None, status=202)
    app.api("DELETE", f"/api/v1/agents/{agent['id']}")
    own = app.submit(alice)
    app.api("POST", f"/api/v1/jobs/{own['id']}/cancel", alice, None, status=202)  # the owner's: no entry
    other = app.submit(alice)
    app.api("POST", f"/api/v1/jobs/{other['id']}/cancel", None, None, status=202)  # the admin's
    assert app.request("POST", f"/api/v1/jobs/{other['id']}/cancel", app.admin_key).status_code == 409  # no entry
    entries = list(reversed(app.api("GET", "/api/v1/audit")["entries"]))
    assert all(set(e) == ENTRY_FIELDS for e in entries)
    assert [(e["action"], e["actor"], e["target"], e["details"]) for e in entries] == [
        ("agent.created", "admin", agent["id"], {"name": "a1", "labels": ["gpu"], "capacity": 3}),
        ("agent.updated", "admin", agent["id"], {"name": "a1", "capacity": 5}),
        ("agent.drained", "admin", agent["id"], {"name": "a1", "connected": False}),
        ("agent.revoked", "admin", agent["id"], {"name": "a1"}),
        ("job.cancelled-by-admin", "admin", other["id"], {"owner": "alice"}),
    ]
    assert {e["client_address"] for e in entries} == {"testclient"}
    assert agent["token"] not in str(entries)


def test_filters_and_the_cursor(app: App) -> None:
    audit = app.rt.audit
    for action, actor in (("key.created", "alice"), ("key.revoked", "alice"), ("key.created", "bob"), ("user.updated", "alice")):
        app.run(lambda a=action, b=actor: audit.record(a, actor=b, target="t"))
    def actions(query: str) -> list[tuple[str, str]]:
        return [(e["action"], e["actor"]) for e in app.api("GET", f"/api/v1/audit?{query}")["entries"]]

    assert actions("actor=alice") == [("user.updated", "alice"), ("key.revoked", "alice"), ("key.created", "alice")]
    assert actions("action=key.created") == [("key.created", "bob"), ("key.created", "alice")]
    assert actions("action=key.") == [("key.created", "bob"), ("key.revoked", "alice"), ("key.created", "alice")]
    assert actions("action=key.&actor=alice") == [("key.revoked", "alice"), ("key.created", "alice")]
    assert actions("action=key") == []  # no prefix without the dot
    first = app.api("GET", "/api/v1/audit?limit=2")
    assert len(first["entries"]) == 2 and first["next"] == first["entries"][1]["id"]
    rest = app.api("GET", f"/api/v1/audit?limit=2&before={first['next']}")
    assert [e["id"] for e in rest["entries"]] == [e["id"] for e in app.api("GET", "/api/v1/audit")["entries"][2:4]]
    assert len(whole_trail(app, page=3)) == 4

    # since: unix seconds or RFC 3339 (any zone); entries at or after it.
    later = time.time() + 0.05
    time.sleep(0.1)
    app.run(lambda: audit.record("user.disabled", actor="admin", target="bob"))
    assert actions(f"since={later}") == [("user.disabled", "admin")]
    iso = datetime.fromtimestamp(later, UTC).isoformat()
    assert actions(f"since={iso.replace('+00:00', 'Z')}") == [("user.disabled", "admin")]
    assert actions(f"since={datetime.fromtimestamp(later, UTC).astimezone().isoformat().replace('+', '%2B')}") == [
        ("user.disabled", "admin")
    ]
    assert len(actions("since=0")) == 5


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=many", "limit"),
        ("since=yesterday", "since"),
        ("since=2025-01-31T12:00:00", "since"),  # no zone
        ("since=nan", "since"),
        ("action=Key%20Created", "action"),
        ("action=", "action"),
        ("actor=" + "x" * 201, "actor"),
        ("before=", "before"),
    ],
)
def test_a_bad_parameter_is_named(app: App, query: str, field: str) -> None:
    resp = app.request("GET", f"/api/v1/audit?{query}", app.admin_key)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "invalid-parameter" and resp.json()["error"]["field"] == field


def test_no_issued_credential_ever_appears_in_the_trail(app: App) -> None:
    """Keys (admin's, users', minted through the API), agent tokens, tickets, and, once sign-in
    exists, passwords (right and wrong), access and refresh tokens: none of them, nor their
    SHA-256 digests, in the whole audit output."""
    secrets: list[str] = [app.admin_key, PASSWORD]
    alice, alice_key_id = app.key("alice")
    secrets.append(alice)
    made = app.api("POST", "/api/v1/keys", alice, {"name": "laptop"}, status=201)
    secrets.append(made["key"])
    app.api("DELETE", f"/api/v1/keys/{made['id']}", alice)
    admin_made = app.api("POST", "/api/v1/keys", None, {"name": "ops", "scopes": ["agents:admin"]}, status=201)
    secrets.append(admin_made["key"])
    agent = app.api("POST", "/api/v1/agents", admin_made["key"], {"name": "a1"}, status=201)
    secrets.append(agent["token"])
    app.api("DELETE", f"/api/v1/agents/{agent['id']}", admin_made["key"])
    secrets.append(app.api("POST", "/api/v1/ws-tickets", alice, None, status=201)["ticket"])
    job = app.submit(alice)
    app.api("POST", f"/api/v1/jobs/{job['id']}/cancel", None, None, status=202)
    app.api("DELETE", f"/api/v1/keys/{alice_key_id}")

    signed_in = sign_in_credentials(app)
    secrets += signed_in
    trail = whole_trail(app)
    actions = {e["action"] for e in trail}
    assert {"key.created", "key.revoked", "agent.created", "agent.revoked", "job.cancelled-by-admin"} <= actions
    if signed_in:
        assert {"login.succeeded", "login.failed"} <= actions
    text = str(trail) + repr(app.request("GET", "/api/v1/audit?limit=1000", app.admin_key).content)
    for secret in secrets:
        for form in (secret, tokens.token_hash(secret)):
            assert form not in text, f"a credential ({secret[:4]}…) is in the audit trail"


def sign_in_credentials(app: App) -> list[str]:
    """Sign in as alice (a wrong password first, and a refresh), if the sign-in routes exist;
    the credentials issued. [] before they land."""
    wrong = "not the password, but long enough"
    failed = app.request("POST", "/api/v1/auth/login", None, {"username": "alice", "password": wrong})
    if failed.status_code == 404:
        return []
    assert failed.status_code == 401, failed.text
    tokens_ = app.api("POST", "/api/v1/auth/login", None, {"username": "alice", "password": PASSWORD})
    refreshed = app.api("POST", "/api/v1/auth/refresh", None, {"refresh_token": tokens_["refresh_token"]})
    app.request("POST", "/api/v1/auth/logout", refreshed["access_token"], {"refresh_token": refreshed["refresh_token"]})
    return [wrong, tokens_["access_token"], tokens_["refresh_token"], refreshed["access_token"], refreshed["refresh_token"]]
