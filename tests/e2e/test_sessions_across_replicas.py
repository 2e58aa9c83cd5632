"""Sign-in sessions across three real server replicas over one real redis-server and one shared
data dir (one SQLite file, one signing key): a token issued by one replica is accepted by the
others, a refresh token rotates anywhere (and its reuse is caught anywhere), a logout through
one replica makes the others refuse the access token at once, and failed logins are counted
across replicas."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.support.cluster import ServerProcess
from tests.support.cluster_plugin import Cluster
from tests.support.redis_server import RedisServer
from yardmaster.server.backends.records import UserRecord
from yardmaster.server.backends.sqlite_store import SqliteStore
from yardmaster.server.security.passwords import hash_password

pytestmark = pytest.mark.redis

PASSWORD = "correct horse battery staple"


def put_user(server: ServerProcess, username: str) -> None:
    """A user with PASSWORD, written straight into the replicas' shared SQLite file."""

    async def put() -> None:
        store = SqliteStore(str(server.data_dir / "yardmaster.db"))
        await store.start()
        try:
            await store.create_user(UserRecord(
                id=username, username=username, password_hash=hash_password(PASSWORD), created_at=time.time()
            ))
        finally:
            await store.close()

    asyncio.run(put())


def post(server: ServerProcess, path: str, body: Any = None, bearer: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=15)


def jobs_status(server: ServerProcess, bearer: str) -> int:
    return httpx.get(server.url + "/api/v1/jobs", headers={"Authorization": f"Bearer {bearer}"}, timeout=15).status_code


def login(server: ServerProcess, username: str, password: str = PASSWORD) -> httpx.Response:
    return post(server, "/api/v1/auth/login", {"username": username, "password": password})


def test_tokens_work_on_every_replica_and_a_logout_on_one_holds_on_all(cluster: Cluster, redis: RedisServer) -> None:
    a, b, c = cluster.replicas(redis.url, 3)
    put_user(a, "hana")
    jwks = {httpx.get(srv.url + "/.well-known/jwks.json", timeout=15).json()["keys"][0]["kid"] for srv in (a, b, c)}
    assert len(jwks) == 1  # one key, shared through the data dir
    first = login(a, "hana").json()
    assert [jobs_status(srv, first["access_token"]) for srv in (a, b, c)] == [200, 200, 200]

    second = post(b, "/api/v1/auth/refresh", {"refresh_token": first["refresh_token"]}).json()  # A's token, on B
    assert [jobs_status(srv, second["access_token"]) for srv in (a, b, c)] == [200, 200, 200]

    resp = post(a, "/api/v1/auth/logout", {"refresh_token": second["refresh_token"]}, bearer=second["access_token"])
    assert resp.status_code == 204
    # The denylist is in Redis and read on every request: no waiting.
    assert [jobs_status(srv, second["access_token"]) for srv in (a, b, c)] == [401, 401, 401]
    assert post(c, "/api/v1/auth/refresh", {"refresh_token": second["refresh_token"]}).status_code == 401
    logs = "".join(srv.log_path.read_text(errors="replace") for srv in (a, b, c))
    for secret in (PASSWORD, first["access_token"], first["refresh_token"], second["access_token"], second["refresh_token"]):
        assert secret not in logs


def test_a_refresh_token_replayed_on_another_replica_revokes_the_family(cluster: Cluster, redis: RedisServer) -> None:
    a, b, c = cluster.replicas(redis.url, 3)
    put_user(a, "ivo")
    first = login(a, "ivo").json()
    second = post(b, "/api/v1/auth/refresh", {"refresh_token": first["refresh_token"]}).json()
    replay = post(c, "/api/v1/auth/refresh", {"refresh_token": first["refresh_token"]})
    assert replay.status_code == 401
    assert post(a, "/api/v1/auth/refresh", {"refresh_token": second["refresh_token"]}).status_code == 401


def test_failed_logins_are_counted_across_replicas(cluster: Cluster, redis: RedisServer) -> None:
    a, b, c = cluster.replicas(redis.url, 3)
    put_user(a, "jo")
    for srv in (a, b, c, a, b):
        assert login(srv, "jo", "not the password").status_code == 401
    # Five failures in all: 1 s to wait after the fifth, 2 s after the sixth, 4 s after the
    # seventh (long enough that a slow machine still sees the wait).
    time.sleep(1.1)
    assert login(c, "jo", "not the password").status_code == 401
    time.sleep(2.1)
    assert login(a, "jo", "not the password").status_code == 401
    throttled = login(b, "jo")  # the right password, on a replica that saw two failures of seven
    assert throttled.status_code == 429
    assert throttled.json()["error"]["code"] == "too-many-attempts"
    assert 1 <= int(throttled.headers["retry-after"]) <= 4
