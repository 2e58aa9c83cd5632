"""The `yardmaster` CLI against a real server and agent, as a user types it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cluster import REPO, ServerProcess, free_port, http, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.docker_engine import DockerEngine
from yardmaster.server.security.tokens import new_token


def yardmaster(server: ServerProcess, *args: str, key: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "YM_URL": server.url, "YM_API_KEY": key or server.admin_key}
    return subprocess.run(
        [sys.executable, "-m", "yardmaster.server.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_submit_follow_streams_output_and_exits_with_the_job_exit_code(cluster: Cluster) -> None:
    server = cluster.server()
    cluster.agent(server, "p1", executor="process")
    ok = yardmaster(server, "submit", "--image", "none", "--executor", "process", "--follow", "--", "sh", "-c", "echo out; echo err >&2")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "out\n"
    assert "err\n" in ok.stderr
    failed = yardmaster(server, "submit", "--image", "none", "--executor", "process", "--env", "CODE=9", "--follow", "--", "exit $CODE")
    assert failed.returncode == 9
    assert "failed (exit code 9)" in failed.stderr


def test_jobs_logs_cancel_and_agents_commands(cluster: Cluster) -> None:
    server = cluster.server()
    created = yardmaster(server, "agents", "create", "cli-agent", "--label", "cli")
    assert created.returncode == 0 and "shown only this once" in created.stderr
    token = next(line.split()[-1] for line in created.stdout.splitlines() if line.startswith("token:"))
    agent_id = next(line.split()[-1] for line in created.stdout.splitlines() if line.startswith("id:"))
    cluster.agent(server, "cli-agent", executor="process", token=token, wait=False, labels=["cli"])
    wait_until(lambda: Cluster.connected(server, agent_id), 20, what="the agent to connect")
    listed = yardmaster(server, "agents")
    assert "cli-agent" in listed.stdout and "connected" in listed.stdout

    job_id = yardmaster(server, "submit", "--image", "none", "--executor", "process", "--label", "cli", "--", "echo from-cli").stdout.strip()
    server.wait_state(job_id, "succeeded")
    assert yardmaster(server, "logs", job_id).stdout == "from-cli\n"
    table = yardmaster(server, "jobs", "--state", "succeeded")
    assert job_id in table.stdout and "succeeded" in table.stdout

    sleeper = yardmaster(server, "submit", "--image", "none", "--label", "nobody", "--", "sleep", "60").stdout.strip()
    cancelled = yardmaster(server, "cancel", sleeper)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    again = yardmaster(server, "cancel", sleeper)
    assert again.returncode != 0 and again.stderr.startswith("error:") and "Traceback" not in again.stderr

    drained = yardmaster(server, "agents", "drain", agent_id)
    assert drained.returncode == 0 and "draining" in drained.stdout

    revoked = yardmaster(server, "agents", "revoke", agent_id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout


def test_agents_update_changes_the_registration(cluster: Cluster) -> None:
    server = cluster.server()
    created = server.create_agent("a1", labels=["old"], capacity=2)
    updated = yardmaster(server, "agents", "update", created["id"], "--label", "new", "--label", "gpu", "--capacity", "5")
    assert updated.returncode == 0, updated.stderr
    assert "labels gpu,new, capacity 5 registered" in updated.stdout
    [agent] = server.api("GET", "/api/v1/agents")["agents"]
    assert (agent["registered_labels"], agent["registered_capacity"]) == (["gpu", "new"], 5)
    cleared = yardmaster(server, "agents", "update", created["id"], "--clear-labels")
    assert cleared.returncode == 0 and server.api("GET", "/api/v1/agents")["agents"][0]["registered_labels"] == []
    missing = yardmaster(server, "agents", "update", "agt_nope", "--capacity", "1")
    assert missing.returncode == 1 and missing.stderr.startswith("error: not found")
    nothing = yardmaster(server, "agents", "update", created["id"])
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr


def test_errors_are_one_clear_line(cluster: Cluster) -> None:
    server = cluster.server()
    bad_key = yardmaster(server, "jobs", key="ymk_notakey")
    assert bad_key.returncode != 0 and "Traceback" not in bad_key.stderr
    assert len(bad_key.stderr.strip().splitlines()) == 1 and "API key" in bad_key.stderr
    invalid = yardmaster(server, "submit", "--image", "none", "--priority", "5000", "--", "true")
    assert invalid.returncode != 0 and "priority" in invalid.stderr and "Traceback" not in invalid.stderr
    env = {**os.environ, "YM_URL": f"http://127.0.0.1:{free_port()}", "YM_API_KEY": server.admin_key}
    down = subprocess.run([sys.executable, "-m", "yardmaster.server.cli", "jobs"], cwd=REPO, env=env, capture_output=True, text=True)
    assert down.returncode != 0 and "cannot reach the server" in down.stderr and "Traceback" not in down.stderr
    bad_setting = subprocess.run(
        [sys.executable, "-m", "yardmaster.server.cli", "server"], cwd=REPO, env={**os.environ, "YM_PORT": "http"},
        capture_output=True, text=True, timeout=30,
    )
    assert bad_setting.returncode == 2 and bad_setting.stderr.strip() == "error: YM_PORT: must be a whole number"


@pytest.mark.docker
def read_until_serving(proc: subprocess.Popen[str], timeout: float) -> str:
    """What `yardmaster dev` printed up to its "serving" line (or until it exited or time ran out)."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "serving; press Ctrl-C" in line:
            break
    return "".join(lines)


