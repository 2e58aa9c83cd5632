"""The agent channel `/ws/agent`: translates between the wire and the core (JobService,
AgentRegistry, AgentHub)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import cast

from starlette.websockets import WebSocket

from yardmaster.protocol import messages as m
from yardmaster.protocol.codec import (
    MAX_LOG_CHUNK_BYTES,
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
    Codec,
    DecodeError,
    agent_server_codec,
)
from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.backends.base import BackendUnavailable
from yardmaster.server.backends.records import AgentRecord
from yardmaster.server.channels.common import admit_handshake, deny, deny_unauthenticated, run_socket, serve_counted
from yardmaster.server.core.agent_registry import clamp_capacity, clip
from yardmaster.server.core.ids import new_id
from yardmaster.server.runtime import Runtime
from yardmaster.server.security import tokens
from yardmaster.server.security.principals import bearer_token
from yardmaster.server.security.rate_limits import AGENT

log = logging.getLogger("yardmaster.channels.agent")

HELLO_TIMEOUT_S = 10.0
READ_AHEAD = 1000  # messages received and not yet handled, at most
OUTBOX_LIMIT = 1000
MAX_ERRORS = 20  # a peer that keeps sending garbage is broken: close it


async def authenticate_agent(rt: Runtime, websocket: WebSocket) -> AgentRecord | None:
    """The agent record for the handshake's bearer token, or None after refusing the handshake."""
    if websocket.headers.get("origin") is not None:
        await deny(websocket, 403, "forbidden", "agents are not browsers: Origin header refused")
        return None
    token = bearer_token(websocket.headers.get("authorization"))
    if token is None:
        await deny_unauthenticated(websocket, "missing Authorization: Bearer <agent token>")
        return None
    if not tokens.well_formed(token, "agent"):
        await deny_unauthenticated(websocket, "malformed agent token")
        return None
    digest = tokens.token_hash(token)
    agent = await rt.store.get_agent_by_token_hash(digest)
    if agent is None or not tokens.digests_equal(agent.token_hash, digest):
        await deny_unauthenticated(websocket, "unknown agent token")
        return None
    if agent.revoked_at is not None:
        await deny_unauthenticated(websocket, "agent token revoked", 403, "revoked")
        return None
    return agent


def choose_subprotocol(offered: list[str]) -> str | None:
    for name in (SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON):
        if name in offered:
            return name
    return None


Received = m.AgentToServer | DecodeError | None


