"""The client channel's fan-out without a network: sends started eagerly (`start_eagerly`), the
TopicHub's once-per-event decoding and counting, and, in-process (the app served by Starlette's
test client over an embedded SQLite store), a socket that stops reading (4008 after what it
held, in order), history paced by a stalled socket (no 4008), a socket whose send fails while
the others go on, and the endpoint served without RequestContextMiddleware's hand-off."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.app import build_app
from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.backends.records import LogEntry
from yardmaster.server.channels.client_channel import ClientConnection, client_endpoint
from yardmaster.server.channels.common import start_eagerly
from yardmaster.server.core.events import EventHeader, TopicHub
from yardmaster.server.security import tokens
from yardmaster.server.settings import load_settings

# ---- start_eagerly ---------------------------------------------------------------------------------


async def test_a_send_that_need_not_wait_is_done_before_start_eagerly_returns() -> None:
    sent: list[str] = []

    async def send() -> None:
        sent.append("frame")

    assert start_eagerly(send()) is None
    assert sent == ["frame"]


async def test_a_send_that_has_to_wait_is_finished_by_awaiting_the_rest() -> None:
    writable = asyncio.Event()
    steps: list[str] = []

    async def send() -> None:
        steps.append("started")
        await writable.wait()
        steps.append("written")

    rest = start_eagerly(send())
    assert rest is not None and steps == ["started"]
    task = asyncio.create_task(_await(rest))
    await asyncio.sleep(0.01)
    assert steps == ["started"]  # still waiting for the socket
    writable.set()
    await asyncio.wait_for(task, 5)
    assert steps == ["started", "written"]


async def test_cancelling_the_rest_cancels_the_send_itself() -> None:
    seen: list[str] = []

    async def send() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    rest = start_eagerly(send())
    assert rest is not None
    task = asyncio.create_task(_await(rest))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]


async def test_errors_of_the_send_reach_the_caller_before_and_after_waiting() -> None:
    async def fails_at_once() -> None:
        raise ConnectionResetError("gone")

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("later")

    with pytest.raises(ConnectionResetError):
        start_eagerly(fails_at_once())
    rest = start_eagerly(fails_later())
    assert rest is not None
    with pytest.raises(KeyError):
        await rest


async def _await(rest: Any) -> None:
    await rest


# ---- TopicHub ---------------------------------------------------------------------------------------


async def test_the_hub_decodes_each_event_once_counts_it_once_and_survives_a_failing_listener(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = MemoryBroker()
    counted: list[tuple[str, int]] = []
    hub = TopicHub(broker, lambda kind, n: counted.append((kind, n)))
    got: list[tuple[str, int | None, str]] = []
    texts: list[str] = []

    def fails(header: EventHeader, text: str) -> int:
        raise RuntimeError("one socket broke")

    def make(n: int) -> Any:
        def listener(header: EventHeader, text: str) -> int:
            got.append((header.type, header.offset, text))
            texts.append(text)
            return n
        return listener

    listeners = [make(1), fails, make(1), make(0)]  # the last one already had this entry
    for listener in listeners:
        await hub.add("job:j1", listener)
    event = b'{"type":"log","job_id":"j1","offset":7,"text":"hello"}'
    with caplog.at_level(logging.ERROR, logger="yardmaster.events"):
        await broker.publish("job:j1", event)
        await _until(lambda: len(got) == 3)
    assert got == [("log", 7, event.decode())] * 3
    assert all(t is texts[0] for t in texts)  # decoded once, the same text for every listener
    assert counted == [("log", 2)]
    assert "one socket broke" in caplog.text
    for listener in listeners:
        await hub.remove("job:j1", listener)
    await hub.close()


async def _until(predicate: Any) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 5 s")


# ---- in-process: a socket whose send fails, and serving without the hand-off -----------------------------


class FailingSends:
    """Outermost ASGI layer: a socket opened with `x-fail-sends` gets a send that raises for every
    frame after the handshake (a close frame still goes out, so the test can read its code)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or (b"x-fail-sends", b"1") not in scope["headers"]:
            await self.app(scope, receive, send)
            return

        async def failing(message: Message) -> None:
            if message["type"] == "websocket.send":
                raise RuntimeError("injected send failure")
            await send(message)

        await self.app(scope, receive, failing)


@pytest.fixture
def settings(tmp_path: Path) -> tuple[Any, str]:
    key = tokens.new_token("api-key")
    return load_settings({"YM_DATA_DIR": str(tmp_path / "data"), "YM_ADMIN_KEY": key}), key


def test_a_socket_whose_send_fails_is_closed_with_1011_and_the_others_go_on(
    settings: tuple[Any, str], caplog: pytest.LogCaptureFixture
) -> None:
    config, key = settings
    client = TestClient(FailingSends(build_app(config)), base_url="http://127.0.0.1:8080")
    auth = {"Authorization": f"Bearer {key}"}
    url = "ws://127.0.0.1:8080/ws/client"
    with client, client.websocket_connect(url, headers=auth) as good, \
            client.websocket_connect(url, headers={**auth, "x-fail-sends": "1"}) as bad:
        good.send_json({"type": "subscribe", "topic": "jobs"})
        assert good.receive_json() == {"type": "subscribed", "topic": "jobs"}
        bad.send_json({"type": "subscribe", "topic": "jobs"})  # its `subscribed` already fails
        with pytest.raises(WebSocketDisconnect) as closed:
            bad.receive_json()
        assert closed.value.code == CloseCode.INTERNAL_ERROR
        job = client.post("/api/v1/jobs", json={"image": "none", "command": ["true"], "labels": ["nobody"]},
                          headers=auth).json()
        event = good.receive_json()
        assert event["type"] == "job-state" and event["job_id"] == job["id"]
    assert "RuntimeError: injected send failure" in caplog.text


