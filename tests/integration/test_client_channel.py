"""The client channel against a real server: tickets, Origin, bad frames, slow consumers."""

from __future__ import annotations

import json
import socket

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.support.cluster import ServerProcess, wait_until
from tests.support.cluster_plugin import Cluster
from tests.support.ws import Subscriber, handshake_status


def _recv_json(ws, timeout: float = 10) -> dict:
    return json.loads(ws.recv(timeout))


def test_tickets_are_single_use_and_api_keys_work_as_bearer(server: ServerProcess) -> None:
    url = f"{server.ws_url}/ws/client"
    assert handshake_status(url) == 401
    assert handshake_status(url + "?ticket=ymt_forged") == 401
    ticket = server.api("POST", "/api/v1/ws-tickets")["ticket"]
    assert handshake_status(f"{url}?ticket={ticket}") == 101
    assert handshake_status(f"{url}?ticket={ticket}") == 401  # used up
    assert handshake_status(url, {"Authorization": f"Bearer {server.admin_key}"}) == 101
    assert handshake_status(url, {"Authorization": "Bearer ymk_wrong"}) == 401


def test_cross_site_origins_are_refused(server: ServerProcess) -> None:
    url = f"{server.ws_url}/ws/client"
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    assert handshake_status(url, {**auth, "Origin": "https://evil.example"}) == 403
    assert handshake_status(url, {**auth, "Origin": f"http://127.0.0.1:{server.port}"}) == 101


def test_allowed_origins_setting(cluster: Cluster) -> None:
    server = cluster.server(env={"YM_ALLOWED_ORIGINS": "https://app.example"})
    auth = {"Authorization": f"Bearer {server.admin_key}"}
    assert handshake_status(f"{server.ws_url}/ws/client", {**auth, "Origin": "https://app.example"}) == 101


def test_bad_requests_get_errors_and_the_socket_survives(server: ServerProcess) -> None:
    ws = connect(f"{server.ws_url}/ws/client", additional_headers={"Authorization": f"Bearer {server.admin_key}"}).__enter__()
    try:
        ws.send("{nope")
        assert _recv_json(ws)["code"] == "malformed"
        ws.send(json.dumps({"type": "dance"}))
        assert _recv_json(ws)["code"] == "unknown-type"
        ws.send(json.dumps({"type": "subscribe", "topic": "weather"}))
        assert _recv_json(ws)["code"] == "bad-topic"
        ws.send(json.dumps({"type": "subscribe", "topic": "job:job_missing", "from_offset": 0}))
        assert _recv_json(ws)["code"] == "forbidden"  # as for another user's job (tests/integration/test_isolation.py)
        ws.send(json.dumps({"type": "ping", "id": "7"}))
        assert _recv_json(ws) == {"type": "pong", "id": "7"}
        ws.send(json.dumps({"type": "subscribe", "topic": "jobs"}))
        assert _recv_json(ws) == {"type": "subscribed", "topic": "jobs"}
        job = server.submit(image="none", command=["true"], labels=["nobody"])
        event = _recv_json(ws)
        assert event["type"] == "job-state" and event["job_id"] == job["id"] and event["state"] == "queued"
        ws.send("x" * (70 * 1024))  # over the client channel's 64 KiB limit
        try:
            while True:
                ws.recv(10)
        except ConnectionClosed:
            pass
        assert ws.close_code == 1009
    finally:
        ws.close()


def test_a_slow_subscriber_is_closed_with_4008_and_slows_nobody(cluster: Cluster) -> None:
    server = cluster.server(env={"YM_VIEWER_BUFFER_BYTES": "65536"})
    cluster.agent(server, "p1", executor="process")
    # 7.5 MB of output, more than loopback's socket buffers (up to 4 MiB) can absorb.
    job = server.submit(image="none", command="sleep 1; yes \"$(head -c 3000 /dev/zero | tr '\\0' x)\" | head -n 2500")
    # The slow one: a raw socket that completes the handshake, subscribes, and never reads again.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", server.port))
    slow.sendall(
        (
            f"GET /ws/client HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {server.admin_key}\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:  # like any client, wait for the 101 before sending frames
        response += slow.recv(1)
    assert response.startswith(b"HTTP/1.1 101")
    payload = json.dumps({"type": "subscribe", "topic": f"job:{job['id']}", "from_offset": 0}).encode()
    mask = b"\x01\x02\x03\x04"
    slow.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    fast = Subscriber(server.ws_url, server.admin_key, f"job:{job['id']}", from_offset=0)
    try:
        done = server.wait_state(job["id"], "succeeded", timeout=60)
        assert done["exit_code"] == 0
        entries = server.logs(job["id"])
        fast.wait_for(lambda s: len(s.logs()) == len(entries), what="the fast subscriber to get everything")
        assert "".join(x["text"] for x in fast.logs()).count("\n") == 2500
        text = server.api("GET", "/metrics")
        wait_until(
            lambda: "yardmaster_slow_consumers_closed_total 1.0" in server.api("GET", "/metrics"), 20,
            what="the slow consumer to be closed",
        )
        assert "yardmaster_websockets_open" in text
    finally:
        fast.close()
        slow.close()


def _client_out(server: ServerProcess, kind: str) -> float:
    prefix = f'yardmaster_ws_messages_total{{channel="client",direction="out",type="{kind}"}} '
    lines = [line for line in server.api("GET", "/metrics").splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix):]) if lines else 0.0


def test_messages_out_are_counted_once_per_frame_each_subscriber_got(cluster: Cluster) -> None:
    # Live log frames are counted once per event for all subscribers together (not per socket):
    # the counter must still equal the frames the subscribers received, live and from history.
    server = cluster.server()
    cluster.agent(server, "p1", executor="process")
    job = server.submit(image="none", command="sleep 1; for i in $(seq 1 40); do echo line $i; sleep 0.02; done")
    topic = f"job:{job['id']}"
    subscribers = [Subscriber(server.ws_url, server.admin_key, topic, from_offset=None) for _ in range(3)]
    subscribers.append(Subscriber(server.ws_url, server.admin_key, topic, from_offset=0))
    try:
        server.wait_state(job["id"], "succeeded", timeout=60)
        late = Subscriber(server.ws_url, server.admin_key, topic, from_offset=0)  # all from history
        subscribers.append(late)
        for sub in subscribers:
            sub.wait_for(lambda s: "succeeded" in s.states(), what="the terminal state")
        assert "".join(x["text"] for x in late.logs()).count("\n") == 40
        frames = sum(len(sub.logs()) for sub in subscribers)
        assert frames >= len(subscribers)
        wait_until(lambda: _client_out(server, "log") == frames, 10, what=f"{frames} log frames counted")
        states = sum(len(sub.states()) for sub in subscribers)
        assert _client_out(server, "job-state") == states
        assert _client_out(server, "subscribed") == len(subscribers)
    finally:
        for sub in subscribers:
            sub.close()
