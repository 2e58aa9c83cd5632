"""The HTTP API of a real server process: authentication, validation, pagination, operations."""

from __future__ import annotations

import http.client as http_client
import json
import socket
import urllib.request
from urllib.parse import urlsplit

import pytest

from tests.support.cluster import HttpError, ServerProcess, http, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.keys import put_key
from yardmaster.server.sdk import YardmasterClient

PROTECTED = [
    ("GET", "/api/v1/jobs"),
    ("POST", "/api/v1/jobs"),
    ("GET", "/api/v1/jobs/job_x"),
    ("POST", "/api/v1/jobs/job_x/cancel"),
    ("GET", "/api/v1/jobs/job_x/logs"),
    ("GET", "/api/v1/agents"),
    ("POST", "/api/v1/agents"),
    ("DELETE", "/api/v1/agents/agt_x"),
    ("POST", "/api/v1/ws-tickets"),
    ("GET", "/api/v1/cluster"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_nothing_but_health_and_metrics_answers_without_a_credential(server: ServerProcess, method: str, path: str) -> None:
    for key in (None, "ymk_garbage", "Basic abc"):
        with pytest.raises(HttpError) as err:
            http(method, server.url + path, key, body={} if method == "POST" else None)
        assert err.value.status == 401
        assert err.value.body["error"]["code"] == "unauthorized"


def test_health_ready_and_metrics_are_open(server: ServerProcess) -> None:
    assert http("GET", server.url + "/healthz") == {"status": "ok"}
    ready = http("GET", server.url + "/readyz")
    assert ready["status"] == "ready" and ready["leader"] is True
    server.submit(image="x", command=["true"], labels=["nobody"])
    metrics = http("GET", server.url + "/metrics")
    for name in (
        'yardmaster_jobs{state="queued"} 1.0',
        "yardmaster_queue_depth 1.0",
        "yardmaster_agents_connected 0.0",
        'yardmaster_websockets_open{channel="agent"}',
        "yardmaster_dispatch_latency_seconds_bucket",
        "yardmaster_log_bytes_total",
        "yardmaster_scheduler_is_leader 1.0",
        "yardmaster_scheduler_epoch 1.0",
    ):
        assert name in metrics, name


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"command": ["true"]}, "image"),
        ({"image": "x", "command": ["true"], "timeout_s": -1}, "timeout_s"),
        ({"image": "x", "command": ["true"], "resources": {"memory_mb": 0}}, "resources.memory_mb"),
        ({"image": "x", "command": ["true"], "typo_field": 1}, "typo_field"),
        ({"image": "x", "command": ["true"], "env": {"A B": "1"}}, "env"),
    ],
)
def test_invalid_job_spec_is_422_naming_the_field(server: ServerProcess, body: dict, field: str) -> None:
    with pytest.raises(HttpError) as err:
        server.api("POST", "/api/v1/jobs", body)
    assert err.value.status == 422
    assert err.value.body["error"]["code"] == "invalid-spec" and err.value.body["error"]["field"] == field


def test_malformed_and_oversized_bodies(server: ServerProcess) -> None:
    with pytest.raises(HttpError) as err:
        http("POST", server.url + "/api/v1/jobs", server.admin_key, raw=b"{not json")
    assert err.value.status == 422
    # The server refuses an announced body over the limit without reading it (and then closes),
    # so send only the head and a little of the body, as a client streaming a big upload would.
    conn = http_client.HTTPConnection(urlsplit(server.url).hostname, urlsplit(server.url).port, timeout=15)
    conn.putrequest("POST", "/api/v1/jobs")
    conn.putheader("Authorization", f"Bearer {server.admin_key}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(2 << 20))
    conn.endheaders(b"[1,1,1")
    response = conn.getresponse()
    assert response.status == 413 and b"too-large" in response.read()
    conn.close()
    with pytest.raises(HttpError) as err:
        server.api("GET", "/api/v1/jobs?limit=0")
    assert err.value.status == 422 and err.value.body["error"]["field"] == "limit"
    with pytest.raises(HttpError) as err:
        server.api("GET", "/api/v1/jobs?state=sleeping")
    assert err.value.status == 422 and err.value.body["error"]["field"] == "state"
    with pytest.raises(HttpError) as err:
        server.api("GET", "/api/v1/jobs/job_doesnotexist")
    assert err.value.status == 404 and err.value.body["error"]["code"] == "not-found"


def test_jobs_list_filters_and_paginates_newest_first(server: ServerProcess) -> None:
    ids = [server.submit(image="x", command=["true"], labels=["nobody"], priority=i)["id"] for i in range(5)]
    page = server.api("GET", "/api/v1/jobs?limit=2")
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2] and page["next"] == ids[3]
    rest = server.api("GET", f"/api/v1/jobs?limit=10&before={page['next']}")
    assert [j["id"] for j in rest["jobs"]] == ids[::-1][2:] and rest["next"] is None
    assert server.api("GET", "/api/v1/jobs?state=running")["jobs"] == []
    job = server.job(ids[0])
    for field in ("state", "attempt", "exit_code", "agent_id", "created_at", "started_at", "finished_at"):
        assert field in job
    assert job["spec"]["network"] == "none" and job["spec"]["read_only_rootfs"] is True