def stop_dev(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_dev_runs_a_server_a_local_agent_and_a_demo_job_in_docker(tmp_path: Path, docker_engine: DockerEngine) -> None:
    port = free_port()
    env = {**os.environ, "DOCKER_HOST": docker_engine.host, "YM_DEV_IMAGE": docker_engine.image}
    proc = subprocess.Popen(
        [sys.executable, "-m", "yardmaster.server.cli", "dev", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output = read_until_serving(proc, 90)
        assert "executor: docker" in output, output
        assert f"http://127.0.0.1:{port}" in output
        assert "hello from a hardened Yardmaster container" in output
        assert "user: 65534, capabilities: 0000000000000000" in output
        assert "root fs: read-only" in output
        assert "tick 5" in output and "demo job succeeded (exit code 0)" in output
        assert (tmp_path / "data" / "admin-key").stat().st_mode & 0o777 == 0o600
    finally:
        stop_dev(proc)
    assert proc.returncode == 0
    assert not [c for c in docker_engine.containers("yardmaster.agent=local") if c.get("State") == "running"]


def test_dev_stops_on_sigterm_and_on_sigint_even_if_sigint_was_ignored(tmp_path: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        port = free_port()
        # A background job of a non-interactive shell starts with SIGINT ignored.
        proc = subprocess.Popen(
            [sys.executable, "-m", "yardmaster.server.cli", "dev", "--port", str(port), "--data-dir", str(tmp_path / f"d{sig}"),
             "--executor", "process", "--no-demo"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        try:
            read_until_serving(proc, 60)
            proc.send_signal(sig)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_dev_with_YM_ADMIN_KEY_uses_that_key_and_writes_no_key_file(tmp_path: Path) -> None:
    key, port, data_dir = new_token("api-key"), free_port(), tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "yardmaster.server.cli", "dev", "--port", str(port), "--data-dir", str(data_dir),
         "--executor", "process", "--no-demo"],
        cwd=REPO, env={**os.environ, "YM_ADMIN_KEY": key}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output = read_until_serving(proc, 60)
        assert "serving; press Ctrl-C" in output and "Traceback" not in output, output
        assert "admin API key: the one in YM_ADMIN_KEY" in output and key not in output
        assert not (data_dir / "admin-key").exists()
        # dev registered its local agent with the configured key, and the agent connected.
        url = f"http://127.0.0.1:{port}/api/v1/agents"
        wait_until(lambda: any(a["name"] == "local" and a["connected"] for a in http("GET", url, key)["agents"]), 30,
                   0.2, "the local agent to connect")
    finally:
        stop_dev(proc)
    assert proc.returncode == 0