def test_the_client_endpoint_also_serves_without_the_hand_off(settings: tuple[Any, str]) -> None:
    config, key = settings
    full = build_app(config)
    # Only the route: no RequestContextMiddleware to hand the open socket to.
    bare = Starlette(routes=[WebSocketRoute("/ws/client", client_endpoint)], lifespan=full.router.lifespan_context)
    bare.state.runtime = full.state.runtime
    client = TestClient(bare, base_url="http://127.0.0.1:8080")
    with client, client.websocket_connect("ws://127.0.0.1:8080/ws/client", headers={"Authorization": f"Bearer {key}"}) as ws:
        ws.send_json({"type": "ping", "id": "1"})
        assert ws.receive_json() == {"type": "pong", "id": "1"}
        ws.send_json({"type": "subscribe", "topic": "jobs"})
        assert ws.receive_json() == {"type": "subscribed", "topic": "jobs"}


class GatedSends:
    """Outermost ASGI layer: a socket opened with `x-gated` sends only while `gate` is set, as if
    its peer stopped reading (the transport over its high-water mark) until the test opens it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or (b"x-gated", b"1") not in scope["headers"]:
            await self.app(scope, receive, send)
            return

        async def gated(message: Message) -> None:
            await self.gate.wait()
            await send(message)

        await self.app(scope, receive, gated)


def test_a_socket_that_stops_reading_gets_what_was_queued_in_order_then_4008(tmp_path: Path) -> None:
    key = tokens.new_token("api-key")
    config = load_settings({"YM_DATA_DIR": str(tmp_path / "data"), "YM_ADMIN_KEY": key, "YM_VIEWER_BUFFER_BYTES": "65536"})
    app = GatedSends(build_app(config))
    rt = app.app.state.runtime  # type: ignore[attr-defined]
    client = TestClient(app, base_url="http://127.0.0.1:8080")
    auth = {"Authorization": f"Bearer {key}"}
    url = "ws://127.0.0.1:8080/ws/client"
    with client:
        job = client.post("/api/v1/jobs", json={"image": "none", "command": ["true"], "labels": ["nobody"]},
                          headers=auth).json()
        topic = f"job:{job['id']}"
        with client.websocket_connect(url, headers=auth) as fast, \
                client.websocket_connect(url, headers={**auth, "x-gated": "1"}) as slow:
            for ws in (fast, slow):
                ws.send_json({"type": "subscribe", "topic": topic})
                assert ws.receive_json()["type"] == "subscribed"
                assert ws.receive_json()["type"] == "job-state"
            assert client.portal is not None
            client.portal.call(app.gate.clear)
            for offset in range(100):  # 100 KB, more than the slow socket may hold (64 KiB)
                entry = LogEntry(job_id=job["id"], offset=offset, attempt=1, seq=offset + 1, stream="stdout",
                                 data=b"x" * 999 + b"\n", ts=0.0)
                client.portal.call(rt.events.log_entry, entry)
            client.portal.call(app.gate.set)
            assert [fast.receive_json()["offset"] for _ in range(100)] == list(range(100))
            got: list[int] = []
            with pytest.raises(WebSocketDisconnect) as closed:
                while True:
                    got.append(slow.receive_json()["offset"])
            assert closed.value.code == CloseCode.TOO_SLOW
            assert 0 < len(got) < 100 and got == list(range(len(got)))  # what it held, in order, then 4008
        assert "yardmaster_slow_consumers_closed_total 1.0" in client.get("/metrics", headers=auth).text


def test_history_waits_for_a_stalled_socket_instead_of_tripping_4008(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tokens.new_token("api-key")
    config = load_settings({"YM_DATA_DIR": str(tmp_path / "data"), "YM_ADMIN_KEY": key, "YM_VIEWER_BUFFER_BYTES": "65536"})
    app = GatedSends(build_app(config))
    rt = app.app.state.runtime  # type: ignore[attr-defined]
    waited = threading.Event()
    room_for_history = ClientConnection._room_for_history

    async def recording(self: ClientConnection) -> None:
        if self._buffered > self._limit // 2:
            waited.set()  # history has to wait for the socket here
        await room_for_history(self)

    monkeypatch.setattr(ClientConnection, "_room_for_history", recording)
    client = TestClient(app, base_url="http://127.0.0.1:8080")
    auth = {"Authorization": f"Bearer {key}"}
    with client:
        job = client.post("/api/v1/jobs", json={"image": "none", "command": ["true"], "labels": ["nobody"]},
                          headers=auth).json()
        assert client.portal is not None
        for seq in range(200):  # 200 KB stored, three times what the socket may hold
            client.portal.call(rt.store.append_log, job["id"], 1, seq, "stdout", b"y" * 999 + b"\n", 0.0)
        with client.websocket_connect("ws://127.0.0.1:8080/ws/client", headers={**auth, "x-gated": "1"}) as ws:
            client.portal.call(app.gate.clear)
            ws.send_json({"type": "subscribe", "topic": f"job:{job['id']}", "from_offset": 0})
            assert waited.wait(10)
            client.portal.call(app.gate.set)
            assert ws.receive_json()["type"] == "subscribed"
            assert [ws.receive_json()["offset"] for _ in range(200)] == list(range(200))
            assert ws.receive_json()["type"] == "job-state"  # still open: no 4008
        assert "yardmaster_slow_consumers_closed_total 0.0" in client.get("/metrics", headers=auth).text
