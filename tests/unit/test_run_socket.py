"""An unexpected exception at a socket seam is logged with its traceback and closes the socket
with 1011: `run_socket` on its own, then both channels in-process (the app served by Starlette's
test client over an embedded SQLite store), with a failure injected into a message handler."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from yardmaster.protocol import messages as m
from yardmaster.protocol.close_codes import CloseCode
from yardmaster.protocol.codec import SUBPROTOCOL_JSON, agent_client_codec
from yardmaster.server.app import build_app
from yardmaster.server.channels import agent_channel, client_channel
from yardmaster.server.channels.common import run_socket
from yardmaster.server.security import tokens
from yardmaster.server.settings import load_settings


class FakeSocket:
    """What a connection does with run_socket, without a network: records how it closed."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.outbox: asyncio.Queue[None] = asyncio.Queue()
        self.close_code: int | None = None
        self.closed_on_wire: int | None = None

    async def close(self, code: int, reason: str) -> None:
        if not self.closed.is_set():
            self.close_code = code
            self.closed.set()
            self.outbox.put_nowait(None)

    async def sender(self) -> None:
        await self.outbox.get()
        self.closed_on_wire = self.close_code

    async def finish(self) -> None:
        await self.close(CloseCode.NORMAL, "")

    async def run(self, serve: object) -> None:
        await run_socket(serve, self.sender(), self.closed, self.finish, self.close)  # type: ignore[arg-type]


async def test_an_unexpected_exception_is_logged_with_its_traceback_and_closes_with_1011(caplog: pytest.LogCaptureFixture) -> None:
    async def serve() -> None:
        await asyncio.sleep(0)
        raise KeyError("injected failure")

    sock = FakeSocket()
    with caplog.at_level(logging.ERROR, logger="yardmaster.channels"):
        await sock.run(serve())
    assert sock.closed_on_wire == CloseCode.INTERNAL_ERROR
    [record] = [r for r in caplog.records if r.name == "yardmaster.channels"]
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    assert "injected failure" in caplog.text and "Traceback" in caplog.text


async def test_the_peer_going_away_or_a_normal_close_is_no_error(caplog: pytest.LogCaptureFixture) -> None:
    async def gone() -> None:
        raise WebSocketDisconnect(1006)

    async def ends() -> None:
        return None

    for serve in (gone(), ends()):
        sock = FakeSocket()
        with caplog.at_level(logging.ERROR):
            await sock.run(serve)
        assert sock.closed_on_wire == CloseCode.NORMAL
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---- both channels, in-process ---------------------------------------------------------------------


@pytest.fixture
def app_client(tmp_path: Path) -> tuple[TestClient, str]:
    key = tokens.new_token("api-key")
    settings = load_settings({"YM_DATA_DIR": str(tmp_path / "data"), "YM_ADMIN_KEY": key})
    return TestClient(build_app(settings), base_url="http://127.0.0.1:8080"), key


def _injected(*args: object, **kwargs: object) -> None:
    raise RuntimeError("injected failure")


def test_the_client_channel_closes_with_1011_on_an_unexpected_exception(
    app_client: tuple[TestClient, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client, key = app_client
    monkeypatch.setattr(client_channel.ClientConnection, "_subscribe", _injected)
    with client, client.websocket_connect("ws://127.0.0.1:8080/ws/client", headers={"Authorization": f"Bearer {key}"}) as ws:
        ws.send_json({"type": "subscribe", "topic": "jobs"})
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == CloseCode.INTERNAL_ERROR
    assert "RuntimeError: injected failure" in caplog.text


def test_the_agent_channel_closes_with_1011_on_an_unexpected_exception(
    app_client: tuple[TestClient, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client, key = app_client
    codec = agent_client_codec(SUBPROTOCOL_JSON)
    monkeypatch.setattr(agent_channel.AgentConnection, "_dispatch", _injected)
    with client:
        created = client.post("/api/v1/agents", json={"name": "a1"}, headers={"Authorization": f"Bearer {key}"}).json()
        headers = {"Authorization": f"Bearer {created['token']}"}
        with client.websocket_connect("ws://127.0.0.1:8080/ws/agent", headers=headers, subprotocols=[SUBPROTOCOL_JSON]) as ws:
            ws.send_text(codec.encode(m.Hello(name="a1", version="test")))  # type: ignore[arg-type]
            assert isinstance(codec.decode(ws.receive_text()), m.Welcome)
            ws.send_text(codec.encode(m.Heartbeat()))  # type: ignore[arg-type]
            with pytest.raises(WebSocketDisconnect) as closed:
                while True:
                    ws.receive_text()
    assert closed.value.code == CloseCode.INTERNAL_ERROR
    assert "RuntimeError: injected failure" in caplog.text
