"""WebSocket peers for tests: a client-channel subscriber and a hand-driven agent."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from yardmaster.protocol import messages as m
from yardmaster.protocol.codec import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, agent_client_codec


def handshake_status(url: str, headers: dict[str, str] | None = None, subprotocols: list[str] | None = None) -> int:
    """The HTTP status a WebSocket handshake is refused with (101 if it was accepted)."""
    try:
        with connect(url, additional_headers=headers or {}, subprotocols=subprotocols, open_timeout=10):  # type: ignore[arg-type]
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


class Subscriber:
    """Reads the client channel in a thread and records every message."""

    def __init__(self, ws_url: str, key: str, topic: str, from_offset: int | None = 0) -> None:
        self.ws: ClientConnection = connect(
            f"{ws_url}/ws/client", additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=10,
            max_size=16 << 20,
        ).__enter__()
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self._lock = threading.Lock()
        sub: dict[str, Any] = {"type": "subscribe", "topic": topic}
        if from_offset is not None:
            sub["from_offset"] = from_offset
        self.ws.send(json.dumps(sub))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for frame in self.ws:
                with self._lock:
                    self.messages.append(json.loads(frame))
        except ConnectionClosed:
            pass
        self.close_code = self.ws.close_code

    def logs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [msg for msg in self.messages if msg["type"] == "log"]

    def states(self) -> list[str]:
        with self._lock:
            return [msg["state"] for msg in self.messages if msg["type"] == "job-state"]

    def wait_for(self, predicate: Any, timeout: float = 30, what: str = "message") -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"subscriber: timed out waiting for {what}; got {self.messages[-5:]}")
            time.sleep(0.05)

    def close(self) -> None:
        self.ws.close()
        self._thread.join(5)


class RawAgent:
    """An agent driven message by message, to test what the server accepts and refuses."""

    def __init__(self, ws_url: str, token: str, binary: bool = True, hello: bool = True) -> None:
        self.subprotocol = SUBPROTOCOL_MSGPACK if binary else SUBPROTOCOL_JSON
        self.codec = agent_client_codec(self.subprotocol)
        self.ws = connect(
            f"{ws_url}/ws/agent",
            additional_headers={"Authorization": f"Bearer {token}"},
            subprotocols=[self.subprotocol],  # type: ignore[list-item]
            open_timeout=10,
            max_size=4 << 20,
        ).__enter__()
        self.welcome: m.Welcome | None = None
        if hello:
            self.send(m.Hello(name="raw", version="test", capacity=0))
            welcome = self.recv()
            assert isinstance(welcome, m.Welcome), welcome
            self.welcome = welcome

    def send(self, msg: m.AgentToServer) -> None:
        self.ws.send(self.codec.encode(msg))

    def send_raw(self, frame: str | bytes) -> None:
        self.ws.send(frame)

    def recv(self, timeout: float = 10) -> m.ServerToAgent:
        return self.codec.decode(self.ws.recv(timeout))

    def recv_until(self, kind: type, timeout: float = 10) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.1, deadline - time.monotonic()))
            if isinstance(msg, kind):
                return msg

    def close_code(self, timeout: float = 10) -> int | None:
        """Wait for the server to close the socket; return its close code."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.ws.recv(max(0.1, deadline - time.monotonic()))
        except ConnectionClosed:
            pass
        except TimeoutError:
            return None
        return self.ws.close_code

    def close(self) -> None:
        self.ws.close()