class _Inbox:
    """Messages read ahead of their handling. A reader task receives while the handler waits on
    the Store, so the handler takes everything that arrived meanwhile as one batch (a run of
    accepts and results is then one Store transaction). At most READ_AHEAD messages wait: past
    that the reader stops reading and the socket's own flow control holds the agent back."""

    def __init__(self, receive: Callable[[], Awaitable[Received]]) -> None:
        self._receive = receive
        self._items: list[Received] = []
        self._error: BaseException | None = None
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="agent-read-ahead")

    async def _read(self) -> None:
        try:
            while True:
                while len(self._items) >= READ_AHEAD:
                    self._room.clear()
                    await self._room.wait()
                msg = await self._receive()
                self._items.append(msg)
                self._arrived.set()
                if msg is None:
                    return
        except Exception as exc:  # handed to the handler, which raises it where the loop would have
            self._error = exc
            self._arrived.set()

    async def take(self) -> list[Received]:
        """Every message received and not yet taken; waits for one if there is none."""
        while not self._items:
            if self._error is not None:
                raise self._error
            self._arrived.clear()
            await self._arrived.wait()
        batch, self._items = self._items, []
        self._room.set()
        return batch

    async def close(self) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


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
        # An agent never holds more jobs than the capacity its hello declared (it runs at most
        # what it was granted, which is no more); a longer `running` list is a protocol error.
        self._running_limit = 0

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
            await run_socket(self._serve(), self._sender(), self._closed, finish, self.close)
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
        inbox = _Inbox(self._receive)
        try:
            await self._handle_all(inbox)
        finally:
            await inbox.close()

    async def _handle_all(self, inbox: _Inbox) -> None:
        errors = 0
        while not self._closed.is_set():
            batch = await inbox.take()
            i = 0
            while i < len(batch):
                msg = batch[i]
                if msg is None:
                    return
                if isinstance(msg, (m.JobAccept, m.Result)):
                    # A run of accepts and results is one Store transaction (JobService.on_reports).
                    j = i + 1
                    while j < len(batch) and isinstance(batch[j], (m.JobAccept, m.Result)):
                        j += 1
                    reports = cast(list[m.JobAccept | m.Result], batch[i:j])
                    i = j
                    if not await self._guarded(self._on_reports(reports)):
                        return
                    continue
                i += 1
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
                if not await self._guarded(self._dispatch(msg)):
                    return

    async def _guarded(self, handling: Awaitable[None]) -> bool:
        """Handle a message; False (and the socket closed) when state was unreachable."""
        try:
            await handling
        except BackendUnavailable as exc:
            # Nothing was acknowledged: the agent keeps what it sent and re-sends it later.
            log.warning("state unavailable while handling agent message", extra={"reason": str(exc)})
            await self.close(CloseCode.INTERNAL_ERROR, "state temporarily unavailable")
            return False
        return True

    async def _on_reports(self, reports: list[m.JobAccept | m.Result]) -> None:
        counter = self.rt.metrics.messages
        for tag, n in Counter(m.tag_of(msg) for msg in reports).items():
            counter.labels("agent", "in", tag).inc(n)
        for reply in await self.rt.jobs.on_reports(self.agent_id, reports):
            await self.send(reply)
        if any(isinstance(msg, m.Result) for msg in reports):
            self.rt.wake_scheduler()

    async def _running_over_limit(self, running: list[m.RunningJob], where: str) -> bool:
        if len(running) <= self._running_limit:
            return False
        await self.close(
            CloseCode.PROTOCOL_ERROR,
            f"{where}.running lists {len(running)} jobs, more than the declared capacity {self._running_limit}",
        )
        return True

    async def _on_hello(self, hello: m.Hello) -> None:
        rt = self.rt
        self._running_limit = clamp_capacity(hello.capacity)
        if await self._running_over_limit(hello.running, "hello"):
            return
        outcome = await rt.agent_registry.hello(self.agent_id, hello)
        await rt.agents.register(self)
        resume = await rt.jobs.resume_plan(self.agent_id, hello.running)
        await self.send(
            m.Welcome(
                session_id=self.session_id,
                agent_id=self.agent_id,
                heartbeat_interval_s=rt.settings.heartbeat_interval_s,
                lease_s=rt.settings.lease_s,
                resume=resume,
                labels=outcome.grant.labels,
                capacity=outcome.grant.capacity,
            )
        )
        for cancel in await rt.jobs.cancels_for(self.agent_id, hello.running):
            await self.send(cancel)
        rt.wake_scheduler()
        log.info(
            "agent connected",
            extra={
                "agent_id": self.agent_id,
                "session_id": self.session_id,
                "agent_name": clip(hello.name),
                "labels": outcome.grant.labels,
                "capacity": outcome.grant.capacity,
            },
        )
        if outcome.not_granted or outcome.grant.capacity < self._running_limit:
            log.info(
                "agent asked for more than its registration grants",
                extra={
                    "agent_id": self.agent_id,
                    "labels_not_granted": [clip(label, 64) for label in outcome.not_granted[:10]],
                    "labels_not_granted_count": len(outcome.not_granted),
                    "invalid_labels_count": len(outcome.refused_labels),
                    "capacity_asked": self._running_limit,
                    "capacity_granted": outcome.grant.capacity,
                },
            )

    async def _dispatch(self, msg: m.AgentToServer) -> None:
        jobs = self.rt.jobs
        replies: list[m.ServerToAgent]
        if isinstance(msg, m.LogChunk):
            if len(msg.data) > MAX_LOG_CHUNK_BYTES:
                # Refused, not stored and not acknowledged: one oversized entry would otherwise
                # be too big for every subscriber of the job.
                replies = [
                    m.Error(
                        code=m.ERR_TOO_BIG,
                        message=f"log-chunk data of {len(msg.data)} bytes exceeds {MAX_LOG_CHUNK_BYTES}",
                        job_id=msg.job_id,
                        attempt=msg.attempt,
                    )
                ]
            else:
                replies, _ = await jobs.on_log_chunk(self.agent_id, msg)
        elif isinstance(msg, m.Heartbeat):
            if await self._running_over_limit(msg.running, "heartbeat"):
                return
            await jobs.renew_leases(self.agent_id, msg.running)
            await self.rt.agent_registry.seen(self.agent_id)
            try:
                await self.rt.agents.refresh(self)
            except BackendUnavailable:
                pass  # the Broker is down: the socket stays; presence is refreshed once it is back
            replies = []
        elif isinstance(msg, m.JobReject):
            replies = await jobs.on_reject(self.agent_id, msg)
            self.rt.wake_scheduler()
        elif isinstance(msg, m.CancelAck):
            replies = await jobs.on_cancel_ack(self.agent_id, msg)
            self.rt.wake_scheduler()
        elif isinstance(msg, m.Error):
            log.warning(
                "agent reported an error",
                extra={
                    "agent_id": self.agent_id,
                    "code": clip(msg.code, 64),
                    "error": clip(msg.message),
                    "job_id": clip(msg.job_id, 64) if msg.job_id is not None else None,
                },
            )
            replies = []
        else:  # a second hello
            replies = [m.Error(code=m.ERR_UNEXPECTED, message=f"unexpected {m.tag_of(msg)}")]
        for reply in replies:
            await self.send(reply)


async def agent_endpoint(websocket: WebSocket) -> None:
    rt: Runtime = websocket.app.state.runtime
    agent = await authenticate_agent(rt, websocket)
    if agent is None or not await admit_handshake(websocket, AGENT, agent.id):
        return
    subprotocol = choose_subprotocol(list(websocket.scope.get("subprotocols", [])))
    if subprotocol is None:
        await deny(websocket, 400, "unsupported-subprotocol", f"offer {SUBPROTOCOL_MSGPACK} or {SUBPROTOCOL_JSON}")
        return
    await websocket.accept(subprotocol=subprotocol)
    conn = AgentConnection(rt, websocket, agent, agent_server_codec(subprotocol, rt.settings.max_agent_message_bytes))
    await serve_counted(rt.metrics.websockets_open.labels("agent"), conn.run)
