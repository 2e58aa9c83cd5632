"""Draining an agent: it finishes what it runs, takes nothing new, disconnects; a restart takes jobs again."""

from __future__ import annotations

import time

import pytest

from tests.support.cluster import AgentProcess, HttpError, wait_until
from tests.support.cluster_plugin import Cluster


def test_drain_finishes_running_jobs_then_the_agent_leaves(cluster: Cluster) -> None:
    server = cluster.server()
    agent, agent_id, token = cluster.agent(server, "p1", executor="process", capacity=2)
    running = server.submit(image="none", command="sleep 2; echo finished")
    server.wait_state(running["id"], "running")

    drained = server.api("POST", f"/api/v1/agents/{agent_id}/drain")
    assert drained["draining_since"] is not None and drained["connected"] is True
    waiting = server.submit(image="none", command="echo later")

    assert agent.proc is not None
    assert agent.proc.wait(30) == 0  # left by itself, cleanly, once its job was delivered
    done = server.job(running["id"])
    assert done["state"] == "succeeded" and done["runs"] == 1
    assert server.api("GET", f"/api/v1/jobs/{running['id']}/logs?format=text") == "finished\n"
    time.sleep(1)  # several scheduling passes
    assert server.job(waiting["id"])["state"] == "queued"  # never handed to the draining agent

    restarted = AgentProcess([server.url], token, "p1", cluster.root, executor="process").start()
    cluster.agents.append(restarted)
    wait_until(lambda: Cluster.connected(server, agent_id), 20, what="the restarted agent")
    assert server.wait_state(waiting["id"], "succeeded")["agent_id"] == agent_id
    listed = {a["id"]: a for a in server.api("GET", "/api/v1/agents")["agents"]}
    assert listed[agent_id]["draining_since"] is None


def test_drain_of_an_unknown_agent_is_404(cluster: Cluster) -> None:
    server = cluster.server()
    with pytest.raises(HttpError) as err:
        server.api("POST", "/api/v1/agents/agt_nope/drain")
    assert err.value.status == 404
