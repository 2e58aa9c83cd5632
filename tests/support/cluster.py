"""Real server and agent processes for integration tests, on free loopback ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.limits import RATES_OFF

REPO = Path(__file__).resolve().parents[2]

# Fast timings so lease expiry, reconnects and failover take seconds, not minutes.
FAST_SETTINGS = {
    "YM_HEARTBEAT_INTERVAL_S": "0.5",
    "YM_LEASE_S": "3",
    "YM_ASSIGN_ACK_S": "3",
    "YM_CANCEL_GRACE_S": "2",
    "YM_SCHEDULE_INTERVAL_S": "0.1",
    "YM_REAPER_INTERVAL_S": "0.2",
    "YM_LEADER_LOCK_TTL_S": "2",
    "YM_LEADER_RENEW_S": "0.5",
    "YM_TIMEOUT_SLACK_S": "5",
    "YM_LOG_LEVEL": "info",
    **RATES_OFF,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class HttpError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def http(method: str, url: str, key: str | None = None, body: Any = None, raw: bytes | None = None) -> Any:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            payload = resp.read()
            ctype = resp.headers.get("content-type", "")
            return json.loads(payload) if "json" in ctype else payload.decode()
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            parsed: Any = json.loads(payload)
        except ValueError:
            parsed = payload.decode(errors="replace")
        raise HttpError(exc.code, parsed) from None


class ChildProcess:
    """A child process whose output goes to a log file; stopped by signal, then killed."""

    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str]) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.proc = None
        return proc.returncode


class ServerProcess(ChildProcess):
    """`yardmaster server` as a child process."""

    def __init__(self, data_dir: Path, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.env = {**os.environ, **FAST_SETTINGS, **(env or {})}
        self.env.update({"YM_PORT": str(self.port), "YM_HOST": "127.0.0.1", "YM_DATA_DIR": str(data_dir)})
        self.log_path = data_dir.parent / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin-key").read_text().strip()

    def start(self, timeout: float = 20, wait: bool = True) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._spawn([sys.executable, "-m", "yardmaster.server.cli", "server"])
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20) -> ServerProcess:

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                http("GET", f"{self.url}/healthz")
                return (self.data_dir / "admin-key").exists() or "YM_ADMIN_KEY" in self.env
            except (OSError, HttpError):
                return False

        wait_until(ready, timeout, what=f"server on port {self.port}")
        return self

    # -- API shortcuts --------------------------------------------------------------------------

    def api(self, method: str, path: str, body: Any = None, key: str | None = None) -> Any:
        return http(method, self.url + path, key or self.admin_key, body)

    def create_agent(self, name: str, labels: list[str] | None = None, capacity: int = 2) -> dict[str, Any]:
        return self.api("POST", "/api/v1/agents", {"name": name, "labels": labels or [], "capacity": capacity})

    def submit(self, **spec: Any) -> dict[str, Any]:
        # Image "none" marks the tests' jobs for `--executor process` agents (which ignore the
        # image); such an agent takes only jobs that ask for the process executor.
        if spec.get("image") == "none":
            spec.setdefault("executor", "process")
        return self.api("POST", "/api/v1/jobs", spec)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.api("GET", f"/api/v1/jobs/{job_id}")

    def logs(self, job_id: str, from_offset: int = 0) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        while True:
            page = self.api("GET", f"/api/v1/jobs/{job_id}/logs?from_offset={from_offset}")
            entries += page["entries"]
            if not page["entries"]:
                return entries
            from_offset = page["next_offset"]

    def wait_state(self, job_id: str, states: str | set[str], timeout: float = 30) -> dict[str, Any]:
        wanted = {states} if isinstance(states, str) else states
        last: dict[str, Any] = {}

        def check() -> bool:
            nonlocal last
            last = self.job(job_id)
            return last["state"] in wanted

        try:
            wait_until(check, timeout, interval=0.1, what=f"job {job_id} to reach {sorted(wanted)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last: {last}\nserver log:\n{self.log_tail()}") from None
        return last


class AgentProcess(ChildProcess):
    """`python -m yardmaster.agent` as a child process."""

    def __init__(
        self,
        servers: list[str],
        token: str,
        name: str,
        log_dir: Path,
        executor: str = "docker",
        labels: list[str] | None = None,
        capacity: int = 2,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = [sys.executable, "-m", "yardmaster.agent", "--executor", executor, "--name", name, "--capacity", str(capacity)]
        for server in servers:
            self.argv += ["--server", server]
        for label in labels or []:
            self.argv += ["--label", label]
        self.env = {**os.environ, "YM_AGENT_TOKEN": token, **(env or {})}
        self.name = name
        self.log_path = log_dir / f"agent-{name}.log"

    def start(self) -> AgentProcess:
        self._spawn(self.argv)
        return self

