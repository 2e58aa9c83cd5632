"""Accounts over real HTTP against a real server process: /api/v1/users (admin), /api/v1/users/me,
/api/v1/users/me/password and /api/v1/auth/register, every refusal they give, the audit trail
they leave, and that no password or hash ever appears in a response."""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.cluster import HttpError, ServerProcess, http
from tests.support.cluster_plugin import Cluster
from tests.support.keys import client_socket, close_code, put_key
from yardmaster.server.backends.base import Store
from yardmaster.server.backends.records import AuditRecord, UserRecord
from yardmaster.server.backends.sqlite_store import SqliteStore
from yardmaster.server.security import passwords

T = TypeVar("T")
REVOKED = 4001
PASSWORD = "correct horse battery staple"
_n = itertools.count()


# ---- one server for the module (the tests use distinct usernames) -----------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cluster = Cluster(tmp_path_factory.mktemp("users"))
    try:
        yield cluster.server()
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cluster = Cluster(tmp_path_factory.mktemp("signup"))
    try:
        yield cluster.server(env={"YM_ALLOW_SIGNUP": "true"})
    finally:
        cluster.close()


def unique(name: str) -> str:
    return f"{name}{next(_n)}"


def call(server: ServerProcess, method: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    """(status, parsed body or None), refusals included. No body ever holds a password or a hash."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(server.url + path, data=data, method=method)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    text = payload.decode()
    assert "$argon2" not in text and PASSWORD not in text, text
    parsed = json.loads(text) if text else None
    assert not any("password" in k for k in keys_of(parsed)), parsed
    return status, parsed


def keys_of(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from keys_of(v)
    elif isinstance(value, list):
        for v in value:
            yield from keys_of(v)


def error(payload: Any) -> tuple[str, str | None]:
    return payload["error"]["code"], payload["error"].get("field")


def in_store(server: ServerProcess, fn: Callable[[Store], Awaitable[T]]) -> T:
    """Read or write the server's SQLite file directly (shared by processes on one host)."""

    async def run() -> T:
        store = SqliteStore(str(Path(server.data_dir) / "yardmaster.db"))
        await store.start()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def audit_of(server: ServerProcess, target: str) -> list[AuditRecord]:
    entries = in_store(server, lambda s: s.list_audit(limit=1000))
    return [e for e in entries if e.target == target]


def create(server: ServerProcess, **body: Any) -> dict[str, Any]:
    body.setdefault("username", unique("user"))
    status, user = call(server, "POST", "/api/v1/users", body, server.admin_key)
    assert status == 201, user
    return dict(user)


# ---- every refusal: no credential (401), a user's credential on admin routes (403), 404 --------------

ADMIN_ROUTES = [
    ("POST", "/api/v1/users"),
    ("GET", "/api/v1/users"),
    ("GET", "/api/v1/users/admin"),
    ("PATCH", "/api/v1/users/admin"),
    ("DELETE", "/api/v1/users/admin"),
]
SELF_ROUTES = [("GET", "/api/v1/users/me"), ("PATCH", "/api/v1/users/me"), ("POST", "/api/v1/users/me/password")]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES + SELF_ROUTES)
def test_every_account_route_refuses_a_caller_without_a_valid_credential(server: ServerProcess, method: str, path: str) -> None:
    for key in (None, "ymk_garbage"):
        status, body = call(server, method, path, {} if method in ("POST", "PATCH") else None, key)
        assert status == 401 and error(body) == ("unauthorized", None)


def test_the_admin_routes_refuse_a_users_key_and_change_nothing(server: ServerProcess) -> None:
    name = unique("ulla")
    key, _ = put_key(server, name, "user")
    before = in_store(server, lambda s: s.list_users(limit=1000))
    for method, path in ADMIN_ROUTES:
        body = {"username": "mallory", "role": "admin"} if method == "POST" else {"role": "user"} if method == "PATCH" else None
        status, refused = call(server, method, path, body, key)
        assert status == 403 and error(refused) == ("forbidden", None), (method, path)
    assert in_store(server, lambda s: s.list_users(limit=1000)) == before


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_an_unknown_user_is_404(server: ServerProcess, method: str) -> None:
    status, body = call(server, method, "/api/v1/users/usr_nobody", {"role": "user"} if method == "PATCH" else None, server.admin_key)
    assert status == 404 and error(body) == ("not-found", None)


