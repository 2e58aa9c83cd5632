"""Limits of the client channel against one in-process replica: the per-socket message rate
(`error rate-limited`, then 1008 for a socket that keeps going), subscriptions per socket
(`error quota-exceeded`), and open sockets per user (429 `quota-exceeded` before the upgrade,
counted in Broker slots and freed at close)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from tests.support.cluster import wait_until
from tests.support.inproc import App, in_process_app
from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.backends.keys import client_sockets_slots

URL = "ws://127.0.0.1:8080/ws/client"


@pytest.fixture
def app(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[App]:
    env = {"YM_RATE_CLIENT_MESSAGES": "3/10m", "YM_QUOTA_SUBSCRIPTIONS": "2", "YM_QUOTA_CLIENT_SOCKETS": "2"}
    with in_process_app(tmp_path / "data", {**env, **getattr(request, "param", {})}) as app:
        app.user("alice")
        app.user("bob")
        yield app


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def metric(app: App, name: str, label: str, value: str) -> float:
    text = app.client.get("/metrics").text
    match = re.search(rf'^{name}{{{label}="{value}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_over_the_message_rate_a_socket_gets_errors_and_then_1008(app: App) -> None:
    alice, _ = app.key("alice")
    with app.client.websocket_connect(URL, headers=auth(alice)) as ws:
        answers: list[dict[str, Any]] = []
        for n in range(3):
            ws.send_json({"type": "ping", "id": f"p{n}"})
            answers.append(ws.receive_json())
        assert answers == [{"type": "pong", "id": f"p{n}"} for n in range(3)]
        for n in range(3):  # refused, not handled: no pong
            ws.send_json({"type": "ping", "id": f"over{n}"})
            error = ws.receive_json()
            assert error["type"] == "error" and error["code"] == "rate-limited", error
            assert "retry in" in error["message"]
        ws.send_json({"type": "ping", "id": "still going"})
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == CloseCode.POLICY
    assert metric(app, "yardmaster_rate_limited_total", "class", "client-messages") == 4
    # Another socket has its own rate.
    with app.client.websocket_connect(URL, headers=auth(alice)) as ws:
        ws.send_json({"type": "ping", "id": "fresh"})
        assert ws.receive_json() == {"type": "pong", "id": "fresh"}


@pytest.mark.parametrize("app", [{"YM_RATE_CLIENT_MESSAGES": "0"}], indirect=True)
def test_subscriptions_per_socket_are_a_quota(app: App) -> None:
    alice, _ = app.key("alice")
    job = app.submit(alice)
    with app.client.websocket_connect(URL, headers=auth(alice)) as ws:
        ws.send_json({"type": "subscribe", "topic": "jobs"})
        assert ws.receive_json() == {"type": "subscribed", "topic": "jobs"}
        ws.send_json({"type": "subscribe", "topic": f"job:{job['id']}"})
        assert ws.receive_json()["type"] == "subscribed"
        ws.receive_json()  # the job's state
        ws.send_json({"type": "unsubscribe", "topic": "jobs"})
        assert ws.receive_json() == {"type": "unsubscribed", "topic": "jobs"}
        ws.send_json({"type": "subscribe", "topic": "jobs"})  # room again after the unsubscribe
        assert ws.receive_json() == {"type": "subscribed", "topic": "jobs"}
    with app.client.websocket_connect(URL, headers=auth(alice)) as ws:
        ws.send_json({"type": "subscribe", "topic": "jobs"})
        ws.receive_json()
        ws.send_json({"type": "subscribe", "topic": f"job:{job['id']}"})
        ws.receive_json()
        ws.receive_json()
        ws.send_json({"type": "subscribe", "topic": "job:another"})
        error = ws.receive_json()
        assert error["type"] == "error" and error["code"] == "quota-exceeded"
        assert "subscriptions_per_socket" in error["message"]
    assert metric(app, "yardmaster_quota_exceeded_total", "quota", "subscriptions_per_socket") == 1


def test_open_sockets_per_user_are_a_quota_freed_at_close(app: App) -> None:
    alice, _ = app.key("alice")
    bob, _ = app.key("bob")
    slots = client_sockets_slots("alice")
    with app.client.websocket_connect(URL, headers=auth(alice)), app.client.websocket_connect(URL, headers=auth(alice)):
        assert app.run(app.rt.broker.count_slots, slots) == 2
        with pytest.raises(WebSocketDenialResponse) as refused:
            with app.client.websocket_connect(URL, headers=auth(alice)):
                pass
        resp = refused.value
        assert resp.status_code == 429 and int(resp.headers["Retry-After"]) >= 1
        error = resp.json()["error"]
        assert error["code"] == "quota-exceeded" and error["quota"] == "client_sockets" and error["limit"] == 2
        with app.client.websocket_connect(URL, headers=auth(bob)) as ws:  # another user
            ws.send_json({"type": "ping", "id": "b"})
            assert ws.receive_json()["type"] == "pong"
    wait_until(lambda: app.run(app.rt.broker.count_slots, slots) == 0, 10, 0.05, "the slots to be released")
    with app.client.websocket_connect(URL, headers=auth(alice)) as ws:
        ws.send_json({"type": "ping", "id": "a"})
        assert ws.receive_json()["type"] == "pong"
    assert metric(app, "yardmaster_quota_exceeded_total", "quota", "client_sockets") == 1