def test_request_ids_are_echoed_and_security_headers_set(server: ServerProcess) -> None:
    req = urllib.request.Request(server.url + "/healthz", headers={"X-Request-ID": "abc-123"})
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["X-Request-ID"] == "abc-123"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    req = urllib.request.Request(server.url + "/healthz", headers={"X-Request-ID": "bad id with spaces\u00e9"})
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["X-Request-ID"] != "bad id with spaces\u00e9" and len(resp.headers["X-Request-ID"]) == 16


def test_agent_tokens_are_shown_once_and_never_listed(server: ServerProcess) -> None:
    created = server.create_agent("a1", labels=["gpu"], capacity=4)
    assert created["token"].startswith("yma_")
    listed = server.api("GET", "/api/v1/agents")
    assert created["token"] not in json.dumps(listed)
    assert listed["agents"][0]["labels"] == ["gpu"] and listed["agents"][0]["capacity"] == 4
    with pytest.raises(HttpError) as err:
        server.api("POST", "/api/v1/agents", {"name": "bad name!"})
    assert err.value.status == 422 and err.value.body["error"]["field"] == "name"
    log = server.log_path.read_text()
    assert created["token"] not in log and server.admin_key not in log.split("shown once", 1)[-1].split("\n", 2)[-1]


def _second_admin_key(server: ServerProcess, owner: str) -> str:
    """An admin key of another principal: there is no API that makes keys of other principals."""
    return put_key(server, owner, "admin")[0]


def test_env_values_only_reach_the_submitter_and_never_a_listing(server: ServerProcess) -> None:
    submitted = server.submit(image="x", command=["true"], labels=["nobody"], env={"TOKEN": "s3cret-value"})
    assert submitted["spec"]["env"] == {"TOKEN": "s3cret-value"}  # the submitter's own response
    assert server.job(submitted["id"])["spec"]["env"] == {"TOKEN": "s3cret-value"}
    listed = server.api("GET", "/api/v1/jobs")
    assert listed["jobs"][0]["spec"]["env"] == {"TOKEN": "***"}
    assert "s3cret-value" not in json.dumps(listed)
    other = _second_admin_key(server, "bob")
    seen = server.api("GET", f"/api/v1/jobs/{submitted['id']}", key=other)
    assert seen["owner"] == "admin" and seen["spec"]["env"] == {"TOKEN": "***"}
    cancelled = server.api("POST", f"/api/v1/jobs/{submitted['id']}/cancel", key=other)
    assert cancelled["state"] == "cancelled" and cancelled["spec"]["env"] == {"TOKEN": "***"}
    assert "s3cret-value" not in server.log_path.read_text()


ADMISSION_REFUSALS = [
    ({"resources": {"memory_mb": 1_048_576}}, "resources.memory_mb"),
    ({"resources": {"cpus": 256}}, "resources.cpus"),
    ({"resources": {"pids": 65_536}}, "resources.pids"),
    ({"user": "0:0"}, "user"),
    ({"user": "0"}, "user"),
]


def test_the_default_admission_policy_refuses_with_422_naming_the_field(server: ServerProcess) -> None:
    for extra, field in ADMISSION_REFUSALS:
        with pytest.raises(HttpError) as err:
            server.submit(image="x", command=["true"], **extra)
        assert err.value.status == 422, extra
        assert err.value.body["error"]["code"] == "not-allowed" and err.value.body["error"]["field"] == field
    assert server.api("GET", "/api/v1/jobs")["jobs"] == []
    # At the limits, and a non-root uid with gid 0, are admitted.
    ok = server.submit(image="x", command=["true"], labels=["nobody"], user="1000:0", read_only_rootfs=False,
                       resources={"memory_mb": 8192, "cpus": 8, "pids": 4096})
    assert ok["state"] == "queued"


def test_a_configured_admission_policy_is_enforced(cluster: Cluster) -> None:
    server = cluster.server(env={
        "YM_MAX_JOB_MEMORY_MB": "64", "YM_MAX_JOB_CPUS": "0.5", "YM_MAX_JOB_PIDS": "32",
        "YM_ALLOW_ROOT_JOBS": "true", "YM_ALLOWED_IMAGES": "busybox:*,registry.example.com/team/*",
    })
    within = {"memory_mb": 64, "cpus": 0.5, "pids": 32}
    for extra, field in (
        ({"image": "alpine:3"}, "image"),
        ({"image": "registry.example.com/other/app"}, "image"),
        ({"resources": {**within, "memory_mb": 65}}, "resources.memory_mb"),
        ({"resources": {**within, "cpus": 1}}, "resources.cpus"),
        ({"resources": {**within, "pids": 33}}, "resources.pids"),
    ):
        spec = {"image": "busybox:1.36", "command": ["true"], "resources": within, **extra}
        with pytest.raises(HttpError) as err:
            server.api("POST", "/api/v1/jobs", spec)
        assert err.value.status == 422 and err.value.body["error"]["field"] == field, extra
    root = server.submit(image="registry.example.com/team/app:1", command=["true"], labels=["nobody"], user="0:0",
                         resources=within)
    assert root["state"] == "queued" and root["spec"]["user"] == "0:0"


