"""The queued-jobs quota under concurrent submits from three replicas (issue 9): three real server
processes over one real redis-server and one SQLite file; one user's submits, spread over the
replicas at once, never get more than the quota accepted, and a refused submit stores nothing."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.support.cluster import HttpError, ServerProcess, http
from tests.support.cluster_plugin import Cluster
from tests.support.keys import put_key
from tests.support.redis_server import RedisServer
from yardmaster.server.backends.sqlite_store import SqliteStore

pytestmark = pytest.mark.redis

QUOTA = 30
SUBMITS = 90
JOB = {"image": "none", "command": ["true"], "labels": ["nobody"]}  # no agent: it stays queued
USER = "racer"


def attempt(server: ServerProcess, key: str, body: Any) -> tuple[int, Any]:
    """(status, JSON answer) of one submit."""
    try:
        return 201, http("POST", f"{server.url}/api/v1/jobs", key, body)
    except HttpError as exc:
        return exc.status, exc.body


def race(servers: list[ServerProcess], key: str, bodies: list[Any]) -> list[tuple[int, Any]]:
    """Every submit at once, the i-th to replica i mod 3."""
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(lambda i: attempt(servers[i % len(servers)], key, bodies[i]), range(len(bodies))))


def queued_in_store(server: ServerProcess) -> int:
    """The user's queued jobs, read from the replicas' SQLite file."""

    async def count() -> int:
        store = SqliteStore(str(server.data_dir / "yardmaster.db"))
        await store.start()
        try:
            return await store.count_jobs(owner=USER, states=["queued"])
        finally:
            await store.close()

    return asyncio.run(count())


def assert_refusals(outcomes: list[tuple[int, Any]]) -> None:
    for status, body in outcomes:
        assert status == 429, (status, body)
        assert (body["error"]["code"], body["error"]["quota"], body["error"]["limit"]) == ("quota-exceeded", "queued_jobs", QUOTA)


def test_concurrent_submits_over_three_replicas_never_exceed_the_queued_jobs_quota(cluster: Cluster, redis: RedisServer) -> None:
    servers = cluster.replicas(redis.url, env={"YM_QUOTA_QUEUED_JOBS": str(QUOTA)})
    key, _ = put_key(servers[0], USER, "user")

    outcomes = race(servers, key, [JOB] * SUBMITS)
    accepted = [body for status, body in outcomes if status == 201]
    assert len(accepted) == QUOTA
    assert_refusals([o for o in outcomes if o[0] != 201])
    assert queued_in_store(servers[0]) == QUOTA
    for srv in servers:  # every replica reads the same count from the Broker
        assert http("GET", f"{srv.url}/api/v1/users/me", key)["usage"]["queued_jobs"] == QUOTA

    # Ten places free up; batches of three race for them: three batches fit, whole, the rest none.
    for job in accepted[:10]:
        http("POST", f"{servers[1].url}/api/v1/jobs/{job['id']}/cancel", key)
    batches = race(servers, key, [[JOB] * 3] * 12)
    assert [status for status, _ in batches].count(201) == 3
    assert all(len(body["jobs"]) == 3 for status, body in batches if status == 201)
    assert_refusals([o for o in batches if o[0] != 201])
    assert queued_in_store(servers[0]) == QUOTA - 1
    assert http("GET", f"{servers[2].url}/api/v1/users/me", key)["usage"]["queued_jobs"] == QUOTA - 1
