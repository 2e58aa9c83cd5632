"""The agent channel against a real server process: authentication, protocol errors, supersede,
revocation, and reconnecting within the lease (through a proxy whose connections we cut)."""

from __future__ import annotations

import json

from yardmaster.protocol import messages as m
from yardmaster.protocol.codec import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK
from tests.support.cluster import ServerProcess, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.tcp_proxy import TcpProxy
from tests.support.ws import RawAgent, handshake_status

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
        agent.send(m.Hello(name="raw", version="test", capacity=1))
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
