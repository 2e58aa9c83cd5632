"""An agent whose handshake is refused with 429 waits at least Retry-After before its next try
(its usual backoff would come back within half a second and be refused again): the agent's
connection loop (agent/connection.py) against a real server process with a small handshake rate."""

from __future__ import annotations

import asyncio
import re

from tests.support.cluster import http, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.ws import RawAgent
from yardmaster.agent.connection import AgentConnection, ConnectionSettings, agent_ws_url, retry_after_s
from yardmaster.agent.executors.process import ProcessExecutor
from yardmaster.agent.supervisor import AgentConfig, Supervisor


def handshakes_refused(url: str) -> float:
    match = re.search(r'^yardmaster_rate_limited_total\{class="handshake"\} (\S+)$', http("GET", f"{url}/metrics"), re.M)
    return float(match.group(1)) if match else 0.0


def test_a_refused_agent_waits_retry_after_and_is_refused_only_once(cluster: Cluster) -> None:
    server = cluster.server(env={"YM_RATE_HANDSHAKE": "1/3s"})
    created = server.create_agent("a1", capacity=1)
    RawAgent(server.ws_url, created["token"]).close()  # the agent's one handshake of this window

    async def connect_until_connected() -> None:
        supervisor = Supervisor(AgentConfig(name="a1", version="test", capacity=1), ProcessExecutor())
        conn = AgentConnection(ConnectionSettings(urls=[agent_ws_url(server.url)], token=created["token"]), supervisor)
        running = asyncio.create_task(conn.run())
        try:
            await asyncio.to_thread(wait_until, lambda: cluster.connected(server, created["id"]), 20, 0.1, "the agent to connect")
        finally:
            conn.request_stop()
            await asyncio.wait_for(running, 20)

    asyncio.run(connect_until_connected())
    assert handshakes_refused(server.url) == 1


def test_retry_after_is_read_as_seconds_and_capped() -> None:
    assert retry_after_s("3") == 3.0
    assert retry_after_s("0") == 0.0
    assert retry_after_s("86400") == 15 * 60
    assert retry_after_s("Wed, 21 Oct 2026 07:28:00 GMT") is None
    assert retry_after_s(None) is None
