"""Per-user API keys through the HTTP API, in-process (tests/support/inproc.py): creation with
scopes that never exceed the caller's role or the calling key's own scopes, the secret shown once,
own keys listed, everyone's only with users:admin, revocation of one's own (anyone's with
users:admin; 404 otherwise), and their audit entries."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.inproc import JOB, App, in_process_app
from yardmaster.server.security import tokens
from yardmaster.server.security.scopes import ROLE_SCOPES

VIEW_FIELDS = {"id", "name", "prefix", "scopes", "owner", "created_at", "expires_at", "last_used_at", "revoked_at"}
USER_SCOPES = sorted(ROLE_SCOPES["user"])


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with in_process_app(tmp_path / "data") as app:
        app.user("alice")
        app.user("bob")
        yield app


def error_of(app: App, method: str, path: str, key: str | None, body: Any = None) -> tuple[int, dict[str, Any]]:
    resp = app.request(method, path, key, body)
    assert resp.status_code >= 400, (method, path, resp.text)
    return resp.status_code, resp.json()["error"]


def test_a_new_key_is_shown_once_with_all_the_callers_scopes_by_default(app: App) -> None:
    alice, _ = app.key("alice")
    resp = app.request("POST", "/api/v1/keys", alice, {"name": "laptop"})
    assert resp.status_code == 201 and resp.headers["cache-control"] == "no-store"
    created = resp.json()
    secret = created.pop("key")
    assert set(created) == VIEW_FIELDS
    assert tokens.well_formed(secret, "api-key") and created["prefix"] == tokens.hint(secret)
    assert created["owner"] == "alice" and created["scopes"] == USER_SCOPES and created["expires_at"] is None
    # It works at once, as alice.
    app.submit(secret)
    assert [j["owner"] for j in app.api("GET", "/api/v1/jobs", secret)["jobs"]] == ["alice"]
    listed = app.api("GET", "/api/v1/keys", alice)["keys"]
    assert created["id"] in {k["id"] for k in listed}
    text = str(listed)
    assert secret not in text and tokens.token_hash(secret) not in text and "key" not in listed[0]


def test_requested_scopes_are_granted_sorted_and_limit_what_the_key_does(app: App) -> None:
    alice, _ = app.key("alice")
    created = app.api("POST", "/api/v1/keys", alice, {"name": "ci", "scopes": ["jobs:read", "jobs:read"]}, status=201)
    assert created["scopes"] == ["jobs:read"]
    reader = created["key"]
    assert app.request("GET", "/api/v1/jobs", reader).status_code == 200
    status, error = error_of(app, "POST", "/api/v1/jobs", reader, JOB)
    assert (status, error["code"]) == (403, "forbidden") and "jobs:write" in error["message"]
    empty = app.api("POST", "/api/v1/keys", alice, {"name": "whoami-only", "scopes": []}, status=201)
    assert empty["scopes"] == []
    assert app.request("GET", "/api/v1/keys", empty["key"]).status_code == 200  # needs no scope
    assert app.request("GET", "/api/v1/jobs", empty["key"]).status_code == 403


def test_a_key_cannot_mint_a_stronger_key_nor_one_beyond_the_role(app: App) -> None:
    reader, _ = app.key("alice", ["jobs:read"])
    status, error = error_of(app, "POST", "/api/v1/keys", reader, {"name": "up", "scopes": ["jobs:read", "jobs:write"]})
    assert (status, error["code"], error["field"]) == (403, "forbidden", "scopes") and "jobs:write" in error["message"]
    # By default a scoped key makes a key with its own scopes, not all of the role's.
    assert app.api("POST", "/api/v1/keys", reader, {"name": "same"}, status=201)["scopes"] == ["jobs:read"]
    alice, _ = app.key("alice")
    status, error = error_of(app, "POST", "/api/v1/keys", alice, {"name": "admin-ish", "scopes": ["users:admin"]})
    assert (status, error["field"]) == (403, "scopes") and "beyond the user role" in error["message"]
    status, error = error_of(app, "POST", "/api/v1/keys", alice, {"name": "typo", "scopes": ["jobs:raed"]})
    assert (status, error["code"], error["field"]) == (422, "invalid-key", "scopes")
    # An admin key with all scopes may grant admin scopes.
    made = app.api("POST", "/api/v1/keys", None, {"name": "ops", "scopes": ["agents:admin"]}, status=201)
    assert made["owner"] == "admin" and made["scopes"] == ["agents:admin"]
    assert app.request("GET", "/api/v1/cluster", made["key"]).status_code == 200
    assert app.request("GET", "/api/v1/audit", made["key"]).status_code == 403


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "admin (first start)"}, "name"),  # bootstrap's names are kept apart
        ({"name": " padded"}, "name"),
        ({"name": "tab\there"}, "name"),
        ({"name": "ok", "expires_in_days": 0}, "expires_in_days"),
        ({"name": "ok", "expires_in_days": 3651}, "expires_in_days"),
        ({"name": "ok", "expires_in_days": "soon"}, "expires_in_days"),
        ({"name": "ok", "scopes": "jobs:read"}, "scopes"),
        ({"name": "ok", "role": "admin"}, "role"),
        ({}, "name"),
    ],
)
def test_invalid_key_requests_are_refused_naming_the_field(app: App, body: dict[str, Any], field: str) -> None:
    alice, _ = app.key("alice")
    before = app.snapshot()["keys"]
    status, error = error_of(app, "POST", "/api/v1/keys", alice, body)
    assert (status, error["code"], error.get("field")) == (422, "invalid-key", field)
    assert app.snapshot()["keys"] == before


def test_a_body_that_is_not_json_is_refused(app: App) -> None:
    alice, _ = app.key("alice")
    resp = app.client.post("/api/v1/keys", content=b"{name", headers={"Authorization": f"Bearer {alice}"})
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid-key"


def test_expiry_is_set_and_an_expired_key_is_refused(app: App) -> None:
    alice, _ = app.key("alice")
    made = app.api("POST", "/api/v1/keys", alice, {"name": "month", "expires_in_days": 30}, status=201)
    [key] = [k for k in app.run(app.rt.store.list_api_keys, "alice") if k.id == made["id"]]
    assert key.expires_at is not None and abs(key.expires_at - (time.time() + 30 * 86_400)) < 60
    old, _ = app.key("alice", expires_at=time.time() - 1)
    assert app.request("GET", "/api/v1/keys", old).status_code == 401


def test_everyones_keys_only_with_users_admin(app: App) -> None:
    alice, alice_key = app.key("alice")
    bob, bob_key = app.key("bob")
    assert [k["id"] for k in app.api("GET", "/api/v1/keys", alice)["keys"]] == [alice_key]
    status, error = error_of(app, "GET", "/api/v1/keys?all=true", alice)
    assert (status, error["code"]) == (403, "forbidden")
    everyone = {k["id"]: k["owner"] for k in app.api("GET", "/api/v1/keys?all=true")["keys"]}
    assert everyone[alice_key] == "alice" and everyone[bob_key] == "bob"
    mine = app.api("GET", "/api/v1/keys")["keys"]  # an admin without ?all sees their own
    assert {k["owner"] for k in mine} == {"admin"}
    no_users_admin, _ = app.key("admin", sorted(ROLE_SCOPES["admin"] - {"users:admin"}))
    assert error_of(app, "GET", "/api/v1/keys?all=true", no_users_admin)[0] == 403
    for method, path in (("GET", "/api/v1/keys"), ("POST", "/api/v1/keys"), ("DELETE", f"/api/v1/keys/{alice_key}")):
        status, error = error_of(app, method, path, None, {"name": "x"})
        assert (status, error["code"]) == (401, "unauthorized")


def test_revoking_own_keys_others_answer_404_admins_revoke_any(app: App) -> None:
    alice, alice_key = app.key("alice")
    spare, spare_key = app.key("alice", name="spare")
    bob, bob_key = app.key("bob")
    for key_id in (bob_key, "key_unknown"):
        status, error = error_of(app, "DELETE", f"/api/v1/keys/{key_id}", alice)
        assert (status, error) == (404, {"code": "not-found", "message": "no such key"})
    assert app.request("GET", "/api/v1/jobs", bob).status_code == 200  # untouched
    revoked = app.api("DELETE", f"/api/v1/keys/{spare_key}", alice)
    assert revoked["id"] == spare_key and revoked["revoked_at"] is not None
    assert app.request("GET", "/api/v1/jobs", spare).status_code == 401
    assert app.api("DELETE", f"/api/v1/keys/{bob_key}")["owner"] == "bob"  # the admin
    assert app.request("GET", "/api/v1/jobs", bob).status_code == 401
    again = app.api("DELETE", f"/api/v1/keys/{spare_key}", alice)
    assert again["revoked_at"] == revoked["revoked_at"]
    # A key may revoke itself.
    assert app.api("DELETE", f"/api/v1/keys/{alice_key}", alice)["revoked_at"] is not None
    assert app.request("GET", "/api/v1/keys", alice).status_code == 401


def test_created_and_revoked_keys_are_audited_once_without_secrets(app: App) -> None:
    alice, _ = app.key("alice")
    made = app.api("POST", "/api/v1/keys", alice, {"name": "deploy", "scopes": ["jobs:write"], "expires_in_days": 7},
                   status=201)
    app.api("DELETE", f"/api/v1/keys/{made['id']}", alice)
    app.api("DELETE", f"/api/v1/keys/{made['id']}", alice)  # again: no second entry
    entries = app.api("GET", "/api/v1/audit?action=key.")["entries"]
    assert [(e["action"], e["actor"], e["target"]) for e in entries] == [
        ("key.revoked", "alice", made["id"]),
        ("key.created", "alice", made["id"]),
    ]
    created = entries[1]
    assert created["details"] == {"name": "deploy", "scopes": ["jobs:write"], "expires_at": made["expires_at"]}
    assert created["client_address"] == "testclient"
    assert entries[0]["details"] == {"name": "deploy", "owner": "alice"}
    text = str(entries)
    assert made["key"] not in text and tokens.token_hash(made["key"]) not in text and made["prefix"] not in text
