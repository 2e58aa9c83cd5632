"""Rate limits on HTTP routes and WebSocket handshakes, against one in-process replica (real
SqliteStore and MemoryBroker, the whole Starlette stack): each class is turned on with a small
window, provoked, and answered 429 with Retry-After, the RateLimit header fields and the error
body; probes are never limited; and the client address is the socket peer unless the peer is a
trusted proxy (YM_TRUSTED_PROXIES), whose X-Forwarded-For is then believed."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse

from tests.support.cluster import wait_until
from tests.support.inproc import BASE_URL, JOB, App, settings_for
from yardmaster.protocol.codec import SUBPROTOCOL_JSON
from yardmaster.server.app import build_app

PASSWORD = "correct horse battery staple"
CLIENT_WS = "ws://127.0.0.1:8080/ws/client"
AGENT_WS = "ws://127.0.0.1:8080/ws/agent"
PROXY = ("10.0.0.1", 40000)  # a peer listed in YM_TRUSTED_PROXIES by `behind_proxy`


@contextmanager
def limited_app(tmp_path: Path, env: dict[str, str], peer: tuple[str, int] = ("testclient", 50000)) -> Iterator[App]:
    """One replica with the rate classes of `env` on (every other class is off), reached from `peer`."""
    settings, admin_key = settings_for(tmp_path / "data", env)
    with TestClient(build_app(settings), base_url=BASE_URL, client=peer) as client:
        yield App(client, settings, admin_key)


def behind_proxy(tmp_path: Path, env: dict[str, str]) -> Any:
    return limited_app(tmp_path, {"YM_TRUSTED_PROXIES": PROXY[0], **env}, peer=PROXY)


def from_address(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


def assert_limited(resp: httpx.Response, rate_class: str, count: int) -> None:
    """A 429 of `rate_class` whose policy allows `count`: status, headers and body."""
    assert resp.status_code == 429, (resp.status_code, resp.text)
    retry = int(resp.headers["Retry-After"])
    assert retry >= 1
    assert re.fullmatch(rf'"{rate_class}";q={count};w=\d+', resp.headers["RateLimit-Policy"])
    assert re.fullmatch(rf'"{rate_class}";r=0;t=\d+', resp.headers["RateLimit"])
    error = resp.json()["error"]
    assert error["code"] == "rate-limited" and error["rate_class"] == rate_class
    assert error["retry_after_s"] == retry and f"retry in {retry} s" in error["message"]


def remaining(resp: httpx.Response) -> int:
    match = re.search(r";r=(\d+);", resp.headers["RateLimit"])
    assert match is not None, resp.headers["RateLimit"]
    return int(match.group(1))


def refused_total(app: App, rate_class: str) -> float:
    text = app.client.get("/metrics").text
    match = re.search(rf'^yardmaster_rate_limited_total{{class="{rate_class}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def login(app: App, username: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return app.request("POST", "/api/v1/auth/login", body={"username": username, "password": PASSWORD}, headers=headers)


# ---- unauthenticated: failed credentials and public routes, by address ----------------------------------


def test_bad_keys_get_401_until_the_address_is_over_its_limit_then_429(tmp_path: Path) -> None:
    with limited_app(tmp_path, {"YM_RATE_UNAUTHENTICATED": "5/10m", "YM_RATE_API": "1000/1m"}) as app:
        app.user("alice")
        alice, _ = app.key("alice")
        bad = "ymk_" + "x" * 43
        for i in range(5):
            resp = app.request("GET", "/api/v1/jobs", bad)
            assert resp.status_code == 401 and remaining(resp) == 4 - i
        limited = app.request("GET", "/api/v1/jobs", bad)
        assert_limited(limited, "unauthenticated", 5)
        assert app.request("GET", "/api/v1/jobs").status_code == 429  # no credential at all: the same bucket
        # A valid credential is the user's own business, not the address's.
        assert app.request("GET", "/api/v1/jobs", alice).status_code == 200
        assert refused_total(app, "unauthenticated") == 2


def test_public_routes_are_charged_by_address_and_probes_never(tmp_path: Path) -> None:
    with limited_app(tmp_path, {"YM_RATE_UNAUTHENTICATED": "3/10m"}) as app:
        for _ in range(3):
            resp = app.client.get("/.well-known/jwks.json")
            assert resp.status_code == 200 and "RateLimit" in resp.headers
        assert_limited(app.client.get("/.well-known/jwks.json"), "unauthenticated", 3)
        assert_limited(app.request("POST", "/api/v1/auth/refresh", body={"refresh_token": "nope"}), "unauthenticated", 3)
        for _ in range(20):
            for probe in ("/healthz", "/readyz", "/metrics"):
                resp = app.client.get(probe)
                assert resp.status_code == 200 and "RateLimit" not in resp.headers, probe


# ---- authenticated classes, by user ---------------------------------------------------------------------


def test_api_calls_are_limited_per_user_with_ratelimit_headers_and_allowed_again_after_the_window(tmp_path: Path) -> None:
    with limited_app(tmp_path, {"YM_RATE_API": "3/1s"}) as app:
        app.user("alice")
        app.user("bob")
        alice, _ = app.key("alice")
        bob, _ = app.key("bob")
        for left in (2, 1, 0):
            resp = app.request("GET", "/api/v1/jobs", alice)
            assert resp.status_code == 200
            assert resp.headers["RateLimit-Policy"] == '"api";q=3;w=1' and remaining(resp) == left
        assert_limited(app.request("GET", "/api/v1/users/me", alice), "api", 3)  # every route of the class
        assert app.request("GET", "/api/v1/jobs", bob).status_code == 200  # another user's bucket
        assert refused_total(app, "api") == 1
        wait_until(lambda: app.request("GET", "/api/v1/jobs", alice).status_code == 200, 5, 0.1, "the window to pass")


def test_admins_are_limited_by_their_own_class(tmp_path: Path) -> None:
    with limited_app(tmp_path, {"YM_RATE_API": "100/1m", "YM_RATE_ADMIN": "2/10m"}) as app:
        app.user("alice")
        alice, _ = app.key("alice")
        for _ in range(2):
            resp = app.request("GET", "/api/v1/jobs", app.admin_key)
            assert resp.status_code == 200 and resp.headers["RateLimit-Policy"].startswith('"admin";q=2')
        assert_limited(app.request("GET", "/api/v1/users", app.admin_key), "admin", 2)
        resp = app.request("GET", "/api/v1/jobs", alice)
        assert resp.status_code == 200 and resp.headers["RateLimit-Policy"].startswith('"api";q=100')


def test_submission_has_its_own_class_and_a_batch_is_one_request(tmp_path: Path) -> None:
    with limited_app(tmp_path, {"YM_RATE_SUBMIT": "2/10m", "YM_RATE_API": "100/1m"}) as app:
        app.user("alice")
        alice, _ = app.key("alice")
        assert app.request("POST", "/api/v1/jobs", alice, JOB).status_code == 201
        resp = app.request("POST", "/api/v1/jobs", alice, [JOB, JOB, JOB])
        assert resp.status_code == 201 and len(resp.json()["jobs"]) == 3 and remaining(resp) == 0
        assert_limited(app.request("POST", "/api/v1/jobs", alice, JOB), "submit", 2)
        assert len(app.api("GET", "/api/v1/jobs", alice)["jobs"]) == 4  # reading is "api", and nothing more was stored


def test_a_password_change_is_a_sign_in_of_the_user_from_any_address(tmp_path: Path) -> None:
    with behind_proxy(tmp_path, {"YM_RATE_SIGN_IN": "2/10m", "YM_RATE_API": "100/1m"}) as app:
        app.user("alice", password=PASSWORD)
        alice, _ = app.key("alice")
        body = {"current_password": "wrong password guess", "new_password": "another long passphrase"}
        for n in range(2):
            resp = app.request("POST", "/api/v1/users/me/password", alice, body, headers=from_address(f"198.51.100.{n}"))
            assert resp.status_code in (401, 403, 422), resp.text
        refused = app.request("POST", "/api/v1/users/me/password", alice, body, headers=from_address("198.51.100.9"))
        assert_limited(refused, "sign-in", 2)
        assert app.request("GET", "/api/v1/users/me", alice).status_code == 200  # other calls are "api"


# ---- sign-in and sign-up: by address and by account -----------------------------------------------------


def test_sign_in_is_limited_by_address_across_accounts(tmp_path: Path) -> None:
    with limited_app(tmp_path, {"YM_RATE_SIGN_IN": "3/10m"}) as app:
        app.user("alice", password=PASSWORD)
        assert login(app, "alice").status_code == 200
        assert login(app, "bob").status_code == 401
        assert login(app, "carol").status_code == 401
        assert_limited(login(app, "dave"), "sign-in", 3)
        assert_limited(login(app, "alice"), "sign-in", 3)


def test_sign_in_is_limited_by_account_across_addresses(tmp_path: Path) -> None:
    with behind_proxy(tmp_path, {"YM_RATE_SIGN_IN": "3/10m"}) as app:
        app.user("alice", password=PASSWORD)
        for n in range(3):
            assert login(app, "alice", from_address(f"198.51.100.{n}")).status_code == 200
        assert_limited(login(app, "ALICE", from_address("198.51.100.7")), "sign-in", 3)  # casefolded
        assert login(app, "bob", from_address("198.51.100.8")).status_code == 401  # another account


def test_the_login_back_off_still_applies_under_the_rate(tmp_path: Path) -> None:
    with behind_proxy(tmp_path, {"YM_RATE_SIGN_IN": "100/10m"}) as app:
        app.user("alice", password=PASSWORD)
        wrong = {"username": "alice", "password": "not the password at all"}
        statuses = [app.request("POST", "/api/v1/auth/login", body=wrong, headers=from_address(f"198.51.100.{n}")).status_code
                    for n in range(7)]
        assert statuses[:5] == [401] * 5 and 429 in statuses[5:]
        throttled = app.request("POST", "/api/v1/auth/login", body=wrong, headers=from_address("198.51.100.99"))
        assert throttled.status_code == 429 and throttled.json()["error"]["code"] == "too-many-attempts"


def test_sign_up_is_limited_by_address_and_by_account(tmp_path: Path) -> None:
    env = {"YM_RATE_SIGN_IN": "2/10m", "YM_ALLOW_SIGNUP": "true"}
    with behind_proxy(tmp_path, env) as app:
        def register(username: str, address: str) -> httpx.Response:
            body = {"username": username, "password": PASSWORD}
            return app.request("POST", "/api/v1/auth/register", body=body, headers=from_address(address))

        assert register("erin", "198.51.100.1").status_code == 201
        assert register("frank", "198.51.100.1").status_code == 201
        assert_limited(register("gina", "198.51.100.1"), "sign-in", 2)  # the address
        assert register("gina", "198.51.100.2").status_code == 201
        assert register("gina", "198.51.100.3").status_code == 409  # taken, and charged to the account
        assert_limited(register("Gina", "198.51.100.4"), "sign-in", 2)  # the account


# ---- the client address: X-Forwarded-For only from a trusted proxy ---------------------------------------


def test_a_spoofed_forwarded_for_from_an_untrusted_peer_changes_nothing(tmp_path: Path) -> None:
    with limited_app(tmp_path, {"YM_RATE_UNAUTHENTICATED": "2/10m"}) as app:
        assert app.client.get("/.well-known/jwks.json", headers=from_address("203.0.113.1")).status_code == 200
        assert app.client.get("/.well-known/jwks.json", headers=from_address("203.0.113.2")).status_code == 200
        assert_limited(app.client.get("/.well-known/jwks.json", headers=from_address("203.0.113.3")), "unauthenticated", 2)


def test_behind_a_trusted_proxy_the_first_untrusted_forwarded_hop_is_the_bucket(tmp_path: Path) -> None:
    with behind_proxy(tmp_path, {"YM_RATE_UNAUTHENTICATED": "2/10m"}) as app:
        def jwks(forwarded: str | None) -> int:
            return app.client.get("/.well-known/jwks.json", headers=from_address(forwarded) if forwarded else {}).status_code

        # What a client put before the proxy's own entry is not believed: the right-most
        # untrusted hop (203.0.113.5) is the address, whatever the client made up.
        assert jwks("198.51.100.1, 203.0.113.5") == 200
        assert jwks("198.51.100.2, 203.0.113.5") == 200
        assert jwks("198.51.100.3, 203.0.113.5, 10.0.0.1") == 429
        assert jwks("203.0.113.6") == 200  # another client of the proxy: its own bucket
        assert jwks(None) == 200  # the proxy itself, with no header: the peer's bucket


def test_forwarded_proto_from_a_trusted_proxy_still_turns_on_hsts(tmp_path: Path) -> None:
    with behind_proxy(tmp_path, {}) as app:
        resp = app.client.get("/healthz", headers={"X-Forwarded-Proto": "https"})
        assert resp.headers["Strict-Transport-Security"] == "max-age=31536000"
        assert "Strict-Transport-Security" not in app.client.get("/healthz").headers
    with limited_app(tmp_path / "direct", {}) as app:
        assert "Strict-Transport-Security" not in app.client.get("/healthz", headers={"X-Forwarded-Proto": "https"}).headers


# ---- WebSocket handshakes --------------------------------------------------------------------------------


def denied(app: App, path: str, headers: dict[str, str], subprotocols: list[str] | None = None) -> WebSocketDenialResponse:
    with pytest.raises(WebSocketDenialResponse) as refused:
        with app.client.websocket_connect(path, headers=headers, subprotocols=subprotocols):
            pass
    return refused.value


def test_client_handshakes_are_limited_per_user_and_refused_with_429_before_the_upgrade(tmp_path: Path) -> None:
    with limited_app(tmp_path, {"YM_RATE_HANDSHAKE": "2/10m"}) as app:
        app.user("alice")
        alice, _ = app.key("alice")
        auth = {"Authorization": f"Bearer {alice}"}
        for _ in range(2):
            with app.client.websocket_connect(CLIENT_WS, headers=auth) as ws:
                ws.send_json({"type": "ping", "id": "p"})
                assert ws.receive_json()["type"] == "pong"
        assert_limited(denied(app, CLIENT_WS, auth), "handshake", 2)
        assert refused_total(app, "handshake") == 1


def test_agent_handshakes_are_limited_and_refused_with_429(tmp_path: Path) -> None:
    with behind_proxy(tmp_path, {"YM_RATE_HANDSHAKE": "2/10m"}) as app:
        token = app.api("POST", "/api/v1/agents", body={"name": "a1"}, status=201)["token"]
        auth = {"Authorization": f"Bearer {token}"}
        for n in range(2):
            with app.client.websocket_connect(AGENT_WS, headers={**auth, **from_address(f"198.51.100.{n}")},
                                              subprotocols=[SUBPROTOCOL_JSON]):
                pass
        # The agent's bucket is over, from any address.
        assert_limited(denied(app, AGENT_WS, {**auth, **from_address("198.51.100.9")}, [SUBPROTOCOL_JSON]), "handshake", 2)


def test_failed_handshakes_are_charged_to_the_address_as_unauthenticated(tmp_path: Path) -> None:
    with limited_app(tmp_path, {"YM_RATE_UNAUTHENTICATED": "2/10m"}) as app:
        assert denied(app, AGENT_WS, {"Authorization": "Bearer yma_nope"}).status_code == 401
        assert denied(app, CLIENT_WS, {"Authorization": "Bearer ymk_nope"}).status_code == 401
        assert_limited(denied(app, CLIENT_WS, {}), "unauthenticated", 2)
        assert_limited(denied(app, AGENT_WS, {"Authorization": "Bearer yma_nope"}), "unauthenticated", 2)
