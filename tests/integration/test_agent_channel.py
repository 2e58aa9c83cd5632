"""The agent channel against a real server process: authentication, protocol errors, supersede,
revocation, and reconnecting within the lease (through a proxy whose connections we cut)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from yardmaster.protocol import messages as m
from yardmaster.protocol.codec import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK
from tests.support.cluster import HttpError, ServerProcess, http, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.keys import put_key
from tests.support.tcp_proxy import TcpProxy
from tests.support.ws import RawAgent, Subscriber, handshake_status

MSGPACK = [SUBPROTOCOL_MSGPACK]


def test_bad_missing_and_revoked_tokens_are_refused_before_the_upgrade(server: ServerProcess) -> None:
    url = f"{server.ws_url}/ws/agent"
    assert handshake_status(url, subprotocols=MSGPACK) == 401
    assert handshake_status(url, {"Authorization": "Bearer nonsense"}, MSGPACK) == 401
    forged = "yma_" + "A" * 34  # right shape, wrong checksum
    assert handshake_status(url, {"Authorization": f"Bearer {forged}"}, MSGPACK) == 401
    created = server.create_agent("a1")
    auth = {"Authorization": f"Bearer {created['token']}"}
    assert handshake_status(url, {**auth, "Origin": "http://evil.example"}, MSGPACK) == 403
    assert handshake_status(url, auth, MSGPACK) == 101
    server.api("DELETE", f"/api/v1/agents/{created['id']}")
    assert handshake_status(url, auth, MSGPACK) == 403
    # An API key is not an agent token.
    assert handshake_status(url, {"Authorization": f"Bearer {server.admin_key}"}, MSGPACK) == 401


def test_revoking_a_connected_agent_closes_its_socket_with_4001(server: ServerProcess) -> None:
    created = server.create_agent("a1")
    agent = RawAgent(server.ws_url, created["token"])
    server.api("DELETE", f"/api/v1/agents/{created['id']}")
    assert agent.close_code() == 4001


def test_second_connection_supersedes_the_first_with_4002(server: ServerProcess) -> None:
    created = server.create_agent("a1")
    old = RawAgent(server.ws_url, created["token"])
    new = RawAgent(server.ws_url, created["token"])
    assert old.close_code() == 4002
    new.send(m.Heartbeat())
    new.send(m.JobAccept(job_id="job_nope", attempt=1))
    assert new.recv().code == "unknown-job"  # the new one still works
    new.close()


def test_malformed_unknown_and_oversized_frames(server: ServerProcess) -> None:
    created = server.create_agent("a1")
    other_created = server.create_agent("a2")
    agent = RawAgent(server.ws_url, created["token"], binary=False)
    bystander = RawAgent(server.ws_url, other_created["token"], binary=True)
    agent.send_raw("this is not json")
    assert agent.recv().code == "malformed"
    agent.send_raw(json.dumps({"type": "launch-missiles"}))
    assert agent.recv().code == "unknown-type"
    agent.send_raw(json.dumps({"type": "log-chunk", "job_id": 5}))
    assert agent.recv().code == "malformed"
    agent.send_raw(b"\x93binary on a json connection")
    assert agent.recv().code == "malformed"
    agent.send_raw("x" * ((1 << 20) + 1024))  # just over the 1 MiB limit
    assert agent.close_code() == 1009
    # Other connections keep working.
    bystander.send(m.JobAccept(job_id="job_nope", attempt=1))
    assert bystander.recv().code == "unknown-job"
    bystander.close()


def test_first_message_must_be_hello(server: ServerProcess) -> None:
    created = server.create_agent("a1")
    agent = RawAgent(server.ws_url, created["token"], hello=False)
    agent.send(m.Heartbeat())
    assert agent.close_code() == 4003


def test_unsupported_subprotocol_is_refused(server: ServerProcess) -> None:
    created = server.create_agent("a1")
    auth = {"Authorization": f"Bearer {created['token']}"}
    assert handshake_status(f"{server.ws_url}/ws/agent", auth, ["yardmaster.v0.xml"]) == 400
    assert handshake_status(f"{server.ws_url}/ws/agent", auth, [SUBPROTOCOL_JSON]) == 101


def test_reconnect_within_the_lease_keeps_the_job_and_its_log_complete(cluster: Cluster) -> None:
    server = cluster.server()
    proxy = TcpProxy(server.port)
    try:
        _, agent_id, _ = cluster.agent(server, "p1", executor="process", urls=[proxy.url])
        job = server.submit(image="none", command="for i in $(seq 1 40); do echo line$i; sleep 0.1; done")
        wait_until(lambda: len(server.logs(job["id"])) >= 5, 20, what="some output")
        before = proxy.accepted
        proxy.cut()
        wait_until(lambda: proxy.accepted > before and Cluster.connected(server, agent_id), 20, what="reconnect")
        done = server.wait_state(job["id"], {"succeeded", "failed"}, timeout=30)
        assert done["state"] == "succeeded" and done["attempt"] == 1 and done["runs"] == 1
        text = server.api("GET", f"/api/v1/jobs/{job['id']}/logs?format=text")
        assert text.splitlines() == [f"line{i}" for i in range(1, 41)]
        offsets = [e["offset"] for e in server.logs(job["id"])]
        assert offsets == list(range(len(offsets)))
    finally:
        proxy.close()


def test_result_is_accepted_once_and_only_for_the_current_attempt(server: ServerProcess) -> None:
    created = server.create_agent("raw", capacity=1)
    agent = RawAgent(server.ws_url, created["token"])
    try:
        # The raw agent said capacity 0 in its hello; say it can take one job now.
        agent.send(m.Hello(name="raw", version="test", capacity=1))
        assert agent.recv().code == "unexpected-message"
        agent.close()
        agent = RawAgent.__new__(RawAgent)
        RawAgent.__init__(agent, server.ws_url, created["token"], hello=False)
        agent.send(m.Hello(name="raw", version="test", capacity=1, executor="process"))
        agent.recv_until(m.Welcome)
        job = server.submit(image="none", command=["true"])
        assign = agent.recv_until(m.JobAssign, timeout=20)
        assert assign.job_id == job["id"] and assign.attempt == 1
        agent.send(m.JobAccept(job_id=job["id"], attempt=1))
        agent.send(m.LogChunk(job_id=job["id"], attempt=1, seq=0, stream="stdout", data=b"a\n", ts=0.0))
        assert agent.recv_until(m.LogAck).seq == 0
        agent.send(m.LogChunk(job_id=job["id"], attempt=1, seq=0, stream="stdout", data=b"a\n", ts=0.0))
        assert agent.recv_until(m.LogAck).seq == 0  # duplicate: acked, not stored twice
        agent.send(m.LogChunk(job_id=job["id"], attempt=1, seq=5, stream="stdout", data=b"x\n", ts=0.0))
        assert agent.recv().code == "seq-gap"
        agent.send(m.Result(job_id=job["id"], attempt=1, state="succeeded", exit_code=0))
        assert agent.recv_until(m.ResultAck).accepted
        agent.send(m.Result(job_id=job["id"], attempt=1, state="failed", exit_code=1))
        assert agent.recv_until(m.ResultAck).accepted  # replay: acknowledged, changes nothing
        agent.send(m.Result(job_id=job["id"], attempt=2, state="failed", exit_code=1))
        assert agent.recv_until(m.Error).code == "stale-attempt"
        final = server.job(job["id"])
        assert (final["state"], final["exit_code"], final["attempt"]) == ("succeeded", 0, 1)
        assert server.api("GET", f"/api/v1/jobs/{job['id']}/logs?format=text") == "a\n"
    finally:
        agent.close()


def test_an_agent_partitioned_past_its_lease_drops_the_stale_attempt_when_it_returns(cluster: Cluster) -> None:
    server = cluster.server()
    proxy = TcpProxy(server.port)
    try:
        partitioned, first_id, _ = cluster.agent(server, "far", executor="process", urls=[proxy.url])
        job = server.submit(image="none", command="i=0; while [ $i -lt 100 ]; do echo tick$i; i=$((i+1)); sleep 0.1; done")
        assert server.wait_state(job["id"], "running")["agent_id"] == first_id
        proxy.refusing = True
        proxy.cut()
        # Past the lease (3 s in tests) the job goes back to the queue; a second agent takes attempt 2.
        _, second_id, _ = cluster.agent(server, "near", executor="process")
        wait_until(lambda: server.job(job["id"])["attempt"] == 2, 20, what="attempt 2")
        assert server.job(job["id"])["agent_id"] == second_id
        proxy.refusing = False  # the partition heals while attempt 2 runs
        wait_until(lambda: Cluster.connected(server, first_id), 20, what="the partitioned agent to return")
        done = server.wait_state(job["id"], {"succeeded", "failed"}, timeout=40)
        assert (done["state"], done["attempt"], done["agent_id"]) == ("succeeded", 2, second_id)
        entries = server.logs(job["id"])
        attempt2 = "".join(e["text"] for e in entries if e["attempt"] == 2)
        assert attempt2.splitlines() == [f"tick{i}" for i in range(100)]  # attempt 2 complete, once
        first_attempt_entries = [e for e in entries if e["attempt"] == 1]
        # Attempt 1 stored only what arrived before the partition: the returning agent was told to
        # drop it (welcome keep=false), so nothing of it was stored after attempt 2 began.
        assert all(e["offset"] < min(x["offset"] for x in entries if x["attempt"] == 2) for e in first_attempt_entries)
        # The returning agent stopped its own attempt 1 because the welcome said so.
        wait_until(lambda: f"server dropped job {job['id']} attempt 1" in partitioned.log_tail(400), 10,
                   what="the returning agent to drop attempt 1")
    finally:
        proxy.close()


# ---- the registration decides (issue 6, item 1) -------------------------------------------------


def say_hello(server: ServerProcess, token: str, **hello: Any) -> tuple[RawAgent, m.Welcome]:
    agent = RawAgent(server.ws_url, token, hello=False)
    # The process executor: the jobs of these tests are image "none" (see ServerProcess.submit).
    agent.send(m.Hello(**{"name": "raw", "version": "test", "executor": "process", **hello}))
    welcome = agent.recv()
    assert isinstance(welcome, m.Welcome), welcome
    return agent, welcome


def agent_entry(server: ServerProcess, agent_id: str) -> dict[str, Any]:
    return next(a for a in server.api("GET", "/api/v1/agents")["agents"] if a["id"] == agent_id)


def test_declared_labels_cannot_attract_jobs_meant_for_other_agents(server: ServerProcess) -> None:
    created = server.create_agent("a1", labels=["a"], capacity=1)
    agent, welcome = say_hello(server, created["token"], labels=["prod"], capacity=1)
    try:
        assert (welcome.labels, welcome.capacity) == (["a"], 1)
        entry = agent_entry(server, created["id"])
        assert (entry["labels"], entry["registered_labels"], entry["declared_labels"]) == (["a"], ["a"], ["prod"])
        prod = server.submit(image="none", command=["true"], labels=["prod"], env={"SECRET": "for prod only"})
        mine = server.submit(image="none", command=["true"], labels=["a"])
        # The scheduler considers jobs in order: by the time the later job is assigned, the prod
        # job has been passed over for this agent, which had a free slot.
        assign = agent.recv_until(m.JobAssign, timeout=20)
        assert assign.job_id == mine["id"]
        assert server.job(prod["id"])["state"] == "queued"
    finally:
        agent.close()


def test_registered_labels_survive_a_hello_that_declares_none(server: ServerProcess) -> None:
    created = server.create_agent("a1", labels=["gpu"], capacity=1)
    agent, welcome = say_hello(server, created["token"], capacity=1)
    try:
        assert (welcome.labels, welcome.capacity) == (["gpu"], 1)
        job = server.submit(image="none", command=["true"], labels=["gpu"])
        assert agent.recv_until(m.JobAssign, timeout=20).job_id == job["id"]
    finally:
        agent.close()


def test_an_agent_registered_without_labels_gets_its_valid_declared_ones(server: ServerProcess) -> None:
    created = server.create_agent("a1", capacity=2)
    agent, welcome = say_hello(server, created["token"], labels=["edge", "has space", "x" * 200, "edge"], capacity=2)
    try:
        # Invalid labels (the job label rule) are dropped; the welcome says what was granted.
        assert (welcome.labels, welcome.capacity) == (["edge"], 2)
        entry = agent_entry(server, created["id"])
        assert (entry["labels"], entry["registered_labels"], entry["declared_labels"]) == (["edge"], [], ["edge"])
        job = server.submit(image="none", command=["true"], labels=["edge"])
        assert agent.recv_until(m.JobAssign, timeout=20).job_id == job["id"]
    finally:
        agent.close()


def test_capacity_is_the_smaller_of_declared_and_registered(server: ServerProcess) -> None:
    small = server.create_agent("small", labels=["x"], capacity=1)
    other = server.create_agent("other", labels=["y"], capacity=4)
    x, x_welcome = say_hello(server, small["token"], capacity=5)
    y, y_welcome = say_hello(server, other["token"], capacity=2)
    try:
        assert x_welcome.capacity == 1 and y_welcome.capacity == 2
        assert (agent_entry(server, small["id"])["capacity"], agent_entry(server, small["id"])["declared_capacity"]) == (1, 5)
        first = server.submit(image="none", command=["true"], labels=["x"])
        assign = x.recv_until(m.JobAssign, timeout=20)
        assert assign.job_id == first["id"]
        x.send(m.JobAccept(job_id=first["id"], attempt=1))
        second = server.submit(image="none", command=["true"], labels=["x"])
        third = server.submit(image="none", command=["true"], labels=["y"])
        assert y.recv_until(m.JobAssign, timeout=20).job_id == third["id"]
        # `second` was considered before `third`: the agent that asked for 5 slots has only 1.
        assert server.job(second["id"])["state"] == "queued"
    finally:
        x.close()
        y.close()


# ---- bounded agent messages (issue 6, item 2) ---------------------------------------------------


def test_running_lists_longer_than_the_declared_capacity_are_protocol_errors(server: ServerProcess) -> None:
    created = server.create_agent("a1", capacity=4)
    running = [m.RunningJob(job_id=f"job_{i}", attempt=1) for i in range(3)]
    agent = RawAgent(server.ws_url, created["token"], hello=False)
    agent.send(m.Hello(name="raw", version="test", capacity=2, running=running))
    assert agent.close_code() == 4003
    # As many as the capacity is fine (these jobs are unknown: the server says to drop them).
    agent, welcome = say_hello(server, created["token"], capacity=3, running=running)
    assert [r.keep for r in welcome.resume] == [False, False, False]
    agent.send(m.Heartbeat(running=running))
    agent.send(m.Heartbeat(running=running + [m.RunningJob(job_id="job_3", attempt=1)]))
    assert agent.close_code() == 4003


def test_an_oversized_log_chunk_is_refused_and_the_job_subscribers_stay(server: ServerProcess) -> None:
    created = server.create_agent("raw", capacity=1)
    agent, _ = say_hello(server, created["token"], capacity=1)
    job = server.submit(image="none", command=["true"])
    subscriber = Subscriber(server.ws_url, server.admin_key, f"job:{job['id']}")
    try:
        assert agent.recv_until(m.JobAssign, timeout=20).job_id == job["id"]
        agent.send(m.JobAccept(job_id=job["id"], attempt=1))
        agent.send(m.LogChunk(job_id=job["id"], attempt=1, seq=0, stream="stdout", data=b"x" * (65 * 1024), ts=0.0))
        refused = agent.recv_until(m.Error)
        assert (refused.code, refused.job_id, refused.attempt) == ("too-big", job["id"], 1)
        agent.send(m.LogChunk(job_id=job["id"], attempt=1, seq=0, stream="stdout", data=b"after\n", ts=0.0))
        assert agent.recv_until(m.LogAck).seq == 0  # nothing was stored for the refused chunk
        subscriber.wait_for(lambda s: any(e["text"] == "after\n" for e in s.logs()), 20, "the later chunk")
        assert subscriber.close_code is None and [e["text"] for e in subscriber.logs()] == ["after\n"]
        assert server.api("GET", f"/api/v1/jobs/{job['id']}/logs?format=text") == "after\n"
    finally:
        subscriber.close()
        agent.close()


def test_agent_supplied_strings_are_clipped_in_log_lines(server: ServerProcess) -> None:
    created = server.create_agent("raw")
    agent, _ = say_hello(server, created["token"], name="n" * 5000, version="v" * 5000)
    agent.send(m.Error(code="c" * 5000, message="m" * 100_000))
    agent.send(m.JobAccept(job_id="job_nope", attempt=1))
    assert agent.recv().code == "unknown-job"  # the error was handled before this
    agent.close()
    lines = [line for line in server.log_path.read_text().splitlines() if created["id"] in line]
    reported = next(line for line in lines if "agent reported an error" in line)
    assert "c" * 64 in reported and "c" * 65 not in reported and "m" * 201 not in reported
    assert all("n" * 201 not in line for line in lines)
    assert len(agent_entry(server, created["id"])["version"]) < 100


# ---- admins change the registration --------------------------------------------------------------


def test_patch_changes_labels_and_capacity_of_a_connected_agent(server: ServerProcess) -> None:
    created = server.create_agent("a1", labels=["a"], capacity=1)
    agent, _ = say_hello(server, created["token"], capacity=2)
    updated = server.api("PATCH", f"/api/v1/agents/{created['id']}", {"labels": ["b", "b2"], "capacity": 3})
    assert (updated["registered_labels"], updated["registered_capacity"]) == (["b", "b2"], 3)
    assert (updated["labels"], updated["capacity"]) == (["b", "b2"], 2)  # min(declared 2, registered 3)
    assert agent.close_code() == 1001  # told to reconnect, so its welcome carries the new grant
    agent, welcome = say_hello(server, created["token"], capacity=2)
    try:
        assert (welcome.labels, welcome.capacity) == (["b", "b2"], 2)
        job = server.submit(image="none", command=["true"], labels=["b"])
        assert agent.recv_until(m.JobAssign, timeout=20).job_id == job["id"]
        # Clearing the registered labels lets the declared ones (none here) apply.
        cleared = server.api("PATCH", f"/api/v1/agents/{created['id']}", {"labels": []})
        assert (cleared["registered_labels"], cleared["labels"], cleared["registered_capacity"]) == ([], [], 3)
    finally:
        agent.close()


@pytest.mark.parametrize("body, field", [
    ({"labels": ["has space"]}, "labels[0]"),
    ({"labels": [f"l{i}" for i in range(65)]}, "labels"),
    ({"capacity": -1}, "capacity"),
    ({"capacity": 1025}, "capacity"),
    ({"labels": None}, "labels"),
    ({"name": "renamed"}, "name"),
])
def test_patch_refuses_invalid_bodies_naming_the_field(server: ServerProcess, body: dict[str, Any], field: str) -> None:
    created = server.create_agent("a1", labels=["a"])
    with pytest.raises(HttpError) as err:
        server.api("PATCH", f"/api/v1/agents/{created['id']}", body)
    assert err.value.status == 422 and err.value.body["error"]["field"] == field
    assert agent_entry(server, created["id"])["registered_labels"] == ["a"]


def test_registration_takes_labels_by_the_job_label_rule(server: ServerProcess) -> None:
    for labels, field in (([f"l{i}" for i in range(65)], "labels"), (["ok", "not ok"], "labels[1]")):
        with pytest.raises(HttpError) as err:
            server.create_agent("a1", labels=labels)
        assert err.value.status == 422 and err.value.body["error"]["field"] == field
    assert server.create_agent("a1", labels=[f"l{i}" for i in range(64)])["labels"][0] == "l0"


def test_patch_needs_an_admin_and_an_existing_agent(server: ServerProcess) -> None:
    created = server.create_agent("a1")
    url = f"{server.url}/api/v1/agents/{created['id']}"
    with pytest.raises(HttpError) as err:
        http("PATCH", url, None, {"capacity": 1})
    assert err.value.status == 401
    user_token, _ = put_key(server, "ursula", "user")
    with pytest.raises(HttpError) as err:
        http("PATCH", url, user_token, {"capacity": 1})
    assert err.value.status == 403
    with pytest.raises(HttpError) as err:
        server.api("PATCH", "/api/v1/agents/agt_nope", {"capacity": 1})
    assert err.value.status == 404
    assert agent_entry(server, created["id"])["registered_capacity"] == 2


# ---- executors (issue 6, item 6) ------------------------------------------------------------------


def test_jobs_go_only_to_agents_of_their_executor(server: ServerProcess) -> None:
    proc = server.create_agent("proc", capacity=2)
    dock = server.create_agent("dock", capacity=2)
    process_agent, _ = say_hello(server, proc["token"], capacity=2, executor="process")
    docker_agent, _ = say_hello(server, dock["token"], capacity=2, executor="docker")
    try:
        container_job = server.submit(image="busybox", command=["true"])  # executor "docker" by default
        assert docker_agent.recv_until(m.JobAssign, timeout=20).job_id == container_job["id"]
        process_job = server.submit(image="none", command=["true"], executor="process")
        assert process_agent.recv_until(m.JobAssign, timeout=20).job_id == process_job["id"]
        assert server.job(container_job["id"])["agent_id"] == dock["id"]
        assert server.job(process_job["id"])["agent_id"] == proc["id"]
    finally:
        process_agent.close()
        docker_agent.close()


def test_a_real_agent_logs_what_it_was_not_granted_and_uses_the_granted_slots(cluster: Cluster) -> None:
    server = cluster.server()
    created = server.create_agent("p1", labels=["a"], capacity=1)
    agent, _, _ = cluster.agent(server, "p1", token=created["token"], wait=False, executor="process",
                                labels=["prod"], capacity=3)
    wait_until(lambda: Cluster.connected(server, created["id"]), 20, what="the agent to connect")
    wait_until(lambda: "did not grant the labels prod (granted: a)" in agent.log_tail(), 10, what="the label warning")
    assert "WARNING" in next(line for line in agent.log_tail().splitlines() if "granted a capacity of 1 of the 3" in line)
    jobs = [server.submit(image="none", command="sleep 1", labels=["a"]) for _ in range(2)]
    first, second = (server.wait_state(job["id"], "succeeded", timeout=30) for job in jobs)
    assert first["agent_id"] == second["agent_id"] == created["id"]
    assert second["assigned_at"] >= first["finished_at"]  # one slot: the second waited its turn
