"""pytest fixtures: a running server, agents attached to it, and cleanup of every process."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import AgentProcess, ServerProcess, wait_until


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[ServerProcess] = []
        self.agents: list[AgentProcess] = []

    def server(self, name: str = "s", **kwargs: Any) -> ServerProcess:
        srv = ServerProcess(self.root / f"data-{name}", **kwargs)
        self.servers.append(srv)
        return srv.start()

    def replicas(self, redis_url: str, n: int = 3, name: str = "rs", env: dict[str, str] | None = None) -> list[ServerProcess]:
        """`n` scale-out replicas over one Redis, sharing one data dir (one SQLite file, one admin
        key), on distinct ports, named `<name>-0` … by YM_REPLICA_ID. The first one starts alone
        (it creates the admin key), the others together."""
        data_dir = self.root / f"data-{name}"
        made = [
            ServerProcess(data_dir, env={"YM_REDIS_URL": redis_url, "YM_REPLICA_ID": f"{name}-{i}", **(env or {})})
            for i in range(n)
        ]
        self.servers += made
        made[0].start()
        for srv in made[1:]:
            srv.start(wait=False)
        for srv in made[1:]:
            srv.wait_ready()
        return made

    def agent(self, server: ServerProcess, name: str, *, docker_host: str | None = None, urls: list[str] | None = None,
              token: str | None = None, wait: bool = True, **kwargs: Any) -> tuple[AgentProcess, str, str]:
        """Register (unless a token is given) and start an agent; returns (process, agent id, token)."""
        if token is None:
            created = server.create_agent(name, kwargs.get("labels"), kwargs.get("capacity", 2))
            token, agent_id = created["token"], created["id"]
        else:
            agent_id = ""
        env = {"DOCKER_HOST": docker_host} if docker_host else None
        proc = AgentProcess(urls or [server.url], token, name, self.root, env=env, **kwargs).start()
        self.agents.append(proc)
        if wait and agent_id:
            wait_until(lambda: self.connected(server, agent_id), 20, 0.1, f"agent {name} to connect")
        return proc, agent_id, token

    @staticmethod
    def connected(server: ServerProcess, agent_id: str) -> bool:
        return any(a["id"] == agent_id and a["connected"] for a in server.api("GET", "/api/v1/agents")["agents"])

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        for server in self.servers:
            server.stop()


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if "own_redis_server" in request.fixturenames:
        # The test's own redis-server starts first, so that it stops after the replicas using it.
        request.getfixturevalue("own_redis_server")
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for srv in c.servers:
                print(f"--- server {srv.port} log tail ---\n{srv.log_tail(80)}")
            for agent in c.agents:
                print(f"--- agent {agent.name} log tail ---\n{agent.log_tail(80)}")
        c.close()


@pytest.fixture
def server(cluster: Cluster) -> ServerProcess:
    return cluster.server()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + rep.when, rep)


AgentFactory = Callable[..., tuple[AgentProcess, str, str]]
