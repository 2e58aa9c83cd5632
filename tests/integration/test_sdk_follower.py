"""The Python client's follower against a WebSocket peer on loopback that closes in each way
the protocol defines: a final close is reported, not retried; a restart close is resumed."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from websockets.sync.server import Server, ServerConnection, serve

from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.sdk import RequestRefused, YardmasterClient


@pytest.fixture
def closing_peer() -> Iterator[tuple[str, list[int], list[str]]]:
    """A /ws/client peer that closes every connection with the next code of `codes`."""
    codes: list[int] = []
    seen: list[str] = []

    def handler(ws: ServerConnection) -> None:
        seen.append(ws.recv(timeout=5))  # the subscribe
        ws.close(codes.pop(0) if codes else CloseCode.REVOKED, "closed by the test")

    server: Server = serve(handler, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.socket.getsockname()[1]}", codes, seen
    finally:
        server.shutdown()
        thread.join(5)


@pytest.mark.parametrize(("code", "wire"), [(CloseCode.REVOKED, "revoked"), (CloseCode.PROTOCOL_ERROR, "protocol-error")])
def test_a_final_close_is_reported_once_not_retried(closing_peer: tuple[str, list[int], list[str]], code: int, wire: str) -> None:
    url, codes, seen = closing_peer
    codes.append(code)
    with YardmasterClient(url, "ymk_test") as client, pytest.raises(RequestRefused) as info:
        client.follow_logs("job_x")
    assert info.value.code == wire
    assert len(seen) == 1  # no reconnect


def test_a_restart_close_is_resumed_from_the_next_offset(closing_peer: tuple[str, list[int], list[str]]) -> None:
    url, codes, seen = closing_peer
    codes += [CloseCode.RESTARTING, CloseCode.REVOKED]
    with YardmasterClient(url, "ymk_test") as client, pytest.raises(RequestRefused):
        client.follow_logs("job_x", from_offset=7)
    assert len(seen) == 2  # reconnected once after 1012, then stopped at 4001
    assert all('"from_offset":7' in frame for frame in seen)
