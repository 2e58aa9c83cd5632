"""Per-user quotas over HTTP, in process (issue 9): the queued-jobs quota refuses a submit (or a
whole batch) with 429 `quota-exceeded`, never stores part of a refused batch, has room again
after a cancel; GET /api/v1/users/me shows usage and limits; the refusals are counted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.inproc import JOB, App, in_process_app
from yardmaster.protocol.jobs import JobSpec
from yardmaster.server.backends.records import JobRecord

QUOTA = 3
SUBMIT_RATE = "600/1m"


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    env = {"YM_QUOTA_QUEUED_JOBS": str(QUOTA), "YM_QUOTA_RUNNING_JOBS": "7", "YM_QUOTA_CLIENT_SOCKETS": "9",
           "YM_QUOTA_SUBSCRIPTIONS": "11", "YM_SANDBOX_MAX_ACTIVE": "2", "YM_RATE_SUBMIT": SUBMIT_RATE}
    with in_process_app(tmp_path, env) as app:
        yield app


def user_key(app: App, name: str = "quinn") -> str:
    app.user(name)
    return app.key(name)[0]


def refused_submits(app: App) -> float:
    value = app.rt.metrics.registry.get_sample_value("yardmaster_quota_exceeded_total", {"quota": "queued_jobs"})
    return value or 0.0


def assert_quota_refusal(resp: Any) -> None:
    assert resp.status_code == 429, resp.text
    assert int(resp.headers["Retry-After"]) >= 1
    error = resp.json()["error"]
    assert (error["code"], error["quota"], error["limit"]) == ("quota-exceeded", "queued_jobs", QUOTA)
    assert error["retry_after_s"] == int(resp.headers["Retry-After"])


def stored_jobs(app: App, owner: str) -> list[str]:
    return [job.id for job in app.run(lambda: app.rt.store.list_jobs(owner=owner, limit=100))]


def test_the_submit_past_the_queued_jobs_quota_is_refused_with_429(app: App) -> None:
    key = user_key(app)
    for _ in range(QUOTA):
        app.submit(key)
    assert refused_submits(app) == 0
    assert_quota_refusal(app.request("POST", "/api/v1/jobs", key, JOB))
    assert len(stored_jobs(app, "quinn")) == QUOTA
    assert refused_submits(app) == 1
    # Another user's quota is their own.
    app.submit(user_key(app, "other"))


def test_a_batch_that_would_cross_the_quota_is_refused_whole_and_a_cancel_makes_room(app: App) -> None:
    key = user_key(app)
    first = app.api("POST", "/api/v1/jobs", key, [JOB] * (QUOTA - 1), status=201)["jobs"]
    before = stored_jobs(app, "quinn")
    assert_quota_refusal(app.request("POST", "/api/v1/jobs", key, [JOB, JOB]))
    assert stored_jobs(app, "quinn") == before  # nothing of the batch was stored
    assert app.run(app.rt.broker.queued_count, "quinn") == QUOTA - 1  # nor queued
    app.submit(key)  # the last place
    assert_quota_refusal(app.request("POST", "/api/v1/jobs", key, JOB))
    assert app.api("POST", f"/api/v1/jobs/{first[0]['id']}/cancel", key, status=202)["state"] == "cancelled"
    app.submit(key)  # the cancel made room
    assert_quota_refusal(app.request("POST", "/api/v1/jobs", key, JOB))
    assert refused_submits(app) == 3
    metrics = app.client.get("/metrics").text
    assert 'yardmaster_quota_exceeded_total{quota="queued_jobs"} 3.0' in metrics


def test_users_me_shows_usage_and_limits(app: App) -> None:
    key = user_key(app)
    empty = app.api("GET", "/api/v1/users/me", key)
    assert empty["usage"] == {"queued_jobs": 0, "running_jobs": 0, "client_sockets": 0, "sandboxes": 0}
    app.submit(key)
    app.submit(key)
    now = time.time()
    running = JobRecord(id="job_running_quinn", owner="quinn", spec=JobSpec(**JOB), state="running", priority=0,
                        created_at=now, updated_at=now, enqueued_at=now, attempt=1, agent_id="agt_x")
    app.run(app.rt.store.create_job, running)
    me = app.api("GET", "/api/v1/users/me", key)
    assert me["id"] == "quinn" and me["role"] == "user"
    assert me["usage"] == {"queued_jobs": 2, "running_jobs": 1, "client_sockets": 0, "sandboxes": 0}
    limits = me["limits"]
    assert {k: v for k, v in limits.items() if k != "rates"} == {
        "queued_jobs": QUOTA, "running_jobs": 7, "client_sockets": 9, "subscriptions_per_socket": 11, "sandboxes": 2,
    }
    assert limits["rates"]["submit"] == {"count": 600, "period_s": 60.0}
    assert limits["rates"]["api"] is None  # off in tests (tests/support/limits.py)
    assert set(limits["rates"]) == {"sign-in", "submit", "sandbox-create", "api", "handshake", "client-messages"}


def test_an_admin_sees_the_admin_rate_class_instead_of_api(app: App) -> None:
    me = app.api("GET", "/api/v1/users/me")
    assert "admin" in me["limits"]["rates"] and "api" not in me["limits"]["rates"]


def test_users_me_counts_the_users_open_client_sockets(app: App) -> None:
    key = user_key(app)
    headers = {"Authorization": f"Bearer {key}"}
    with app.client.websocket_connect("ws://127.0.0.1:8080/ws/client", headers=headers):
        assert app.api("GET", "/api/v1/users/me", key)["usage"]["client_sockets"] == 1
    assert app.api("GET", "/api/v1/users/me", key)["usage"]["client_sockets"] == 0
