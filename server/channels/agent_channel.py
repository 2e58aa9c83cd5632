"""The agent channel `/ws/agent`: translates between the wire and the core (JobService, AgentHub)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from yardmaster.protocol import messages as m
from yardmaster.protocol.codec import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK, Codec, DecodeError, agent_server_codec
from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.backends.base import BackendUnavailable
from yardmaster.server.backends.records import AgentRecord
from yardmaster.server.channels.common import deny, run_socket
from yardmaster.server.core.ids import new_id
from yardmaster.server.runtime import Runtime
from yardmaster.server.security import tokens
from yardmaster.server.security.principals import bearer_token

log = logging.getLogger("yardmaster.channels.agent")

HELLO_TIMEOUT_S = 10.0
OUTBOX_LIMIT = 1000
MAX_ERRORS = 20  # a peer that keeps sending garbage is broken: close it


async def authenticate_agent(rt: Runtime, websocket: WebSocket) -> AgentRecord | None:
    """The agent record for the handshake's bearer token, or None after refusing the handshake."""
    if websocket.headers.get("origin") is not None:
        await deny(websocket, 403, "forbidden", "agents are not browsers: Origin header refused")
        return None
    token = bearer_token(websocket.headers.get("authorization"))
    if token is None:
        await deny(websocket, 401, "unauthorized", "missing Authorization: Bearer <agent token>")
        return None
    if not tokens.well_formed(token, "agent"):
        await deny(websocket, 401, "unauthorized", "malformed agent token")
        return None
    digest = tokens.token_hash(token)
    agent = await rt.store.get_agent_by_token_hash(digest)
    if agent is None or not tokens.digests_equal(agent.token_hash, digest):
        await deny(websocket, 401, "unauthorized", "unknown agent token")
        return None
    if agent.revoked_at is not None:
        await deny(websocket, 403, "revoked", "agent token revoked")
        return None
    return agent


def choose_subprotocol(offered: list[str]) -> str | None:
    for name in (SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON):
        if name in offered:
            return name
    return None


