"""The whole job path: real server process, real agent processes, real Docker engine."""

from __future__ import annotations

import signal

import pytest

from yardmaster.protocol import messages as m
from tests.support.cluster import HttpError, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.docker_engine import DockerEngine
from tests.support.ws import RawAgent, Subscriber

pytestmark = pytest.mark.docker


def _image(engine: DockerEngine) -> str:
    return engine.image


def _texts(entries: list[dict]) -> list[str]:
    return [e["text"] for e in entries]


def _lines(entries: list[dict], stream: str) -> list[str]:
    return "".join(e["text"] for e in entries if e["stream"] == stream).splitlines()


def _metric(server, name: str) -> float:
    text = server.api("GET", "/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_stdout_and_stderr_arrive_in_order_with_the_right_outcome(cluster: Cluster, docker_engine: DockerEngine) -> None:
    server = cluster.server()
    cluster.agent(server, "a1", docker_host=docker_engine.host)
    script = "for i in $(seq 1 30); do echo out$i; echo err$i >&2; done"
    job = server.submit(image=_image(docker_engine), command=["sh", "-c", script])
    sub = Subscriber(server.ws_url, server.admin_key, f"job:{job['id']}", from_offset=0)
    try:
        done = server.wait_state(job["id"], {"succeeded", "failed"})
        assert done["state"] == "succeeded" and done["exit_code"] == 0 and done["attempt"] == 1
        entries = server.logs(job["id"])
        assert _lines(entries, "stdout") == [f"out{i}" for i in range(1, 31)]
        assert _lines(entries, "stderr") == [f"err{i}" for i in range(1, 31)]
        assert [e["offset"] for e in entries] == list(range(len(entries)))
        sub.wait_for(lambda s: len(s.logs()) == len(entries) and "succeeded" in s.states(), what="all logs")
        assert [(x["offset"], x["stream"], x["text"]) for x in sub.logs()] == [
            (e["offset"], e["stream"], e["text"]) for e in entries
        ]
    finally:
        sub.close()
    failing = server.submit(image=_image(docker_engine), command="echo bye; exit 7")
    done = server.wait_state(failing["id"], {"succeeded", "failed"})
    assert done["state"] == "failed" and done["exit_code"] == 7
    assert server.api("GET", f"/api/v1/jobs/{failing['id']}/logs?format=text") == "bye\n"


def test_late_subscriber_gets_everything_and_resume_gets_exactly_the_rest(
    cluster: Cluster, docker_engine: DockerEngine
) -> None:
    server = cluster.server()
    cluster.agent(server, "a1", docker_host=docker_engine.host)
    job = server.submit(image=_image(docker_engine), command="for i in $(seq 1 40); do echo line$i; sleep 0.05; done")
    wait_until(lambda: len(server.logs(job["id"])) >= 5, 30, what="some output")
    late = Subscriber(server.ws_url, server.admin_key, f"job:{job['id']}", from_offset=0)
    first = Subscriber(server.ws_url, server.admin_key, f"job:{job['id']}", from_offset=0)
    first.wait_for(lambda s: len(s.logs()) >= 3, what="three entries")
    first.close()
    seen = first.logs()
    last = seen[-1]["offset"]
    resumed = Subscriber(server.ws_url, server.admin_key, f"job:{job['id']}", from_offset=last + 1)
    try:
        server.wait_state(job["id"], "succeeded")
        entries = server.logs(job["id"])
        expected = [(e["offset"], e["text"]) for e in entries]
        assert "".join(_texts(entries)).splitlines() == [f"line{i}" for i in range(1, 41)]
        late.wait_for(lambda s: len(s.logs()) >= len(entries), what="late subscriber to catch up")
        assert [(x["offset"], x["text"]) for x in late.logs()] == expected  # no gap, no duplicate
        resumed.wait_for(lambda s: s.logs() and s.logs()[-1]["offset"] == entries[-1]["offset"], what="the rest")
        assert [(x["offset"], x["text"]) for x in seen + resumed.logs()] == expected
    finally:
        late.close()
        resumed.close()


def test_cancel_running_job_and_queued_job(cluster: Cluster, docker_engine: DockerEngine) -> None:
    server = cluster.server()
    cluster.agent(server, "a1", docker_host=docker_engine.host)
    job = server.submit(image=_image(docker_engine), command=["sleep", "600"])
    server.wait_state(job["id"], "running")
    wait_until(lambda: docker_engine.containers(f"yardmaster.job={job['id']}"), 20, what="container")
    cancelled = server.api("POST", f"/api/v1/jobs/{job['id']}/cancel")
    assert cancelled["state"] in {"cancelling", "cancelled"}
    done = server.wait_state(job["id"], "cancelled", timeout=30)
    assert done["state"] == "cancelled"
    assert _metric(server, 'yardmaster_ws_messages_total{channel="agent",direction="in",type="cancel-ack"}') >= 1
    wait_until(lambda: not docker_engine.containers(f"yardmaster.job={job['id']}"), 20, what="container removal")

    queued = server.submit(image=_image(docker_engine), command=["true"], labels=["nobody-has-this"])
    response = server.api("POST", f"/api/v1/jobs/{queued['id']}/cancel")
    assert response["state"] == "cancelled"
    with pytest.raises(HttpError) as err:
        server.api("POST", f"/api/v1/jobs/{queued['id']}/cancel")
    assert err.value.status == 409


def test_timeout_marks_timed_out_and_removes_the_container(cluster: Cluster, docker_engine: DockerEngine) -> None:
    server = cluster.server()
    cluster.agent(server, "a1", docker_host=docker_engine.host)
    job = server.submit(image=_image(docker_engine), command=["sleep", "600"], timeout_s=2)
    done = server.wait_state(job["id"], {"timed-out", "failed", "succeeded"}, timeout=30)
    assert done["state"] == "timed-out"
    assert "timed out" in (done["error"] or "")
    wait_until(lambda: not docker_engine.containers(f"yardmaster.job={job['id']}"), 20, what="container removal")


def test_killed_agent_loses_its_job_to_another_and_stale_result_is_refused(
    cluster: Cluster, docker_engine: DockerEngine
) -> None:
    server = cluster.server()
    first, first_id, first_token = cluster.agent(server, "a1", docker_host=docker_engine.host)
    job = server.submit(image=_image(docker_engine), command="echo start; sleep 3; echo end")
    running = server.wait_state(job["id"], "running")
    assert running["attempt"] == 1 and running["agent_id"] == first_id
    first.stop(signal.SIGKILL)
    _, second_id, _ = cluster.agent(server, "a2", docker_host=docker_engine.host)
    done = server.wait_state(job["id"], "succeeded", timeout=40)
    assert done["attempt"] == 2 and done["agent_id"] == second_id and done["exit_code"] == 0
    assert "end" in server.api("GET", f"/api/v1/jobs/{job['id']}/logs?format=text")

    ghost = RawAgent(server.ws_url, first_token)
    try:
        ghost.send(m.Result(job_id=job["id"], attempt=1, state="failed", exit_code=99))
        reply = ghost.recv_until(m.Error)
        assert reply.code == "stale-attempt" and reply.job_id == job["id"]
    finally:
        ghost.close()
    after = server.job(job["id"])
    assert (after["state"], after["attempt"], after["exit_code"]) == ("succeeded", 2, 0)
    for c in docker_engine.containers(f"yardmaster.job={job['id']}"):
        # attempt 1's container outlived its kill -9'd agent; the next agent start cleans it up
        assert c.get("Labels", {}).get("yardmaster.attempt") == "1"


def test_hardening_inside_the_job_container(cluster: Cluster, docker_engine: DockerEngine) -> None:
    server = cluster.server()
    cluster.agent(server, "a1", docker_host=docker_engine.host)
    probe = (
        "touch /rootfs-probe 2>/dev/null && echo rootfs=writable || echo rootfs=readonly;"
        " echo uid=$(id -u);"
        " grep CapEff /proc/self/status;"
        " echo ifaces=$(ls /sys/class/net | tr '\\n' ',');"
        " touch /tmp/ok && echo tmp=writable"
    )
    job = server.submit(image=_image(docker_engine), command=probe)
    server.wait_state(job["id"], "succeeded")
    text = server.api("GET", f"/api/v1/jobs/{job['id']}/logs?format=text")
    assert "rootfs=readonly" in text
    assert "uid=65534" in text
    assert "CapEff:\t0000000000000000" in text
    assert "ifaces=lo," in text
    assert "tmp=writable" in text

    hog = server.submit(
        image=_image(docker_engine),
        command="head -c 200000000 /dev/zero > /tmp/fill; echo survived",
        resources={"memory_mb": 16},
    )
    done = server.wait_state(hog["id"], {"failed", "succeeded"})
    assert done["state"] == "failed"
    assert "memory" in (done["error"] or "").lower()
    assert done["exit_code"] == 137


def test_missing_image_fails_with_image_not_found(cluster: Cluster, docker_engine: DockerEngine) -> None:
    server = cluster.server()
    cluster.agent(server, "a1", docker_host=docker_engine.host)
    job = server.submit(image="yardmaster-test/does-not-exist:1", command=["true"])
    done = server.wait_state(job["id"], {"failed", "succeeded"})
    assert done["state"] == "failed" and "image-not-found" in (done["error"] or "")


def test_jobs_and_logs_survive_a_server_restart(cluster: Cluster, docker_engine: DockerEngine) -> None:
    server = cluster.server()
    agent, _, _ = cluster.agent(server, "a1", docker_host=docker_engine.host)
    job = server.submit(image=_image(docker_engine), command="echo persisted")
    server.wait_state(job["id"], "succeeded")
    agent.stop()
    key = server.admin_key
    server.stop()
    server.start()
    assert server.admin_key == key
    again = server.job(job["id"])
    assert again["state"] == "succeeded" and again["exit_code"] == 0
    assert server.api("GET", f"/api/v1/jobs/{job['id']}/logs?format=text") == "persisted\n"
    agents = server.api("GET", "/api/v1/agents")["agents"]
    assert [a["name"] for a in agents] == ["a1"]