# ---- creating and listing -------------------------------------------------------------------------


def test_an_admin_creates_a_user_and_reads_it_back_without_any_password(server: ServerProcess) -> None:
    name = unique("Grace")
    user = create(
        server, username=name, password=PASSWORD, email=f"{name}@Example.com", first_name="Grace", last_name="Hopper",
        image_url="https://example.com/g.png", phone="+1 (555) 010-0199", metadata={"team": "compilers", "n": [1, 2]},
    )
    assert user["id"].startswith("usr_")
    assert {k: user[k] for k in ("username", "email", "first_name", "last_name", "role", "disabled")} == {
        "username": name, "email": f"{name}@Example.com", "first_name": "Grace", "last_name": "Hopper", "role": "user",
        "disabled": False,
    }
    assert user["metadata"] == {"team": "compilers", "n": [1, 2]} and user["phone"] == "+1 (555) 010-0199"
    assert user["created_at"].endswith("Z") and user["last_login_at"] is None and user["disabled_at"] is None
    assert set(user) == {
        "id", "username", "email", "first_name", "last_name", "image_url", "phone", "metadata", "role", "created_at",
        "last_login_at", "disabled", "disabled_at",
    }
    assert call(server, "GET", f"/api/v1/users/{user['id']}", key=server.admin_key) == (200, user)
    stored = in_store(server, lambda s: s.get_user(user["id"]))
    assert stored is not None and stored.password_hash is not None and stored.password_hash.startswith("$argon2id$")
    assert passwords.verify(stored.password_hash, PASSWORD)[0]
    [entry] = audit_of(server, user["id"])
    assert (entry.action, entry.actor, entry.client_address) == ("user.created", "admin", "127.0.0.1")
    assert entry.details == {"username": name, "role": "user"}