class AgentConnection:
    """One live agent socket. Sends go through a bounded outbox so no caller waits on the network."""

    def __init__(self, rt: Runtime, websocket: WebSocket, agent: AgentRecord, codec: Codec[m.AgentToServer]) -> None:
        self.rt = rt
        self.websocket = websocket
        self.agent_id = agent.id
        self.session_id = new_id("ses")
        self.codec = codec
        self._outbox: asyncio.Queue[m.ServerToAgent | None] = asyncio.Queue(OUTBOX_LIMIT)
        self._closed = asyncio.Event()
        self._close_code: int = CloseCode.NORMAL
        self._close_reason = ""

    async def send(self, msg: m.ServerToAgent) -> None:
        if self._closed.is_set():
            return
        try:
            self._outbox.put_nowait(msg)
        except asyncio.QueueFull:
            await self.close(CloseCode.TOO_SLOW, "agent does not read its messages")

    async def close(self, code: int, reason: str) -> None:
        if self._closed.is_set():
            return
        self._close_code, self._close_reason = code, reason
        self._closed.set()
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(None)

    async def _sender(self) -> None:
        metrics = self.rt.metrics.messages
        while True:
            msg = await self._outbox.get()
            if msg is None:
                break
            data = self.codec.encode(msg)
            if isinstance(data, bytes):
                await self.websocket.send_bytes(data)
            else:
                await self.websocket.send_text(data)
            metrics.labels("agent", "out", m.tag_of(msg)).inc()
        with contextlib.suppress(Exception):
            await self.websocket.close(self._close_code, self._close_reason)

    async def _receive(self) -> m.AgentToServer | DecodeError | None:
        """The next decoded message, a DecodeError for a bad frame, or None when the peer is gone."""
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        frame = message.get("bytes")
        if frame is None:
            frame = message.get("text", "")
        try:
            return self.codec.decode(frame)
        except DecodeError as exc:
            return exc

    async def run(self) -> None:
        async def finish() -> None:
            await self.close(self._close_code, self._close_reason)

        try:
            await run_socket(self._serve(), self._sender(), self._closed, finish)
        finally:
            await self.rt.agents.unregister(self)

    async def _serve(self) -> None:
        try:
            first = await asyncio.wait_for(self._receive(), timeout=HELLO_TIMEOUT_S)
        except TimeoutError:
            await self.close(CloseCode.PROTOCOL_ERROR, "no hello")
            return
        if not isinstance(first, m.Hello):
            await self.close(CloseCode.PROTOCOL_ERROR, "the first message must be hello")
            return
        await self._on_hello(first)
        errors = 0
        while True:
            msg = await self._receive()
            if msg is None:
                return
            if isinstance(msg, DecodeError):
                self.rt.metrics.messages.labels("agent", "in", "invalid").inc()
                if msg.code == m.ERR_TOO_BIG:
                    await self.close(CloseCode.TOO_BIG, "message too big")
                    return
                errors += 1
                if errors > MAX_ERRORS:
                    await self.close(CloseCode.PROTOCOL_ERROR, "too many invalid messages")
                    return
                await self.send(msg.to_error())
                continue
            self.rt.metrics.messages.labels("agent", "in", m.tag_of(msg)).inc()
            try:
                await self._dispatch(msg)
            except BackendUnavailable as exc:
                # Nothing was acknowledged: the agent keeps what it sent and re-sends it later.
                log.warning("state unavailable while handling agent message", extra={"reason": str(exc)})
                await self.close(CloseCode.INTERNAL_ERROR, "state temporarily unavailable")
                return

    async def _on_hello(self, hello: m.Hello) -> None:
        rt = self.rt
        await rt.store.update_agent(
            self.agent_id,
            {
                "last_seen_at": time.time(),
                "version": hello.version[:64],
                "executor": hello.executor[:64],
                "labels": sorted(set(hello.labels))[:64],
                "capacity": max(0, min(hello.capacity, 1024)),
                "draining_since": None,  # a fresh connection (a restarted agent) takes jobs again
            },
        )
        await rt.agents.register(self)
        resume = await rt.jobs.resume_plan(self.agent_id, hello.running)
        await self.send(
            m.Welcome(
                session_id=self.session_id,
                agent_id=self.agent_id,
                heartbeat_interval_s=rt.settings.heartbeat_interval_s,
                lease_s=rt.settings.lease_s,
                resume=resume,
            )
        )
        for cancel in await rt.jobs.cancels_for(self.agent_id, hello.running):
            await self.send(cancel)
        rt.wake_scheduler()
        log.info("agent connected", extra={"agent_id": self.agent_id, "session_id": self.session_id})

    async def _dispatch(self, msg: m.AgentToServer) -> None:
        jobs = self.rt.jobs
        replies: list[m.ServerToAgent]
        if isinstance(msg, m.LogChunk):
            replies, _ = await jobs.on_log_chunk(self.agent_id, msg)
        elif isinstance(msg, m.Heartbeat):
            await jobs.renew_leases(self.agent_id, msg.running)
            await self.rt.agents.touch_agent(self.agent_id)
            try:
                await self.rt.agents.refresh(self)
            except BackendUnavailable:
                pass  # the Broker is down: the socket stays; presence is refreshed once it is back
            replies = []
        elif isinstance(msg, m.JobAccept):
            replies = await jobs.on_accept(self.agent_id, msg)
        elif isinstance(msg, m.JobReject):
            replies = await jobs.on_reject(self.agent_id, msg)
            self.rt.wake_scheduler()
        elif isinstance(msg, m.Result):
            replies = await jobs.on_result(self.agent_id, msg)
            self.rt.wake_scheduler()
        elif isinstance(msg, m.CancelAck):
            replies = await jobs.on_cancel_ack(self.agent_id, msg)
            self.rt.wake_scheduler()
        elif isinstance(msg, m.Error):
            log.warning("agent reported an error", extra={"agent_id": self.agent_id, "code": msg.code})
            replies = []
        else:  # a second hello
            replies = [m.Error(code=m.ERR_UNEXPECTED, message=f"unexpected {m.tag_of(msg)}")]
        for reply in replies:
            await self.send(reply)


async def agent_endpoint(websocket: WebSocket) -> None:
    rt: Runtime = websocket.app.state.runtime
    agent = await authenticate_agent(rt, websocket)
    if agent is None:
        return
    subprotocol = choose_subprotocol(list(websocket.scope.get("subprotocols", [])))
    if subprotocol is None:
        await deny(websocket, 400, "unsupported-subprotocol", f"offer {SUBPROTOCOL_MSGPACK} or {SUBPROTOCOL_JSON}")
        return
    await websocket.accept(subprotocol=subprotocol)
    conn = AgentConnection(rt, websocket, agent, agent_server_codec(subprotocol, rt.settings.max_agent_message_bytes))
    gauge = rt.metrics.websockets_open.labels("agent")
    gauge.inc()
    try:
        await conn.run()
    except WebSocketDisconnect:
        pass
    finally:
        gauge.dec()
