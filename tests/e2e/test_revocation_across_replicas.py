"""Revocation across replicas: three real server replicas over one real redis-server and one shared
SQLite file. A key revoked through one replica (or retired by a replica that starts with a new
YM_ADMIN_KEY) closes that key's client sockets on the others with 4001, and every replica's
API-key cache forgets it at once."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.sync.client import ClientConnection

from tests.support.cluster import HttpError, ServerProcess, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.keys import client_socket, close_code, put_key, ws_ticket
from tests.support.redis_server import RedisServer
from tests.support.ws import handshake_status
from yardmaster.server.backends.sqlite_store import SqliteStore
from yardmaster.server.security import tokens

pytestmark = pytest.mark.redis

REVOKED = 4001
WITHIN_S = 5.0


def still_open(ws: ClientConnection) -> bool:
    ws.send(json.dumps({"type": "ping", "id": "p"}))
    return bool(json.loads(ws.recv(5)) == {"type": "pong", "id": "p"})


def test_a_key_revoked_on_one_replica_has_its_sockets_closed_on_the_others(cluster: Cluster, redis: RedisServer) -> None:
    a, b, c = cluster.replicas(redis.url, 3)
    token, key_id = put_key(a, "hana", "user")
    on_b = client_socket(b, token)
    on_c = client_socket(c, ticket=ws_ticket(a, token))  # issued on A, redeemed on C
    unused = ws_ticket(b, token)
    bystander = client_socket(b, a.admin_key)
    a.api("DELETE", f"/api/v1/keys/{key_id}")
    assert close_code(on_b, WITHIN_S) == REVOKED
    assert close_code(on_c, WITHIN_S) == REVOKED
    assert still_open(bystander)
    bystander.close()
    assert handshake_status(f"{c.ws_url}/ws/client?ticket={unused}") == 401


def test_a_replica_started_with_a_new_YM_ADMIN_KEY_closes_the_old_keys_sockets_everywhere(
    cluster: Cluster, redis: RedisServer
) -> None:
    old, new = tokens.new_token("api-key"), tokens.new_token("api-key")
    replicas = cluster.replicas(redis.url, 2, env={"YM_ADMIN_KEY": old})
    sockets = [client_socket(srv, old) for srv in replicas]
    rotated = ServerProcess(
        replicas[0].data_dir, env={"YM_REDIS_URL": redis.url, "YM_REPLICA_ID": "rs-new", "YM_ADMIN_KEY": new}
    )
    cluster.servers.append(rotated)
    rotated.start()
    for ws in sockets:
        assert close_code(ws, WITHIN_S) == REVOKED
    auth = {"Authorization": f"Bearer {old}"}
    assert handshake_status(f"{replicas[1].ws_url}/ws/client", auth) == 401
    assert rotated.api("GET", "/api/v1/jobs", key=new)["jobs"] == []


def http_status(server: ServerProcess, key: str) -> int:
    try:
        server.api("GET", "/api/v1/jobs", key=key)
    except HttpError as exc:
        return exc.status
    return 200


def revoke_in_store(server: ServerProcess, key_id: str) -> None:
    """Revoke straight in the shared SQLite file: what a revocation no replica heard looks like."""

    async def revoke() -> None:
        store = SqliteStore(str(server.data_dir / "yardmaster.db"))
        await store.start()
        try:
            assert await store.revoke_api_key(key_id, time.time()) is not None
        finally:
            await store.close()

    asyncio.run(revoke())


def test_a_revoked_key_is_refused_over_http_at_once_on_every_replica_despite_the_key_cache(
    cluster: Cluster, redis: RedisServer
) -> None:
    # A cache lifetime far beyond the test: only the revocation itself can make a replica refuse.
    replicas = cluster.replicas(redis.url, 3, env={"YM_API_KEY_CACHE_S": "300"})
    token, key_id = put_key(replicas[0], "ines", "user")
    assert [http_status(srv, token) for srv in replicas] == [200, 200, 200]  # each replica caches it
    revoke_in_store(replicas[0], key_id)
    assert [http_status(srv, token) for srv in replicas] == [200, 200, 200]  # unheard: cached (TTL-bound)
    replicas[0].api("DELETE", f"/api/v1/keys/{key_id}")
    assert http_status(replicas[0], token) == 401  # the revoking replica: as soon as DELETE answers
    for srv in replicas[1:]:
        wait_until(lambda srv=srv: http_status(srv, token) == 401, WITHIN_S, what=f"replica {srv.port} to refuse the key")