def test_the_user_list_pages_by_id_with_a_cursor(server: ServerProcess) -> None:
    for _ in range(3):
        create(server)
    seen: list[str] = []
    after = ""
    while True:
        status, page = call(server, "GET", f"/api/v1/users?limit=2{'&after=' + after if after else ''}", key=server.admin_key)
        assert status == 200 and len(page["users"]) <= 2
        seen += [u["id"] for u in page["users"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert seen == [u.id for u in in_store(server, lambda s: s.list_users(limit=1000))]
    for bad in ("0", "501", "many"):
        status, body = call(server, "GET", f"/api/v1/users?limit={bad}", key=server.admin_key)
        assert status == 422 and error(body) == ("invalid-parameter", "limit")


def test_usernames_and_emails_are_taken_whatever_their_case(server: ServerProcess) -> None:
    name = unique("Taken")
    create(server, username=name, email=f"{name}@example.com")
    for body, field in (
        ({"username": name.upper()}, "username"),
        ({"username": unique("other"), "email": f"{name.lower()}@EXAMPLE.com"}, "email"),
    ):
        status, refused = call(server, "POST", "/api/v1/users", body, server.admin_key)
        assert status == 409 and error(refused) == ("conflict", field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": ".dot"}, "username"),
        ({"username": "x" * 65}, "username"),
        ({"username": "ok", "email": "not-an-email"}, "email"),
        ({"username": "ok", "password": "short"}, "password"),
        ({"username": "ok", "password": "p" * 1025}, "password"),
        ({"username": "ok", "image_url": "javascript:alert(1)"}, "image_url"),
        ({"username": "ok", "phone": "call me maybe"}, "phone"),
        ({"username": "ok", "first_name": "x" * 101}, "first_name"),
        ({"username": "ok", "metadata": [1, 2]}, "metadata"),
        ({"username": "ok", "metadata": {"big": "x" * 16_400}}, "metadata"),
        ({"username": "ok", "role": "root"}, "role"),
        ({"username": "ok", "password_hash": "$argon2id$..."}, "password_hash"),
        ({"email": "a@example.com"}, "username"),
    ],
)
def test_a_bad_user_is_422_naming_the_field_and_stores_nothing(server: ServerProcess, body: dict[str, Any], field: str) -> None:
    before = len(in_store(server, lambda s: s.list_users(limit=1000)))
    status, refused = call(server, "POST", "/api/v1/users", body, server.admin_key)
    assert status == 422 and error(refused) == ("invalid-user", field)
    assert len(in_store(server, lambda s: s.list_users(limit=1000))) == before


def test_malformed_and_oversized_bodies_are_refused(server: ServerProcess) -> None:
    for raw in (b"", b"{", b"[]", b'"text"'):
        try:
            http("POST", server.url + "/api/v1/users", server.admin_key, raw=raw)
            raise AssertionError("accepted")
        except HttpError as exc:
            assert exc.status == 422 and exc.body["error"]["code"] == "invalid-user"
    huge = json.dumps({"username": "big", "metadata": {"k": "x" * 70_000}}).encode()
    try:
        http("POST", server.url + "/api/v1/users", server.admin_key, raw=huge)
        raise AssertionError("accepted")
    except HttpError as exc:
        assert exc.status == 413 and exc.body["error"]["code"] == "too-large"


# ---- the caller's own account ---------------------------------------------------------------------


def test_a_user_reads_and_edits_their_profile_but_not_their_role(server: ServerProcess) -> None:
    name = unique("pat")
    key, _ = put_key(server, name, "user")
    status, me = call(server, "GET", "/api/v1/users/me", key=key)
    assert status == 200 and (me["id"], me["username"], me["role"]) == (name, name, "user")

    change = {"first_name": "Pat", "last_name": "Doe", "image_url": "https://example.com/p.png", "phone": "+49 30 1234",
              "metadata": {"theme": "dark"}}
    status, edited = call(server, "PATCH", "/api/v1/users/me", change, key)
    assert status == 200 and {k: edited[k] for k in change} == change
    status, cleared = call(server, "PATCH", "/api/v1/users/me", {"image_url": None, "phone": None}, key)
    assert status == 200 and cleared["image_url"] is None and cleared["phone"] is None and cleared["first_name"] == "Pat"

    for body, field in (({"role": "admin"}, "role"), ({"username": "x"}, "username"), ({"email": "x@example.com"}, "email"),
                        ({"metadata": {"k": "x" * 16_400}}, "metadata"), ({"phone": "555-CALL"}, "phone")):
        status, refused = call(server, "PATCH", "/api/v1/users/me", body, key)
        assert status == 422 and error(refused) == ("invalid-user", field), body
    stored = in_store(server, lambda s: s.get_user(name))
    assert stored is not None and stored.role == "user" and stored.first_name == "Pat"
    updates = [e for e in audit_of(server, name) if e.action == "user.updated"]
    assert [e.details for e in updates] == [{"fields": ["image_url", "phone"]}, {"fields": sorted(change)}]
    assert all(e.actor == name for e in updates)


def login(server: ServerProcess, username: str, password: str) -> tuple[int, Any]:
    return call(server, "POST", "/api/v1/auth/login", {"username": username, "password": password})


def test_a_password_change_needs_the_current_password_and_signs_out_every_session(server: ServerProcess) -> None:
    user = create(server, password=PASSWORD)
    status, session = login(server, user["username"], PASSWORD)
    assert status == 200, session
    key = session["access_token"]
    new = "a brand new passphrase"
    path = "/api/v1/users/me/password"
    for body, status_code, expected in (
        ({"new_password": new}, 422, ("invalid-user", "current_password")),
        ({"new_password": new, "current_password": "not the password"}, 403, ("wrong-password", "current_password")),
        ({"new_password": "short", "current_password": PASSWORD}, 422, ("invalid-user", "new_password")),
        ({"password": new}, 422, ("invalid-user", "password")),
    ):
        status, refused = call(server, "POST", path, body, key)
        assert status == status_code and error(refused) == expected, body
        assert new not in json.dumps(refused)
    stored = in_store(server, lambda s: s.get_user(user["id"]))
    assert stored is not None and stored.password_hash is not None and passwords.verify(stored.password_hash, PASSWORD)[0]

    status, _ = call(server, "POST", path, {"new_password": new, "current_password": PASSWORD}, key)
    assert status == 204
    stored = in_store(server, lambda s: s.get_user(user["id"]))
    assert stored is not None and stored.password_hash is not None
    assert passwords.verify(stored.password_hash, new)[0] and not passwords.verify(stored.password_hash, PASSWORD)[0]
    status, refused = call(server, "POST", "/api/v1/auth/refresh", {"refresh_token": session["refresh_token"]})
    assert status == 401  # every session signed out: its refresh token ...
    assert call(server, "GET", "/api/v1/users/me", None, key)[0] == 401  # ... and its access token, at once
    assert login(server, user["username"], PASSWORD)[0] == 401
    status, fresh = login(server, user["username"], new)
    assert status == 200 and call(server, "GET", "/api/v1/users/me", None, fresh["access_token"])[0] == 200
    changed = [e for e in audit_of(server, user["id"]) if e.action == "user.password-changed"]
    assert [(e.actor, e.details) for e in changed] == [(user["id"], {"sessions_revoked": 1})]


def test_the_bootstrap_admin_sets_a_first_password_with_the_new_one_alone(cluster: Cluster) -> None:
    srv = cluster.server("fresh")
    path = "/api/v1/users/me/password"
    status, _ = call(srv, "POST", path, {"new_password": PASSWORD}, srv.admin_key)
    assert status == 204
    status, refused = call(srv, "POST", path, {"new_password": "another good passphrase"}, srv.admin_key)
    assert status == 422 and error(refused) == ("invalid-user", "current_password")  # now it has one
    admin = in_store(srv, lambda s: s.get_user("admin"))
    assert admin is not None and admin.password_hash is not None and passwords.verify(admin.password_hash, PASSWORD)[0]


# ---- what an admin changes: role, disabled; deleting ---------------------------------------------


def test_a_role_change_applies_at_once(server: ServerProcess) -> None:
    name = unique("rita")
    key, _ = put_key(server, name, "user")
    assert call(server, "GET", "/api/v1/users", key=key)[0] == 403
    status, promoted = call(server, "PATCH", f"/api/v1/users/{name}", {"role": "admin"}, server.admin_key)
    assert status == 200 and promoted["role"] == "admin"
    assert call(server, "GET", "/api/v1/users", key=key)[0] == 200  # the key acts with the role now
    ws = client_socket(server, key)
    status, demoted = call(server, "PATCH", f"/api/v1/users/{name}", {"role": "user"}, server.admin_key)
    assert status == 200 and demoted["role"] == "user"
    assert close_code(ws, 5) == REVOKED  # it was opened as an admin's
    assert call(server, "GET", "/api/v1/users", key=key)[0] == 403
    changes = [(e.action, e.details) for e in reversed(audit_of(server, name))]
    assert changes == [("user.role-changed", {"from": "user", "to": "admin"}), ("user.role-changed", {"from": "admin", "to": "user"})]
    for body, field in (({"role": "root"}, "role"), ({"disabled": "yes"}, "disabled"), ({"username": "x"}, "username")):
        status, refused = call(server, "PATCH", f"/api/v1/users/{name}", body, server.admin_key)
        assert status == 422 and error(refused) == ("invalid-user", field)


def test_disabling_a_user_shuts_every_door_and_enabling_opens_the_account_again(server: ServerProcess) -> None:
    name = unique("dora")
    key, key_id = put_key(server, name, "user")
    ws = client_socket(server, key)
    status, disabled = call(server, "PATCH", f"/api/v1/users/{name}", {"disabled": True}, server.admin_key)
    assert status == 200 and disabled["disabled"] is True and disabled["disabled_at"].endswith("Z")
    assert close_code(ws, 5) == REVOKED
    status, refused = call(server, "GET", "/api/v1/users/me", key=key)
    assert status == 401
    keys = in_store(server, lambda s: s.list_api_keys(owner=name))
    assert [(k.id, k.revoked_at is not None) for k in keys] == [(key_id, True)]
    [entry] = [e for e in audit_of(server, name) if e.action == "user.disabled"]
    assert entry.actor == "admin" and entry.details == {"keys_revoked": 1, "sessions_revoked": 0}

    status, enabled = call(server, "PATCH", f"/api/v1/users/{name}", {"disabled": False}, server.admin_key)
    assert status == 200 and enabled["disabled"] is False and enabled["disabled_at"] is None
    assert call(server, "GET", "/api/v1/users/me", key=key)[0] == 401  # its keys stay revoked: make new ones
    assert [e.action for e in audit_of(server, name)][0] == "user.enabled"


def test_the_bootstrap_admin_cannot_be_disabled_demoted_or_deleted(server: ServerProcess) -> None:
    for method, body in (("PATCH", {"disabled": True}), ("PATCH", {"role": "user"}), ("DELETE", None)):
        status, refused = call(server, method, "/api/v1/users/admin", body, server.admin_key)
        assert status == 409 and error(refused) == ("bootstrap-admin", None), (method, body)
    admin = in_store(server, lambda s: s.get_user("admin"))
    assert admin is not None and admin.role == "admin" and admin.disabled_at is None


def test_an_admin_cannot_disable_demote_or_delete_themselves(server: ServerProcess) -> None:
    name = unique("adele")
    key, _ = put_key(server, name, "admin")
    for method, body in (("PATCH", {"disabled": True}), ("PATCH", {"role": "user"}), ("DELETE", None)):
        status, refused = call(server, method, f"/api/v1/users/{name}", body, key)
        assert status == 409 and error(refused) == ("own-account", None), (method, body)
    assert call(server, "GET", "/api/v1/users/me", key=key)[1]["role"] == "admin"
    status, same = call(server, "PATCH", f"/api/v1/users/{name}", {"role": "admin", "disabled": False}, key)
    assert status == 200 and same["role"] == "admin"  # changing nothing is no refusal


def test_deleting_a_user_revokes_their_keys_and_keeps_their_jobs(server: ServerProcess) -> None:
    name = unique("del")
    key, key_id = put_key(server, name, "user")
    status, job = call(server, "POST", "/api/v1/jobs", {"image": "busybox", "command": ["true"], "labels": ["nowhere"]}, key)
    assert status == 201, job
    ws = client_socket(server, key)
    status, nothing = call(server, "DELETE", f"/api/v1/users/{name}", key=server.admin_key)
    assert (status, nothing) == (204, None)
    assert close_code(ws, 5) == REVOKED
    assert call(server, "GET", f"/api/v1/users/{name}", key=server.admin_key)[0] == 404
    assert call(server, "GET", "/api/v1/users/me", key=key)[0] == 401
    assert call(server, "DELETE", f"/api/v1/users/{name}", key=server.admin_key)[0] == 404
    assert call(server, "GET", f"/api/v1/jobs/{job['id']}", key=server.admin_key)[1]["owner"] == name
    revoked = in_store(server, lambda s: s.list_api_keys(owner=name))
    assert [(k.id, k.revoked_at is not None) for k in revoked] == [(key_id, True)]
    [entry] = [e for e in audit_of(server, name) if e.action == "user.deleted"]
    assert entry.details == {"username": name, "keys_revoked": 1, "sessions_revoked": 0}
    # The name is free again, for a new account with a new id.
    assert create(server, username=name)["id"] != name


# ---- self-registration -------------------------------------------------------------------------------


def test_registration_is_off_unless_YM_ALLOW_SIGNUP(server: ServerProcess) -> None:
    before = len(in_store(server, lambda s: s.list_users(limit=1000)))
    status, refused = call(server, "POST", "/api/v1/auth/register", {"username": unique("eve"), "password": PASSWORD})
    assert status == 403 and error(refused) == ("signup-disabled", None)
    assert len(in_store(server, lambda s: s.list_users(limit=1000))) == before


def test_anyone_registers_a_user_account_when_signup_is_on(open_server: ServerProcess) -> None:
    name = unique("Newbie")
    body = {"username": name, "password": PASSWORD, "email": f"{name}@example.com", "first_name": "New"}
    status, user = call(open_server, "POST", "/api/v1/auth/register", body)
    assert status == 201 and (user["username"], user["role"], user["first_name"]) == (name, "user", "New")
    stored = in_store(open_server, lambda s: s.find_user(name.lower()))
    assert isinstance(stored, UserRecord) and stored.password_hash is not None
    assert passwords.verify(stored.password_hash, PASSWORD)[0]
    [entry] = audit_of(open_server, user["id"])
    assert (entry.action, entry.actor, entry.details) == ("user.registered", user["id"], {"username": name, "role": "user"})

    for extra, status_code, expected in (
        ({"username": name.upper()}, 409, ("conflict", "username")),
        ({"username": unique("x"), "email": f"{name.upper()}@example.com"}, 409, ("conflict", "email")),
        ({"username": unique("x"), "role": "admin"}, 422, ("invalid-user", "role")),
        ({"username": unique("x"), "password": "short"}, 422, ("invalid-user", "password")),
        ({"username": "-bad"}, 422, ("invalid-user", "username")),
    ):
        status, refused = call(open_server, "POST", "/api/v1/auth/register", {"password": PASSWORD, **extra})
        assert status == status_code and error(refused) == expected, extra
    status, refused = call(open_server, "POST", "/api/v1/auth/register", {"username": unique("y")})
    assert status == 422 and error(refused) == ("invalid-user", "password")
