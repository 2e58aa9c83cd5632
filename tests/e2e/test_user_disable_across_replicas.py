"""Disabling or deleting a user across replicas: three real server replicas over one real
redis-server and one shared SQLite file. A user disabled (or deleted) through one replica has
their client sockets closed with 4001 on every replica within 5 s, and their API keys, tickets,
access tokens and refresh tokens refused on every replica, despite a key cache that would
otherwise trust a key for minutes."""

from __future__ import annotations

import pytest

from tests.support.cluster import HttpError, ServerProcess, http, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.keys import client_socket, close_code, put_key, ws_ticket
from tests.support.redis_server import RedisServer
from tests.support.ws import handshake_status

pytestmark = pytest.mark.redis

REVOKED = 4001
WITHIN_S = 5.0


def http_status(server: ServerProcess, key: str) -> int:
    try:
        server.api("GET", "/api/v1/users/me", key=key)
    except HttpError as exc:
        return exc.status
    return 200


@pytest.mark.parametrize("how", ["disable", "delete"])
def test_a_user_shut_out_on_one_replica_is_shut_out_on_every_replica(cluster: Cluster, redis: RedisServer, how: str) -> None:
    # A cache lifetime far beyond the test: only the revocation can make a replica refuse in time.
    replicas = cluster.replicas(redis.url, 3, env={"YM_API_KEY_CACHE_S": "300"})
    a = replicas[0]
    token, _ = put_key(a, "nora", "user")
    bystander_token, _ = put_key(a, "otto", "user")
    assert [http_status(srv, token) for srv in replicas] == [200, 200, 200]  # every replica caches the key
    sockets = [client_socket(srv, token) for srv in replicas]
    by_ticket = client_socket(replicas[2], ticket=ws_ticket(replicas[1], token))  # issued on B, redeemed on C
    unused = ws_ticket(replicas[1], token)
    bystander = client_socket(replicas[1], bystander_token)

    if how == "disable":
        a.api("PATCH", "/api/v1/users/nora", {"disabled": True})
    else:
        a.api("DELETE", "/api/v1/users/nora")

    for ws in [*sockets, by_ticket]:
        assert close_code(ws, WITHIN_S) == REVOKED
    assert http_status(a, token) == 401  # the replica that did it: as soon as it answered
    for srv in replicas[1:]:
        wait_until(lambda srv=srv: http_status(srv, token) == 401, WITHIN_S, what=f"replica {srv.port} to refuse the key")
    assert handshake_status(f"{replicas[2].ws_url}/ws/client?ticket={unused}") == 401
    assert handshake_status(f"{replicas[1].ws_url}/ws/client", {"Authorization": f"Bearer {token}"}) == 401
    assert close_code(bystander, 1.0) is None  # another user's socket stays open
    assert [http_status(srv, bystander_token) for srv in replicas] == [200, 200, 200]
    bystander.close()


def test_a_disabled_users_signed_in_sessions_end_on_every_replica(cluster: Cluster, redis: RedisServer) -> None:
    a, b, c = cluster.replicas(redis.url, 3)
    password = "correct horse battery staple"
    user = a.api("POST", "/api/v1/users", {"username": "sina", "password": password})
    session = http("POST", f"{b.url}/api/v1/auth/login", body={"username": "sina", "password": password})
    access = session["access_token"]
    assert [http_status(srv, access) for srv in (a, b, c)] == [200, 200, 200]  # one token, every replica
    sockets = [client_socket(srv, access) for srv in (a, b)]

    c.api("PATCH", f"/api/v1/users/{user['id']}", {"disabled": True})

    for ws in sockets:
        assert close_code(ws, WITHIN_S) == REVOKED
    for srv in (a, b, c):
        wait_until(lambda srv=srv: http_status(srv, access) == 401, WITHIN_S, what=f"replica {srv.port} to refuse the token")
    with pytest.raises(HttpError) as refused:
        http("POST", f"{a.url}/api/v1/auth/refresh", body={"refresh_token": session["refresh_token"]})
    assert refused.value.status == 401
