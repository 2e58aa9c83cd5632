"""Sign-in over HTTP against one in-process replica (real SqliteStore and MemoryBroker, the whole
Starlette stack): password login, the access token as a bearer, the JWT negative matrix through
the API, refresh rotation and reuse detection, logout (denylisted jti, revoked family), cookies
with their CSRF check, the JWKS, login throttling, and what the audit trail records of it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from argon2 import PasswordHasher
from starlette.responses import Response
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from tests.support import jwts
from tests.support.inproc import App, in_process_app
from yardmaster.server.backends.keys import denied_token_counter
from yardmaster.server.backends.records import RefreshTokenRecord
from yardmaster.server.core.client_sockets import Revocation
from yardmaster.server.security import passwords, tokens
from yardmaster.server.security.sessions import TokenResponse, clear_session_cookies, set_session_cookies

PASSWORD = "correct horse battery staple"
SAME_ORIGIN = {"Origin": "http://127.0.0.1:8080"}
EVIL = {"Origin": "https://evil.example"}


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    with in_process_app(tmp_path / "data") as app:
        app.user("alice", password=PASSWORD)
        yield app


def login(app: App, username: str = "alice", password: str = PASSWORD, **extra: Any) -> httpx.Response:
    return app.request("POST", "/api/v1/auth/login", body={"username": username, "password": password, **extra},
                       headers=extra.pop("headers", None))


def tokens_of(app: App, username: str = "alice") -> dict[str, Any]:
    resp = login(app, username)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def status(app: App, token: str, method: str = "GET", path: str = "/api/v1/jobs") -> int:
    return app.request(method, path, token).status_code


def refresh(app: App, token: str) -> httpx.Response:
    return app.request("POST", "/api/v1/auth/refresh", body={"refresh_token": token})


def audit(app: App, action: str | None = None) -> list[dict[str, Any]]:
    entries = msgspec.to_builtins(app.run(lambda: app.rt.audit.list(action=action)))
    return entries  # type: ignore[no-any-return]


def disable(app: App, user_id: str) -> None:
    """What disabling a user does (UserService): the record, then the revocation every replica hears."""
    app.run(app.rt.store.update_user, user_id, {"disabled_at": time.time()})
    app.run(app.rt.client_sockets.revoke, Revocation(principal_id=user_id))


# ---- login ---------------------------------------------------------------------------------------------


def test_login_answers_the_oauth_token_response_and_the_access_token_works_as_a_bearer(app: App) -> None:
    resp = login(app)
    assert resp.status_code == 200
    body = resp.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 900
    assert tokens.well_formed(body["refresh_token"], "refresh")
    assert resp.headers["cache-control"] == "no-store"
    access = body["access_token"]
    assert status(app, access) == 200
    assert app.request("POST", "/api/v1/jobs", access, {"image": "alpine:3", "command": ["true"], "labels": ["x"]}).status_code == 201
    assert status(app, access, "POST", "/api/v1/agents") == 403  # a user's token has a user's scopes
    user = app.run(app.rt.store.get_user, "alice")
    assert user is not None and user.last_login_at is not None
    (entry,) = audit(app, "login.succeeded")
    assert (entry["actor"], entry["target"], entry["client_address"]) == ("alice", "alice", "testclient")


def test_login_takes_the_username_in_any_case_or_the_email(app: App) -> None:
    for name in ("ALICE", "alice@example.test", "Alice@Example.TEST"):
        assert login(app, name).status_code == 200, name


def test_wrong_password_unknown_user_and_disabled_user_get_the_same_401(app: App) -> None:
    app.user("bob", password=PASSWORD)
    disable(app, "bob")
    answers = [login(app, "alice", "wrong password here"), login(app, "nobody"), login(app, "bob")]
    assert {r.status_code for r in answers} == {401}
    assert len({r.content for r in answers}) == 1
    assert answers[0].json()["error"]["code"] == "invalid-credentials"
    long_login = "x" * 100
    assert login(app, long_login, "another wrong one").status_code == 401
    failed = audit(app, "login.failed")
    assert sorted(e["details"]["login"] for e in failed) == sorted(["alice", "nobody", "bob", "x" * 64])
    assert all(e["actor"] is None and e["client_address"] == "testclient" for e in failed)
    trail = msgspec.json.encode(audit(app)).decode()
    assert "wrong password here" not in trail and PASSWORD not in trail


def test_a_hash_with_old_argon2_parameters_is_replaced_on_login(app: App) -> None:
    old = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    app.run(app.rt.store.update_user, "alice", {"password_hash": old})
    assert login(app).status_code == 200
    user = app.run(app.rt.store.get_user, "alice")
    assert user is not None and user.password_hash != old
    assert passwords.verify(user.password_hash, PASSWORD) == (True, None)  # current parameters now
    assert login(app).status_code == 200


def test_a_malformed_login_body_is_422_and_never_echoes_the_password(app: App) -> None:
    resp = app.request("POST", "/api/v1/auth/login", body={"username": "alice", "password": 12345678901234})
    assert resp.status_code == 422 and "12345678901234" not in resp.text
    assert app.request("POST", "/api/v1/auth/login", body=["alice"]).status_code == 422


# ---- the JWT negative matrix, through the API ------------------------------------------------------------


def test_every_forged_or_broken_access_token_is_refused_with_401(app: App) -> None:
    issuer = app.rt.sessions.access
    assert status(app, jwts.signed(issuer, jwts.good_claims(issuer, "alice"))) == 200  # forging is right
    server = jwts.CountingServer()
    try:
        forged = jwts.matrix(issuer, "alice", "user", server.url)
        answers = {name: app.request("GET", "/api/v1/jobs", token) for name, token in forged.items()}
        assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(forged, 401)
        assert {r.json()["error"]["code"] for r in answers.values()} == {"unauthorized"}
        assert server.requests == []  # jku / x5u never fetched
    finally:
        server.close()


def test_a_token_of_a_disabled_or_deleted_user_is_refused(app: App) -> None:
    app.user("bob", password=PASSWORD)
    alice, bob = tokens_of(app, "alice")["access_token"], tokens_of(app, "bob")["access_token"]
    assert status(app, alice) == 200 and status(app, bob) == 200  # and cached now
    disable(app, "alice")
    assert status(app, alice) == 401
    app.run(app.rt.store.delete_user, "bob")
    app.run(app.rt.client_sockets.revoke, Revocation(principal_id="bob"))
    assert status(app, bob) == 401


def test_a_token_acts_with_the_users_role_now_not_the_role_it_was_issued_with(app: App) -> None:
    app.user("root", role="admin", password=PASSWORD)
    token = tokens_of(app, "root")["access_token"]
    assert status(app, token, "GET", "/api/v1/cluster") == 200
    app.run(app.rt.store.update_user, "root", {"role": "user"})
    app.run(app.rt.client_sockets.revoke, Revocation(principal_id="root"))
    assert jwts.parts(token)[1]["role"] == "admin"
    assert status(app, token, "POST", "/api/v1/agents") == 403


def test_the_jwks_is_public_and_verifies_the_tokens(app: App) -> None:
    resp = app.request("GET", "/.well-known/jwks.json")
    assert resp.status_code == 200
    (jwk,) = resp.json()["keys"]
    assert "d" not in jwk
    header, _ = jwts.parts(tokens_of(app)["access_token"])
    assert header["kid"] == jwk["kid"] and header["alg"] == jwk["alg"] == "EdDSA" and header["typ"] == "at+jwt"
    from joserfc.jwk import import_key

    assert jwts.jwt.decode(tokens_of(app)["access_token"], import_key(jwk), algorithms=["EdDSA"]).claims["sub"] == "alice"


def test_hs256_tokens_work_and_the_jwks_is_empty(tmp_path: Path) -> None:
    env = {"YM_JWT_ALGORITHM": "HS256", "YM_JWT_SECRET": "k" * 48}
    with in_process_app(tmp_path / "data", env) as app:
        app.user("alice", password=PASSWORD)
        assert app.request("GET", "/.well-known/jwks.json").json() == {"keys": []}
        token = tokens_of(app)["access_token"]
        assert jwts.parts(token)[0]["alg"] == "HS256"
        assert status(app, token) == 200
        assert "k" * 48 not in app.request("GET", "/.well-known/jwks.json").text


# ---- refresh ---------------------------------------------------------------------------------------------


def test_refresh_rotates_and_a_spent_token_presented_again_revokes_its_family(app: App) -> None:
    first = tokens_of(app)
    other_session = tokens_of(app)
    second = refresh(app, first["refresh_token"]).json()
    assert set(second) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert second["refresh_token"] != first["refresh_token"] and status(app, second["access_token"]) == 200
    third = refresh(app, second["refresh_token"]).json()
    replay = refresh(app, first["refresh_token"])  # the stolen, spent first token
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "invalid-refresh-token"
    assert refresh(app, third["refresh_token"]).status_code == 401  # the whole family is gone
    assert refresh(app, other_session["refresh_token"]).status_code == 200  # another session is not
    (entry,) = audit(app, "session.reuse-detected")
    assert entry["actor"] == "alice" and entry["details"]["family_id"].startswith("rtf_")
    trail = msgspec.json.encode(audit(app)).decode()
    for secret in (first["refresh_token"], second["refresh_token"], first["access_token"]):
        assert secret not in trail


def test_refresh_refuses_garbage_other_credentials_expired_tokens_and_disabled_users(app: App) -> None:
    session = tokens_of(app)
    expired = tokens.new_token("refresh")
    app.run(app.rt.store.put_refresh_token, RefreshTokenRecord(
        id="rt_old", family_id="rtf_old", user_id="alice", token_hash=tokens.token_hash(expired),
        created_at=time.time() - 100, expires_at=time.time() - 1,
    ))
    for bad in ("", "ymr_nope", session["access_token"], app.admin_key, tokens.new_token("refresh"), expired):
        assert refresh(app, bad).status_code == 401, bad[:8]
    assert app.request("POST", "/api/v1/auth/refresh").status_code == 401  # no token at all
    disable(app, "alice")
    assert refresh(app, session["refresh_token"]).status_code == 401


# ---- logout ----------------------------------------------------------------------------------------------


def test_logout_denylists_the_access_token_and_revokes_the_refresh_family(app: App) -> None:
    session = tokens_of(app)
    assert status(app, session["access_token"]) == 200
    resp = app.request("POST", "/api/v1/auth/logout", session["access_token"], {"refresh_token": session["refresh_token"]})
    assert resp.status_code == 204
    assert status(app, session["access_token"]) == 401
    assert refresh(app, session["refresh_token"]).status_code == 401
    jti = jwts.parts(session["access_token"])[1]["jti"]
    assert app.run(app.rt.broker.get_counter, denied_token_counter(jti)) == 1
    (entry,) = audit(app, "logout")
    assert entry["actor"] == "alice"


def test_logout_closes_the_client_sockets_of_that_access_token_only(app: App) -> None:
    ended, kept = tokens_of(app), tokens_of(app)
    url = "ws://127.0.0.1:8080/ws/client"
    with app.client.websocket_connect(url, headers={"Authorization": f"Bearer {ended['access_token']}"}) as gone, \
            app.client.websocket_connect(url, headers={"Authorization": f"Bearer {kept['access_token']}"}) as stays:
        assert app.request("POST", "/api/v1/auth/logout", ended["access_token"]).status_code == 204
        with pytest.raises(WebSocketDisconnect) as closed:
            gone.receive_json()
        assert closed.value.code == 4001
        stays.send_json({"type": "ping", "id": "p"})
        assert stays.receive_json() == {"type": "pong", "id": "p"}


def test_logout_with_a_refresh_token_alone_ends_that_session_only(app: App) -> None:
    ended, kept = tokens_of(app), tokens_of(app)
    resp = app.request("POST", "/api/v1/auth/logout", body={"refresh_token": ended["refresh_token"]})
    assert resp.status_code == 204
    assert refresh(app, ended["refresh_token"]).status_code == 401
    assert refresh(app, kept["refresh_token"]).status_code == 200


def test_logout_needs_some_credential(app: App) -> None:
    assert app.request("POST", "/api/v1/auth/logout").status_code == 401
    assert app.request("POST", "/api/v1/auth/logout", "ymk_garbage").status_code == 401
    assert app.request("POST", "/api/v1/auth/logout", body={}).status_code == 401
    # Only a malformed refresh token: nothing to end, and nothing said about it either.
    assert app.request("POST", "/api/v1/auth/logout", body={"refresh_token": "ymr_x"}).status_code == 204
    assert audit(app, "logout") == []


# ---- cookies ---------------------------------------------------------------------------------------------


def cookies_set(resp: httpx.Response) -> dict[str, Any]:
    jar: dict[str, Any] = {}
    for header in resp.headers.get_list("set-cookie"):
        cookie: SimpleCookie = SimpleCookie()
        cookie.load(header)
        for name, morsel in cookie.items():
            jar[name] = morsel
    return jar


def cookie_login(app: App) -> str:
    resp = login(app, cookie=True, headers=SAME_ORIGIN)
    assert resp.status_code == 200, resp.text
    return str(resp.json()["csrf_token"])


def test_a_cookie_login_sets_httponly_lax_cookies_and_keeps_the_tokens_out_of_the_body(app: App) -> None:
    resp = login(app, cookie=True)
    body = resp.json()
    assert set(body) == {"expires_in", "csrf_token"}
    set_ = cookies_set(resp)
    access, refresh_, csrf = set_["ym_access"], set_["ym_refresh"], set_["ym_csrf"]
    assert access["httponly"] and refresh_["httponly"] and not csrf["httponly"]
    assert {m["samesite"].lower() for m in (access, refresh_, csrf)} == {"lax"}
    assert (access["path"], refresh_["path"], csrf["path"]) == ("/", "/api/v1/auth", "/")
    assert not any(m["secure"] for m in (access, refresh_, csrf))  # no TLS here
    assert csrf.value == body["csrf_token"]
    assert app.rt.sessions.access.verify(access.value) is not None
    assert tokens.well_formed(refresh_.value, "refresh")


def test_session_cookies_are_secure_under_tls() -> None:
    session = TokenResponse(access_token="a", expires_in=900, refresh_token="r", refresh_expires_in=3600)
    for fill in (lambda r: set_session_cookies(r, session, secure=True), lambda r: clear_session_cookies(r, secure=True)):
        response = Response()
        fill(response)
        headers = [v.decode() for k, v in response.raw_headers if k == b"set-cookie"]
        assert len(headers) == 3 and all("Secure" in h for h in headers), headers


def test_a_cookie_get_needs_no_csrf_token_and_a_cookie_post_needs_origin_and_token(app: App) -> None:
    csrf = cookie_login(app)
    assert app.request("GET", "/api/v1/jobs").status_code == 200
    tickets = "/api/v1/ws-tickets"
    refused = [
        app.request("POST", tickets),  # no token
        app.request("POST", tickets, headers={"X-CSRF-Token": "not-the-cookie"}),
        app.request("POST", tickets, headers={"X-CSRF-Token": csrf, **EVIL}),
        app.request("POST", tickets, headers={"X-CSRF-Token": csrf, "Origin": "null"}),
    ]
    assert [r.status_code for r in refused] == [403] * 4
    assert {r.json()["error"]["code"] for r in refused} == {"csrf"}
    assert app.request("POST", tickets, headers={"X-CSRF-Token": csrf, **SAME_ORIGIN}).status_code == 201
    assert app.request("POST", tickets, headers={"X-CSRF-Token": csrf}).status_code == 201  # not a browser


def test_bearer_requests_need_no_csrf_token_even_with_cookies_and_a_foreign_origin(app: App) -> None:
    cookie_login(app)
    bearer = tokens_of(app)["access_token"]
    assert app.request("POST", "/api/v1/ws-tickets", bearer, headers=EVIL).status_code == 201


def test_a_cookie_login_from_a_foreign_origin_is_refused(app: App) -> None:
    resp = login(app, cookie=True, headers=EVIL)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "csrf"
    assert "set-cookie" not in resp.headers


def test_a_cookie_refresh_rotates_the_cookies_after_the_csrf_check(app: App) -> None:
    csrf = cookie_login(app)
    old_access, old_refresh = app.client.cookies["ym_access"], app.client.cookies["ym_refresh"]
    assert app.request("POST", "/api/v1/auth/refresh").status_code == 403
    resp = app.request("POST", "/api/v1/auth/refresh", headers={"X-CSRF-Token": csrf, **SAME_ORIGIN})
    assert resp.status_code == 200 and set(resp.json()) == {"expires_in", "csrf_token"}
    assert resp.json()["csrf_token"] == csrf  # the page's copy stays good
    set_ = cookies_set(resp)
    assert set_["ym_access"].value != old_access and set_["ym_refresh"].value != old_refresh
    app.client.cookies.set("ym_refresh", old_refresh, path="/api/v1/auth")  # replay the spent one
    replay = app.request("POST", "/api/v1/auth/refresh", headers={"X-CSRF-Token": csrf})
    assert replay.status_code == 401
    assert {m.value for m in cookies_set(replay).values()} == {""}  # the browser forgets the session


def test_a_cookie_logout_clears_the_cookies_and_the_access_cookie_stops_working(app: App) -> None:
    csrf = cookie_login(app)
    access = app.client.cookies["ym_access"]
    assert app.request("POST", "/api/v1/auth/logout").status_code == 403  # CSRF applies to logout too
    resp = app.request("POST", "/api/v1/auth/logout", headers={"X-CSRF-Token": csrf, **SAME_ORIGIN})
    assert resp.status_code == 204
    assert set(cookies_set(resp)) == {"ym_access", "ym_refresh", "ym_csrf"}
    app.client.cookies.set("ym_access", access)
    assert app.request("GET", "/api/v1/jobs").status_code == 401  # denylisted


def test_the_client_channel_takes_the_access_cookie(app: App) -> None:
    url = "ws://127.0.0.1:8080/ws/client"
    with pytest.raises(WebSocketDenialResponse) as denied:
        with app.client.websocket_connect(url):
            pass
    assert denied.value.status_code == 401
    cookie_login(app)
    with app.client.websocket_connect(url, headers=SAME_ORIGIN) as ws:
        ws.send_json({"type": "ping", "id": "p"})
        assert ws.receive_json() == {"type": "pong", "id": "p"}


# ---- throttling ------------------------------------------------------------------------------------------

TOO_MANY = {"error": {"code": "too-many-attempts", "message": "too many failed sign-ins; wait before trying again"}}


@pytest.mark.parametrize("username", ["alice", "nobody"])
def test_five_failures_then_429_with_retry_after_whether_or_not_the_user_exists(app: App, username: str) -> None:
    now = time.time()
    app.rt.sessions.throttle._clock = lambda: now  # noqa: SLF001 (a slow run must not outlast the wait)
    for _ in range(5):
        assert login(app, username, "wrong password!").status_code == 401
    throttled = login(app, username, PASSWORD)  # even the right password waits
    assert throttled.status_code == 429
    assert throttled.json() == TOO_MANY
    assert throttled.headers["retry-after"] == "1"
    assert len(audit(app, "login.failed")) == 5  # the throttled attempt was not even tried
    app.rt.sessions.throttle._clock = lambda: now + 1  # noqa: SLF001 (the wait is over)
    assert login(app, username, PASSWORD).status_code == (200 if username == "alice" else 401)


def test_failures_from_one_address_throttle_a_login_it_never_tried(app: App) -> None:
    now = time.time()
    app.rt.sessions.throttle._clock = lambda: now  # noqa: SLF001
    for name in ("n1", "n2", "n3", "n4", "n5"):
        assert login(app, name, "wrong password!").status_code == 401
    resp = login(app, "alice", PASSWORD)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
