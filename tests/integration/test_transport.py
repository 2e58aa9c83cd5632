"""Transport hardening against real server processes and real sockets: file modes, connection
limits and timeouts, refused-handshake logging, Host and Origin checks, proxies, and TLS."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.support.cluster import REPO, AgentProcess, HttpError, ServerProcess, http, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.redis_server import RedisServer
from tests.support.tls import TlsFiles, make_tls_files
from tests.support.ws import handshake_status

UPGRADE = (
    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


# ---- raw HTTP over a socket: full control of Host and of how much of a request is sent -------------


def _read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _exchange(port: int, request: str) -> tuple[int, dict[str, str]]:
    """Send one whole request; (status, lower-cased response headers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        head = _read_head(sock).split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
    return int(head[0].split()[1]), {k.lower(): v for k, v in headers.items()}


def _get(port: int, path: str = "/healthz", host: str | None = None, extra: str = "") -> tuple[int, dict[str, str]]:
    return _exchange(port, f"GET {path} HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\n{extra}Connection: close\r\n\r\n")


def _upgrade(port: int, path: str, host: str, extra: str = "") -> int:
    return _exchange(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{UPGRADE}{extra}\r\n")[0]


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the socket (waits up to the socket's timeout)."""
    try:
        while True:
            if not sock.recv(4096):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _log_entries(server: ServerProcess, skip: int = 0) -> list[dict[str, Any]]:
    entries = []
    for line in server.log_path.read_text(errors="replace").splitlines()[skip:]:
        try:
            entries.append(json.loads(line))
        except ValueError:
            entries.append({"level": "raw", "msg": line})
    return entries


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- 5: state on disk is private ------------------------------------------------------------------


def _start_with_umask(server: ServerProcess, umask: int) -> ServerProcess:
    previous = os.umask(umask)  # the child inherits it: what a default shell would give the server
    try:
        server.start(wait=False)
    finally:
        os.umask(previous)
    return server.wait_ready()


def test_data_dir_is_0700_and_every_database_file_0600(cluster: Cluster) -> None:
    data = cluster.root / "data-private"
    data.mkdir(mode=0o755)
    data.chmod(0o755)  # an existing, world-readable directory is made private too
    server = ServerProcess(data)
    cluster.servers.append(server)
    _start_with_umask(server, 0o022)
    job = server.submit(image="x", command=["true"], labels=["nobody"], env={"SECRET_TOKEN": "in-the-wal"})
    assert job["state"] == "queued"
    files = {p.name: p for p in data.glob("yardmaster.db*")}
    # SQLite creates -wal and -shm lazily: they exist now, after a write.
    assert {"yardmaster.db", "yardmaster.db-wal", "yardmaster.db-shm"} <= set(files), sorted(files)
    assert _mode(data) == 0o700
    assert {name: _mode(p) for name, p in files.items()} == {name: 0o600 for name in files}
    assert _mode(data / "admin-key") == 0o600

    # Files a previous version left readable are fixed at the next start.
    server.stop()
    data.chmod(0o755)
    (data / "yardmaster.db").chmod(0o644)
    _start_with_umask(server, 0o022)
    server.submit(image="x", command=["true"], labels=["nobody"])
    assert _mode(data) == 0o700
    assert {p.name: _mode(p) for p in data.glob("yardmaster.db*")} == {p.name: 0o600 for p in data.glob("yardmaster.db*")}


# ---- 7: connections are bounded -------------------------------------------------------------------


def test_half_sent_request_heads_are_dropped_within_the_handshake_timeout(cluster: Cluster) -> None:
    server = cluster.server(env={"YM_HANDSHAKE_TIMEOUT_S": "1"})
    partial = [
        b"GET /healthz HT",  # half a request line
        b"GET /ws/agent HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n",  # half an upgrade head
        b"",  # nothing at all
    ]
    sockets = []
    for i in range(50):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(partial[i % len(partial)])
        sockets.append(sock)
    try:
        assert _get(server.port)[0] == 200  # a whole request is served meanwhile
        still_open = [i for i, sock in enumerate(sockets) if not _closed_by_server(sock)]
        assert still_open == []
    finally:
        for sock in sockets:
            sock.close()

    # On a kept-alive connection the next request head has the same deadline.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        assert _read_head(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /heal")
        assert _closed_by_server(sock)


def test_the_head_timeout_does_not_touch_established_websockets(cluster: Cluster) -> None:
    server = cluster.server(env={"YM_HANDSHAKE_TIMEOUT_S": "1"})
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    with connect(f"{server.ws_url}/ws/client", additional_headers=auth, open_timeout=10) as ws:
        time.sleep(2.5)  # well past the head timeout
        ws.send(json.dumps({"type": "subscribe", "topic": "jobs"}))
        assert json.loads(ws.recv(10))["type"] == "subscribed"


def test_connections_beyond_limit_concurrency_get_503_for_http_and_websocket(cluster: Cluster) -> None:
    server = cluster.server(env={"YM_LIMIT_CONCURRENCY": "4", "YM_HANDSHAKE_TIMEOUT_S": "60"})
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
    try:
        wait_until(lambda: _get(server.port)[0] == 503, 10, 0.1, "a request beyond the limit to get 503")
        assert handshake_status(f"{server.ws_url}/ws/client", auth) == 503
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: _get(server.port)[0] == 200, 10, 0.1, "the server to take requests again")
    assert handshake_status(f"{server.ws_url}/ws/client", auth) == 101


def test_refused_handshakes_log_one_info_line_each_and_no_error(server: ServerProcess) -> None:
    skip = len(_log_entries(server))
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    for _ in range(100):
        assert handshake_status(f"{server.ws_url}/ws/agent", {"Authorization": "Bearer yma_" + "x" * 32}) == 401
        assert handshake_status(f"{server.ws_url}/ws/client", {**auth, "Origin": "https://evil.example"}) == 403
    entries = _log_entries(server, skip)
    handshakes = [e for e in entries if "/ws/" in e["msg"]]
    assert len(handshakes) == 200, entries[:6]
    assert len(entries) - len(handshakes) <= 3, [e for e in entries if e not in handshakes][:6]
    assert {e["level"] for e in entries} <= {"debug", "info"}, [e for e in entries if e["level"] not in ("debug", "info")][:3]
    assert not any("exc" in e or "Traceback" in e["msg"] for e in entries)


# ---- 8: Hosts and Origins, /readyz -----------------------------------------------------------------


def test_foreign_host_headers_are_refused_for_http_and_websocket(server: ServerProcess) -> None:
    port = server.port
    auth = f"Authorization: Bearer {server.admin_key}\r\n"
    assert _get(port, host="rebound.evil.example")[0] == 400
    assert _get(port, host=f"rebound.evil.example:{port}")[0] == 400
    assert _get(port, host=f"localhost:{port}")[0] == 200
    assert _get(port, host=f"127.0.0.1:{port}")[0] == 200
    assert _get(port, host=f"[::1]:{port}")[0] == 200
    assert _upgrade(port, "/ws/client", f"rebound.evil.example:{port}", auth) == 400
    assert _upgrade(port, "/ws/agent", f"rebound.evil.example:{port}") == 400
    assert _upgrade(port, "/ws/client", f"127.0.0.1:{port}", auth) == 101


def test_trusted_hosts_setting_is_the_whole_list(cluster: Cluster) -> None:
    server = cluster.server(env={"YM_TRUSTED_HOSTS": "app.example,127.0.0.1"})
    assert _get(server.port, host="app.example")[0] == 200
    assert _get(server.port, host=f"127.0.0.1:{server.port}")[0] == 200
    assert _get(server.port, host=f"localhost:{server.port}")[0] == 400


def test_origin_must_match_scheme_host_and_port(server: ServerProcess) -> None:
    url = f"{server.ws_url}/ws/client"
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    assert handshake_status(url, {**auth, "Origin": f"https://127.0.0.1:{server.port}"}) == 403  # plain-http server
    assert handshake_status(url, {**auth, "Origin": f"http://127.0.0.1:{server.port + 1}"}) == 403
    assert handshake_status(url, {**auth, "Origin": "http://127.0.0.1"}) == 403
    assert handshake_status(url, {**auth, "Origin": f"http://127.0.0.1:{server.port}"}) == 101


def test_readyz_names_the_failing_component_but_not_the_cause(cluster: Cluster, own_redis_server: RedisServer) -> None:
    server = cluster.server(env={"YM_REDIS_URL": own_redis_server.url})
    own_redis_server.stop()
    refused: list[HttpError] = []

    def unready() -> bool:
        try:
            http("GET", server.url + "/readyz")
        except HttpError as exc:
            refused.append(exc)
            return True
        return False

    wait_until(unready, 15, 0.2, "/readyz to fail")
    assert refused[-1].status == 503
    assert refused[-1].body["status"] == "unavailable"
    assert refused[-1].body["failing"] in ({"broker (redis)": "unavailable"}, {"broker (redis)": "timed out"})
    # The cause is in the server's log, for the operator.
    assert any("readiness probe: broker unavailable" in e["msg"] for e in _log_entries(server)) or \
        refused[-1].body["failing"]["broker (redis)"] == "timed out"


# ---- 9: proxies and TLS ------------------------------------------------------------------------------


def test_forwarded_headers_are_believed_from_trusted_proxies_only(cluster: Cluster) -> None:
    forwarded = "X-Forwarded-Proto: https\r\nX-Forwarded-For: 203.0.113.7\r\n"
    direct = cluster.server("direct")
    proxied = cluster.server("proxied", env={"YM_TRUSTED_PROXIES": "127.0.0.1"})
    status, headers = _get(direct.port, extra=forwarded)
    assert status == 200 and "strict-transport-security" not in headers  # the header was not believed
    status, headers = _get(proxied.port, extra=forwarded)
    assert status == 200 and headers["strict-transport-security"] == "max-age=31536000"
    assert "strict-transport-security" not in _get(proxied.port)[1]  # the proxy said plain http


class TlsServerProcess(ServerProcess):
    """`yardmaster server` with YM_TLS_CERT_FILE/YM_TLS_KEY_FILE, spoken to over https://."""

    def __init__(self, data_dir: Path, tls: TlsFiles) -> None:
        super().__init__(data_dir, env={"YM_TLS_CERT_FILE": str(tls.cert_file), "YM_TLS_KEY_FILE": str(tls.key_file)})
        self.tls = tls

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(verify=ssl.create_default_context(cafile=str(self.tls.ca_file)), timeout=15)

    def wait_ready(self, timeout: float = 20) -> TlsServerProcess:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with self.client() as client:
                    client.get(self.url + "/healthz").raise_for_status()
            except httpx.HTTPError:
                return False
            return (self.data_dir / "admin-key").exists()

        wait_until(ready, timeout, what=f"TLS server on port {self.port}")
        return self

    def api(self, method: str, path: str, body: Any = None, key: str | None = None) -> Any:
        with self.client() as client:
            resp = client.request(method, self.url + path, json=body,
                                  headers={"Authorization": f"Bearer {key or self.admin_key}"})
        if resp.status_code >= 400:
            raise HttpError(resp.status_code, resp.json())
        return resp.json()


@pytest.fixture
def tls_server(cluster: Cluster) -> TlsServerProcess:
    server = TlsServerProcess(cluster.root / "data-tls", make_tls_files(cluster.root / "tls"))
    cluster.servers.append(server)
    server.start()
    return server


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("YM_CA_FILE", "YM_URL", "YM_API_KEY")}
    return subprocess.run([sys.executable, "-m", "yardmaster.server.cli", *args], cwd=REPO, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=60)


def test_agent_and_cli_work_over_tls_with_a_ca_file(cluster: Cluster, tls_server: TlsServerProcess) -> None:
    with tls_server.client() as client:
        resp = client.get(tls_server.url + "/healthz")
    assert resp.status_code == 200 and resp.headers["strict-transport-security"] == "max-age=31536000"

    created = tls_server.create_agent("tls-agent")
    agent = AgentProcess([tls_server.url], created["token"], "tls-agent", cluster.root, executor="process",
                         env={"YM_CA_FILE": str(tls_server.tls.ca_file)}).start()
    cluster.agents.append(agent)
    wait_until(lambda: Cluster.connected(tls_server, created["id"]), 20, 0.1, "the agent to connect over wss://")
    assert "wss://127.0.0.1" in agent.log_tail() and "unencrypted" not in agent.log_tail()

    # submit over https://, follow the logs over wss://
    done = _cli("submit", "--url", tls_server.url, "--api-key", tls_server.admin_key,
                "--ca-file", str(tls_server.tls.ca_file), "--image", "none", "--executor", "process", "--follow",
                "--", "echo", "over-tls")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "over-tls\n"
    assert "warning" not in done.stderr
    listed = _cli("jobs", "--url", tls_server.url, env={"YM_API_KEY": tls_server.admin_key,
                                                        "YM_CA_FILE": str(tls_server.tls.ca_file)})
    assert listed.returncode == 0 and "succeeded" in listed.stdout, listed.stderr


def test_without_the_ca_file_the_certificate_is_refused_clearly(cluster: Cluster, tls_server: TlsServerProcess) -> None:
    refused = _cli("jobs", "--url", tls_server.url, "--api-key", tls_server.admin_key)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: ") and "not trusted" in refused.stderr and "--ca-file" in refused.stderr
    assert "Traceback" not in refused.stderr and tls_server.admin_key not in refused.stderr

    missing = _cli("jobs", "--url", tls_server.url, "--api-key", tls_server.admin_key, "--ca-file", "/nonexistent/ca.pem")
    assert missing.returncode == 2 and "cannot use CA file /nonexistent/ca.pem" in missing.stderr

    created = tls_server.create_agent("untrusting")
    agent = AgentProcess([tls_server.url], created["token"], "untrusting", cluster.root, executor="process").start()
    cluster.agents.append(agent)
    wait_until(lambda: "not trusted" in agent.log_tail(), 20, 0.1, "the agent to report the certificate")
    log = agent.log_tail(200)
    assert "YM_CA_FILE" in log and "Traceback" not in log and created["token"] not in log
    assert not Cluster.connected(tls_server, created["id"])

    bad_ca = subprocess.run([sys.executable, "-m", "yardmaster.agent", "--server", tls_server.url, "--token",
                             created["token"], "--ca-file", "/nonexistent/ca.pem"], cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    assert bad_ca.returncode == 2 and "cannot use CA file /nonexistent/ca.pem" in bad_ca.stderr
