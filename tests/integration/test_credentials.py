"""Credentials against a real server process: nothing secret in the log, tickets used up by any
handshake, key listing and revocation (closing the key's sockets with 4001), YM_ADMIN_KEY
rotation, and the quota of client sockets per user."""

from __future__ import annotations

import json

import pytest
from websockets.exceptions import InvalidStatus

from tests.support.cluster import HttpError, ServerProcess, http, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.keys import client_socket, close_code, put_key, ws_ticket
from tests.support.ws import RawAgent, handshake_status
from yardmaster.server.security import tokens

REVOKED = 4001
EVIL = {"Origin": "https://evil.example"}


# ---- helpers -------------------------------------------------------------------------------------


def restart(cluster: Cluster, old: ServerProcess, env: dict[str, str], wait: bool = True) -> ServerProcess:
    """The same data dir, served by a new process (with `env`)."""
    old.stop()
    new = ServerProcess(old.data_dir, env=env)
    cluster.servers.append(new)
    return new.start(wait=wait)


def status_of(method: str, url: str, key: str | None) -> int:
    try:
        http(method, url, key)
        return 200
    except HttpError as exc:
        return exc.status


# ---- item 3: nothing secret reaches the log ---------------------------------------------------------


def test_no_key_token_or_ticket_reaches_the_server_log(cluster: Cluster) -> None:
    debug = {"YM_LOG_LEVEL": "debug"}  # the most a server ever logs
    first = cluster.server("logs", env=debug)
    file_key = first.admin_key
    secrets = [file_key]
    agent = first.create_agent("a1")
    secrets.append(agent["token"])
    raw = RawAgent(first.ws_url, agent["token"])
    raw.close()
    ws_url = f"{first.ws_url}/ws/client"
    used = ws_ticket(first)
    assert handshake_status(f"{ws_url}?ticket={used}&from=0") == 101
    assert handshake_status(f"{ws_url}?ticket={used}") == 401
    cross = ws_ticket(first)
    assert handshake_status(f"{ws_url}?ticket={cross}", EVIL) == 403
    secrets += [used, cross]
    assert handshake_status(ws_url, {"Authorization": f"Bearer {file_key}"}) == 101
    first.api("GET", "/api/v1/jobs?state=queued&limit=5")

    env_key = tokens.new_token("api-key")
    secrets.append(env_key)
    second = restart(cluster, first, {**debug, "YM_ADMIN_KEY": env_key})
    later = ws_ticket(second, env_key)
    secrets.append(later)
    ws = client_socket(second, ticket=later)
    ws.send(json.dumps({"type": "subscribe", "topic": "jobs"}))
    assert json.loads(ws.recv(10))["type"] == "subscribed"
    ws.close()
    assert handshake_status(f"{second.ws_url}/ws/client", {"Authorization": f"Bearer {env_key}"}) == 101
    assert status_of("GET", f"{second.url}/api/v1/jobs", file_key) == 401  # retired by YM_ADMIN_KEY
    second.stop()

    lines = (first.log_path.read_text() + second.log_path.read_text()).splitlines()
    log_lines = [line for line in lines if line.startswith("{")]
    assert len(log_lines) > 20
    for secret in secrets:
        leaked = [line for line in log_lines if secret in line]
        assert not leaked, leaked
    # The first-start key is printed once, on purpose (the banner on stdout), and nowhere else.
    assert [line.strip() for line in lines if file_key in line] == [file_key]
    # uvicorn's handshake line was there, without its query string.
    messages = [str(json.loads(line)["msg"]) for line in log_lines]
    assert any('"WebSocket /ws/client?[redacted]"' in msg for msg in messages), messages


# ---- item 3: tickets -------------------------------------------------------------------------------


def test_a_ticket_is_used_up_by_a_handshake_refused_for_its_origin(server: ServerProcess) -> None:
    url = f"{server.ws_url}/ws/client"
    refused = ws_ticket(server)
    assert handshake_status(f"{url}?ticket={refused}", EVIL) == 403
    assert handshake_status(f"{url}?ticket={refused}") == 401


def test_a_ticket_whose_key_was_revoked_since_is_refused(server: ServerProcess) -> None:
    token, key_id = put_key(server, "carol", "user")
    url = f"{server.ws_url}/ws/client"
    kept, orphaned = ws_ticket(server, token), ws_ticket(server, token)
    server.api("DELETE", f"/api/v1/keys/{key_id}")
    assert handshake_status(f"{url}?ticket={orphaned}") == 401
    assert handshake_status(f"{url}?ticket={kept}") == 401
    fresh = ws_ticket(server)  # the admin's, unaffected
    assert handshake_status(f"{url}?ticket={fresh}") == 101


# ---- item 4: keys, revocation, rotation ------------------------------------------------------------


