"""Limits that hold across replicas: three real server processes over one real redis-server and
one SQLite file. A rate limit is the sum over the replicas (requests spread over the three are
limited at the class's count in total), and so is the client-socket quota. Also: the CLI shows a
429 as one line with its code and when to retry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection

from tests.support.cluster import HttpError, ServerProcess, http, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.keys import client_socket, put_key
from tests.support.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]


def status_of(server: ServerProcess, path: str, key: str) -> int:
    try:
        http("GET", server.url + path, key)
        return 200
    except HttpError as exc:
        return exc.status


@pytest.mark.redis
def test_three_replicas_on_one_redis_share_each_rate_limit(cluster: Cluster, redis: RedisServer) -> None:
    replicas = cluster.replicas(redis.url, env={"YM_RATE_API": "6/10m", "YM_RATE_UNAUTHENTICATED": "4/10m"})
    alice, _ = put_key(replicas[0], "alice", "user")
    statuses = [status_of(replicas[i % 3], "/api/v1/jobs", alice) for i in range(12)]
    assert statuses == [200] * 6 + [429] * 6  # each replica alone would have allowed 6
    bob, _ = put_key(replicas[0], "bob", "user")
    assert status_of(replicas[2], "/api/v1/jobs", bob) == 200  # per user
    # Bad keys from one address, spread over the replicas: 4 × 401 in all, then 429.
    bad = "ymk_" + "x" * 43
    assert [status_of(replicas[i % 3], "/api/v1/jobs", bad) for i in range(7)] == [401] * 4 + [429] * 3


@pytest.mark.redis
def test_the_client_socket_quota_holds_across_replicas(cluster: Cluster, redis: RedisServer) -> None:
    replicas = cluster.replicas(redis.url, env={"YM_QUOTA_CLIENT_SOCKETS": "2"})
    alice, _ = put_key(replicas[0], "alice", "user")
    sockets: list[ClientConnection] = [client_socket(replicas[0], alice), client_socket(replicas[1], alice)]
    try:
        with pytest.raises(InvalidStatus) as refused:
            sockets.append(client_socket(replicas[2], alice))
        response = refused.value.response
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
        error = json.loads(response.body or b"{}")["error"]
        assert error["code"] == "quota-exceeded" and error["quota"] == "client_sockets" and error["limit"] == 2
        sockets.pop(0).close()  # on another replica than the one asked next

        def third_accepted() -> bool:
            try:
                sockets.append(client_socket(replicas[2], alice))
            except InvalidStatus:
                return False
            return True

        wait_until(third_accepted, 15, 0.1, "a socket to be accepted once one closed")
    finally:
        for ws in sockets:
            ws.close()


def test_the_cli_shows_a_429_as_one_line_with_its_code_and_retry_time(cluster: Cluster) -> None:
    server = cluster.server(env={"YM_RATE_ADMIN": "1/10m"})
    env = {**os.environ, "YM_URL": server.url, "YM_API_KEY": server.admin_key}

    def jobs() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "yardmaster.server.cli", "jobs"]
        return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)

    assert jobs().returncode == 0
    refused = jobs()
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: rate limited by the server (rate-limited): rate limit admin (1/10m) reached; retry in ")
    assert refused.stderr.rstrip().endswith(" s") and refused.stderr.count("\n") == 1
    assert "Traceback" not in refused.stderr