def _post_jobs(server: ServerProcess, body: object, key: str | None = None) -> tuple[int, dict]:
    """POST /api/v1/jobs: (status, JSON body)."""
    conn = http_client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", "/api/v1/jobs", json.dumps(body), {
            "Authorization": f"Bearer {key or server.admin_key}", "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _spec(**extra: object) -> dict[str, object]:
    return {"image": "x", "command": ["true"], "labels": ["nobody"], **extra}  # no agent takes it


def _queue_depth(server: ServerProcess) -> str:
    return next(line for line in http("GET", server.url + "/metrics").splitlines() if line.startswith("yardmaster_queue_depth "))


def test_a_batch_submit_stores_and_queues_every_job_in_submission_order(cluster: Cluster) -> None:
    server = cluster.server(env={"YM_QUOTA_QUEUED_JOBS": "2000"})  # 1,003 jobs queued by one user
    status, body = _post_jobs(server, [_spec(), _spec(env={"TOKEN": "batch-secret"}), _spec(priority=5)])
    assert status == 201
    jobs = body["jobs"]
    assert [j["spec"]["priority"] for j in jobs] == [0, 0, 5]
    assert all(j["state"] == "queued" and j["owner"] == "admin" for j in jobs)
    assert jobs[1]["spec"]["env"] == {"TOKEN": "batch-secret"}  # shown to the submitter, as for one job
    ids = [j["id"] for j in jobs]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [j["id"] for j in server.api("GET", "/api/v1/jobs")["jobs"]] == ids[::-1]
    assert server.job(ids[2])["state"] == "queued"
    assert _queue_depth(server) == "yardmaster_queue_depth 3.0"
    with YardmasterClient(server.url, server.admin_key) as client:
        many = client.submit_jobs([_spec(command=["echo", str(i)]) for i in range(1000)])
    assert [j["spec"]["command"] for j in many] == [["echo", str(i)] for i in range(1000)]
    assert _queue_depth(server) == "yardmaster_queue_depth 1003.0"
    assert "batch-secret" not in server.log_path.read_text()


BATCH_REFUSALS = [
    ([_spec(), _spec(), _spec(), _spec(resources={"memory_mb": 0})], "invalid-spec", "[3].resources.memory_mb"),
    ([_spec(), _spec(typo_field=1)], "invalid-spec", "[1].typo_field"),
    ([_spec(env={"A B": "1"})], "invalid-spec", "[0].env"),
    ([_spec(), 7], "invalid-spec", "[1]"),
    ([_spec(), _spec(user="0:0")], "not-allowed", "[1].user"),
    ([_spec(), _spec(resources={"memory_mb": 1_048_576})], "not-allowed", "[1].resources.memory_mb"),
    ([_spec()] * 1001, "invalid-spec", "[1000]"),
    ([], "invalid-spec", None),
]


def test_a_batch_with_one_bad_spec_is_refused_whole_naming_its_index_and_field(server: ServerProcess) -> None:
    for batch, code, field in BATCH_REFUSALS:
        status, body = _post_jobs(server, batch)
        assert status == 422, (field, body)
        assert body["error"]["code"] == code and body["error"].get("field") == field, body
    assert "at most 1000 jobs" in _post_jobs(server, [_spec()] * 1001)[1]["error"]["message"]
    assert "$[3].resources.memory_mb" in _post_jobs(server, BATCH_REFUSALS[0][0])[1]["error"]["message"]
    with pytest.raises(HttpError) as err:
        http("POST", server.url + "/api/v1/jobs", server.admin_key, raw=b'[{"image": "x", ')
    assert err.value.status == 422 and err.value.body["error"]["code"] == "invalid-spec"
    assert server.api("GET", "/api/v1/jobs")["jobs"] == []  # nothing of any refused batch stored
    assert _queue_depth(server) == "yardmaster_queue_depth 0.0"


def test_a_client_that_goes_away_mid_body_is_no_server_error(cluster: Cluster) -> None:
    server = cluster.server(env={"YM_LOG_LEVEL": "debug"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {server.admin_key}\r\n".encode()
            + b"Content-Length: 1000\r\n\r\n" + b'{"image": "x", '
        )
    seen = "before its request body was complete"

    def settled() -> str:
        text = server.log_path.read_text()
        return text if seen in text or '"level": "error"' in text else ""

    log = wait_until(settled, 10, what="the server to see the client go away")
    assert '"level": "error"' not in log and "Traceback" not in log and seen in log
    assert server.api("GET", "/api/v1/jobs")["jobs"] == []