def test_keys_are_listed_without_secrets_everyones_to_admins_only(server: ServerProcess) -> None:
    user_token, user_key_id = put_key(server, "dave", "user")
    listed = server.api("GET", "/api/v1/keys?all=true")["keys"]
    by_id = {k["id"]: k for k in listed}
    assert set(by_id[user_key_id]) == {
        "id", "name", "prefix", "scopes", "owner", "created_at", "expires_at", "last_used_at", "revoked_at"
    }
    admin = next(k for k in listed if k["owner"] == "admin")
    assert admin["name"] == "admin (first start)" and admin["scopes"] is None and admin["revoked_at"] is None
    assert admin["prefix"] == tokens.hint(server.admin_key) and admin["last_used_at"] is not None
    text = json.dumps(listed)
    assert server.admin_key not in text and user_token not in text and tokens.token_hash(user_token) not in text
    for method, path, refused in (
        ("GET", "/api/v1/keys?all=true", 403),
        ("DELETE", f"/api/v1/keys/{admin['id']}", 404),  # another user's key: as if unknown
    ):
        assert status_of(method, server.url + path, None) == 401
        assert status_of(method, server.url + path, user_token) == refused
    own = server.api("GET", "/api/v1/keys", key=user_token)["keys"]
    assert [k["id"] for k in own] == [user_key_id]
    with pytest.raises(HttpError) as missing:
        server.api("DELETE", "/api/v1/keys/key_nope")
    assert missing.value.status == 404 and missing.value.body["error"]["code"] == "not-found"


def test_revoking_a_key_closes_its_sockets_with_4001_and_refuses_it(server: ServerProcess) -> None:
    token, key_id = put_key(server, "erin", "user")
    other_token, _ = put_key(server, "frank", "user")
    by_header = client_socket(server, token)
    by_ticket = client_socket(server, ticket=ws_ticket(server, token))
    bystander = client_socket(server, other_token)
    admin = client_socket(server, server.admin_key)
    revoked = server.api("DELETE", f"/api/v1/keys/{key_id}")
    assert revoked["id"] == key_id and revoked["revoked_at"] is not None
    assert close_code(by_header, 5) == REVOKED
    assert close_code(by_ticket, 5) == REVOKED
    for ws in (bystander, admin):
        ws.send(json.dumps({"type": "ping", "id": "still-open"}))
        assert json.loads(ws.recv(5)) == {"type": "pong", "id": "still-open"}
        ws.close()
    assert status_of("GET", f"{server.url}/api/v1/jobs", token) == 401
    assert handshake_status(f"{server.ws_url}/ws/client", {"Authorization": f"Bearer {token}"}) == 401
    again = server.api("DELETE", f"/api/v1/keys/{key_id}")  # idempotent: the first time stays
    assert again["revoked_at"] == revoked["revoked_at"]


def test_a_new_YM_ADMIN_KEY_retires_the_previous_admin_keys(cluster: Cluster) -> None:
    first = cluster.server("rotate")
    file_key = first.admin_key
    k1, k2 = tokens.new_token("api-key"), tokens.new_token("api-key")
    second = restart(cluster, first, {"YM_ADMIN_KEY": k1})
    assert status_of("GET", f"{second.url}/api/v1/jobs", k1) == 200
    assert status_of("GET", f"{second.url}/api/v1/jobs", file_key) == 401
    assert not (second.data_dir / "admin-key").exists()
    third = restart(cluster, second, {"YM_ADMIN_KEY": k2})
    assert status_of("GET", f"{third.url}/api/v1/jobs", k2) == 200
    assert status_of("GET", f"{third.url}/api/v1/jobs", k1) == 401
    keys = third.api("GET", "/api/v1/keys", key=k2)["keys"]
    assert sorted((k["name"], k["revoked_at"] is None) for k in keys) == [
        ("admin (YM_ADMIN_KEY)", False), ("admin (YM_ADMIN_KEY)", True), ("admin (first start)", False)
    ]
    # A replica started with the old key refuses to start (and so retires nothing).
    stale = restart(cluster, third, {"YM_ADMIN_KEY": k1}, wait=False)
    assert stale.proc is not None and stale.proc.wait(30) != 0
    output = stale.log_path.read_text()
    assert "YM_ADMIN_KEY: this key has been revoked" in output and k1 not in output


# ---- item 7 (part), now issue 9: the quota of client sockets per user ------------------------------------


def test_a_user_over_the_client_socket_quota_gets_429_until_one_closes(cluster: Cluster) -> None:
    server = cluster.server(env={"YM_QUOTA_CLIENT_SOCKETS": "3"})
    url, auth = f"{server.ws_url}/ws/client", {"Authorization": f"Bearer {server.admin_key}"}
    other_token, _ = put_key(server, "gina", "user")
    open_ = [client_socket(server, server.admin_key), client_socket(server, server.admin_key),
             client_socket(server, ticket=ws_ticket(server))]
    try:
        with pytest.raises(InvalidStatus) as refused:
            client_socket(server, server.admin_key)
        body = json.loads(refused.value.response.body or b"{}")["error"]
        assert refused.value.response.status_code == 429 and refused.value.response.headers["Retry-After"]
        assert body["code"] == "quota-exceeded" and body["quota"] == "client_sockets" and body["limit"] == 3
        spare = ws_ticket(server)
        assert handshake_status(f"{url}?ticket={spare}") == 429
        assert handshake_status(url, {"Authorization": f"Bearer {other_token}"}) == 101  # another principal
        open_.pop().close()
        wait_until(lambda: handshake_status(url, auth) == 101, 10, 0.1, "a socket under the cap to be accepted")
    finally:
        for ws in open_:
            ws.close()
