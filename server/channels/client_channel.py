"""The client channel `/ws/client`: browsers and CLI followers watch job logs and states.

A `job:<id>` subscription with `from_offset` is served history first, then live, with no gap
and no duplicate: the live listener is registered before history is read, live log events are
held back until history has caught up, and every log is delivered only if its offset is the
next one expected (a jump is filled from the Store). Each socket has a bounded send buffer;
a socket that falls behind is closed with 4008 and resumes by offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import urlsplit

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from yardmaster.protocol import messages as m
from yardmaster.protocol.codec import DecodeError, client_server_codec
from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.backends.base import BackendUnavailable
from yardmaster.server.channels.common import deny, run_socket
from yardmaster.server.backends.keys import ALL_JOBS_CHANNEL, job_channel, owner_channel
from yardmaster.server.core.events import EventHeader, log_message, state_message
from yardmaster.server.runtime import Runtime
from yardmaster.server.security.principals import Principal, bearer_token, principal_for_api_key

log = logging.getLogger("yardmaster.channels.client")

HISTORY_PAGE = 500
_json = msgspec.json.Encoder()


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """No Origin (not a browser), the same origin, or one listed in YM_ALLOWED_ORIGINS."""
    if origin is None:
        return True
    if origin in allowed or "*" in allowed:
        return True
    parts = urlsplit(origin)
    return bool(host) and parts.netloc == host


async def authenticate_client(rt: Runtime, websocket: WebSocket) -> Principal | None:
    if not origin_allowed(websocket.headers.get("origin"), websocket.headers.get("host"), rt.settings.allowed_origins):
        await deny(websocket, 403, "forbidden", "origin not allowed")
        return None
    ticket = websocket.query_params.get("ticket")
    if ticket is not None:
        principal = await rt.tickets.redeem(ticket)
    else:
        token = bearer_token(websocket.headers.get("authorization"))
        principal = await principal_for_api_key(rt.store, token) if token else None
    if principal is None:
        await deny(websocket, 401, "unauthorized", "a valid ticket or API key is required")
    return principal


class _JobFeed:
    """One job subscription of one socket: ordering and de-duplication by offset."""

    def __init__(self, job_id: str, next_offset: int | None) -> None:
        self.job_id = job_id
        self.next_offset = next_offset  # None: live only, take whatever comes next
        self.catching_up = next_offset is not None
        self.held: list[tuple[EventHeader, bytes]] = []
        self.held_bytes = 0


class ClientConnection:
    def __init__(self, rt: Runtime, websocket: WebSocket, principal: Principal) -> None:
        self.rt = rt
        self.websocket = websocket
        self.principal = principal
        self.codec = client_server_codec(rt.settings.max_client_message_bytes)
        self._limit = rt.settings.viewer_buffer_bytes
        self._buffered = 0
        self._outbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._listeners: dict[str, object] = {}
        self._feeds: dict[str, _JobFeed] = {}
        self._closed = asyncio.Event()
        self._close_code: int = CloseCode.NORMAL
        self._close_reason = ""
        self._lock = asyncio.Lock()  # one catch-up at a time per socket
        self._drained = asyncio.Event()
        self._catch_ups: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak refs

    # ---- sending -------------------------------------------------------------------------------

    def _enqueue(self, text: str, kind: str) -> None:
        if self._closed.is_set():
            return
        size = len(text)
        if self._buffered + size > self._limit:
            self.rt.metrics.slow_consumers.inc()
            self.close(CloseCode.TOO_SLOW, "too slow: resume from your last offset")
            return
        self._buffered += size
        self._outbox.put_nowait(text)
        self.rt.metrics.messages.labels("client", "out", kind).inc()

    def send(self, msg: msgspec.Struct) -> None:
        self._enqueue(_json.encode(msg).decode(), m.tag_of(msg))

    def close(self, code: int, reason: str) -> None:
        if not self._closed.is_set():
            self._close_code, self._close_reason = code, reason
            self._closed.set()
            self._outbox.put_nowait(None)

    async def _sender(self) -> None:
        while True:
            text = await self._outbox.get()
            if text is None:
                break
            await self.websocket.send_text(text)
            self._buffered -= len(text)
            self._drained.set()
        with contextlib.suppress(Exception):
            await self.websocket.close(self._close_code, self._close_reason)

    async def _room_for_history(self) -> None:
        """History is paced by the socket, so replaying a long log never trips the slow-consumer
        limit; only live traffic that the client cannot keep up with does."""
        while self._buffered > self._limit // 2 and not self._closed.is_set():
            self._drained.clear()
            await self._drained.wait()

    # ---- live events -----------------------------------------------------------------------------

    def _on_event(self, topic: str, header: EventHeader, data: bytes) -> None:
        feed = self._feeds.get(topic)
        if feed is not None and header.type == "log":
            if feed.catching_up:
                self._hold(feed, header, data)
                return
            if header.offset is not None and feed.next_offset is not None:
                if header.offset < feed.next_offset:
                    return  # already delivered from history
                if header.offset > feed.next_offset:
                    # A live event went missing (broker hiccup): fill the hole from the Store.
                    feed.catching_up = True
                    self._hold(feed, header, data)
                    task = asyncio.create_task(self._catch_up(topic, feed))
                    self._catch_ups.add(task)
                    task.add_done_callback(self._catch_ups.discard)
                    return
            if header.offset is not None:
                feed.next_offset = header.offset + 1
        self._enqueue(data.decode(), header.type)

    def _hold(self, feed: _JobFeed, header: EventHeader, data: bytes) -> None:
        """Keep a live event until history has caught up; the same byte bound as the send buffer."""
        feed.held_bytes += len(data)
        if feed.held_bytes > self._limit:
            self.rt.metrics.slow_consumers.inc()
            self.close(CloseCode.TOO_SLOW, "too slow: resume from your last offset")
            return
        feed.held.append((header, data))

    async def _catch_up(self, topic: str, feed: _JobFeed) -> None:
        """Send stored entries from feed.next_offset on, then release held live events."""
        try:
            async with self._lock:
                while True:
                    start = feed.next_offset or 0
                    entries = await self.rt.store.read_logs(feed.job_id, start, HISTORY_PAGE)
                    for entry in entries:
                        if entry.offset >= start:
                            await self._room_for_history()
                            if entry.offset > (feed.next_offset or 0):
                                # The log cap dropped what lies between: say so, then go on.
                                self.send(m.Truncated(job_id=feed.job_id, offset=entry.offset))
                            self.send(log_message(entry))
                            feed.next_offset = entry.offset + 1
                    if len(entries) < HISTORY_PAGE:
                        break
                held, feed.held, feed.held_bytes = feed.held, [], 0
                feed.catching_up = False
                for header, data in held:
                    self._on_event(topic, header, data)
        except BackendUnavailable:
            self.close(CloseCode.INTERNAL_ERROR, "state temporarily unavailable: resume from your last offset")

    # ---- requests ----------------------------------------------------------------------------------

    async def _subscribe(self, msg: m.Subscribe) -> None:
        topic = msg.topic
        if topic in self._listeners:
            self.send(m.Error(code=m.ERR_BAD_TOPIC, message=f"already subscribed to {topic}"))
            return
        if topic == "jobs":
            broker_topic = ALL_JOBS_CHANNEL if self.principal.is_admin else owner_channel(self.principal.id)
            await self._listen(topic, broker_topic)
            self.send(m.Subscribed(topic=topic))
            return
        if not topic.startswith("job:"):
            self.send(m.Error(code=m.ERR_BAD_TOPIC, message="topic must be job:<id> or jobs"))
            return
        job_id = topic[4:]
        job = await self.rt.store.get_job(job_id)
        if job is None or not self.principal.may_see(job.owner):
            # The same answer for "no such job" and "not yours": ids are not an oracle.
            self.send(m.Error(code=m.ERR_UNKNOWN_JOB, message="no such job", job_id=job_id))
            return
        start = max(0, msg.from_offset) if msg.from_offset is not None else None
        feed = _JobFeed(job_id, start)
        self._feeds[topic] = feed
        await self._listen(topic, job_channel(job_id))
        next_offset = await self.rt.store.next_log_offset(job_id)
        if start is None and feed.next_offset is None:
            feed.next_offset = next_offset
        self.send(m.Subscribed(topic=topic, next_offset=next_offset))
        if start is not None:
            await self._catch_up(topic, feed)
        latest = await self.rt.store.get_job(job_id)
        if latest is not None:
            self.send(state_message(latest))

    async def _listen(self, topic: str, broker_topic: str) -> None:
        def listener(header: EventHeader, data: bytes) -> None:
            self._on_event(topic, header, data)

        self._listeners[topic] = (broker_topic, listener)
        await self.rt.topics.add(broker_topic, listener)

    async def _unsubscribe(self, topic: str) -> None:
        entry = self._listeners.pop(topic, None)
        self._feeds.pop(topic, None)
        if entry is not None:
            broker_topic, listener = entry  # type: ignore[misc]
            await self.rt.topics.remove(broker_topic, listener)

    async def run(self) -> None:
        async def finish() -> None:
            for task in list(self._catch_ups):
                task.cancel()
            for topic in list(self._listeners):
                await self._unsubscribe(topic)
            self.close(self._close_code, self._close_reason)

        await run_socket(self._serve(), self._sender(), self._closed, finish)

    async def _serve(self) -> None:
        errors = 0
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            frame = message.get("text")
            if frame is None:
                frame = message.get("bytes") or b""
            try:
                msg = self.codec.decode(frame)
            except DecodeError as exc:
                self.rt.metrics.messages.labels("client", "in", "invalid").inc()
                if exc.code == m.ERR_TOO_BIG:
                    self.close(CloseCode.TOO_BIG, "message too big")
                    return
                errors += 1
                if errors > 20:
                    self.close(CloseCode.PROTOCOL_ERROR, "too many invalid messages")
                    return
                self.send(exc.to_error())
                continue
            self.rt.metrics.messages.labels("client", "in", m.tag_of(msg)).inc()
            try:
                if isinstance(msg, m.Subscribe):
                    await self._subscribe(msg)
                elif isinstance(msg, m.Unsubscribe):
                    await self._unsubscribe(msg.topic)
                    self.send(m.Unsubscribed(topic=msg.topic))
                elif isinstance(msg, m.Ping):
                    self.send(m.Pong(id=msg.id))
            except BackendUnavailable:
                self.close(CloseCode.INTERNAL_ERROR, "state temporarily unavailable: resume from your last offset")
                return


async def client_endpoint(websocket: WebSocket) -> None:
    rt: Runtime = websocket.app.state.runtime
    principal = await authenticate_client(rt, websocket)
    if principal is None:
        return
    await websocket.accept()
    gauge = rt.metrics.websockets_open.labels("client")
    gauge.inc()
    try:
        await ClientConnection(rt, websocket, principal).run()
    except WebSocketDisconnect:
        pass
    finally:
        gauge.dec()
