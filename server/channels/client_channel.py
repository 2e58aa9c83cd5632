"""The client channel `/ws/client`: browsers and CLI followers watch job logs and states.

A `job:<id>` subscription with `from_offset` is served history first, then live, with no gap
and no duplicate: the live listener is registered before history is read, and the offset
bookkeeping (hold live events while history is sent, drop what was delivered, fill a jump from
the Store, announce what the log cap dropped) is the pure `protocol.feed.JobFeed`; this module
only carries out what it says. Each socket has a bounded send buffer;
a socket that falls behind is closed with 4008 and resumes by offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec
from starlette.websockets import WebSocket

from yardmaster.protocol import messages as m
from yardmaster.protocol.codec import DecodeError, client_server_codec
from yardmaster.protocol.feed import Action, Deliver, FetchHistory, JobFeed, Skipped
from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.backends.base import BackendUnavailable
from yardmaster.server.channels.common import deny, run_socket, serve_counted
from yardmaster.server.backends.keys import ALL_JOBS_CHANNEL, job_channel, owner_channel
from yardmaster.server.core.events import EventHeader, log_message, state_message
from yardmaster.server.runtime import Runtime
from yardmaster.server.security.principals import Principal, bearer_token, principal_for_api_key

log = logging.getLogger("yardmaster.channels.client")

HISTORY_PAGE = 500
_json = msgspec.json.Encoder()


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_tuple(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) origin, default port filled in; None for anything else."""
    try:
        parts = urlsplit(url.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or _DEFAULT_PORTS[parts.scheme]


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...], scheme: str) -> bool:
    """No Origin (not a browser), the same origin (scheme, host and port: `scheme` is this request's,
    ws/wss or http/https), or one listed in YM_ALLOWED_ORIGINS."""
    if origin is None:
        return True
    if origin in allowed or "*" in allowed:
        return True
    key = _origin_tuple(origin)
    if key is None:  # "null" (sandboxed frames, file://) and other schemes
        return False
    if any(_origin_tuple(entry) == key for entry in allowed):
        return True
    own_scheme = "https" if scheme in ("https", "wss") else "http"
    return bool(host) and _origin_tuple(f"{own_scheme}://{host}") == key


async def authenticate_client(rt: Runtime, websocket: WebSocket) -> Principal | None:
    # The ticket is redeemed before anything can refuse the handshake, so a refused handshake
    # never leaves a live ticket behind.
    ticket = websocket.query_params.get("ticket")
    principal = await rt.tickets.redeem(ticket) if ticket is not None else None
    if not origin_allowed(websocket.headers.get("origin"), websocket.headers.get("host"), rt.settings.allowed_origins,
                          websocket.url.scheme):
        await deny(websocket, 403, "forbidden", "origin not allowed")
        return None
    if ticket is None:
        token = bearer_token(websocket.headers.get("authorization"))
        principal = await principal_for_api_key(rt.store, token) if token else None
    if principal is None:
        await deny(websocket, 401, "unauthorized", "a valid ticket or API key is required")
    return principal


@dataclass(slots=True)
class _JobSubscription:
    """One job topic of one socket; its offset bookkeeping is a pure JobFeed of encoded `log`s."""

    job_id: str
    feed: JobFeed[bytes]


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
        self._feeds: dict[str, _JobSubscription] = {}
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
        sub = self._feeds.get(topic)
        if sub is not None and header.type == "log" and header.offset is not None:
            self._apply(sub, sub.feed.live(header.offset, data, len(data)))
            return
        self._enqueue(data.decode(), header.type)

    def _apply(self, sub: _JobSubscription, actions: list[Action[bytes]]) -> None:
        """Carry out what the feed says, for live events (never waits)."""
        for action in actions:
            if isinstance(action, Deliver):
                self._enqueue(action.item.decode(), "log")
            elif isinstance(action, Skipped):
                self.send(m.Truncated(job_id=sub.job_id, offset=action.offset))
            elif isinstance(action, FetchHistory):
                # A live event went missing (broker hiccup): fill the hole from the Store.
                task = asyncio.create_task(self._catch_up(sub, action.from_offset))
                self._catch_ups.add(task)
                task.add_done_callback(self._catch_ups.discard)
            else:
                self.rt.metrics.slow_consumers.inc()
                self.close(CloseCode.TOO_SLOW, "too slow: resume from your last offset")

    async def _catch_up(self, sub: _JobSubscription, from_offset: int) -> None:
        """Send stored entries from `from_offset` on, paced by the socket, then what the feed held."""
        try:
            async with self._lock:
                fetch: int | None = from_offset
                while fetch is not None:
                    entries = (await self.rt.jobs.logs(sub.job_id, fetch, HISTORY_PAGE)).entries
                    page = ((e.offset, _json.encode(log_message(e))) for e in entries)
                    fetch = None
                    for action in sub.feed.history(page, complete=len(entries) < HISTORY_PAGE):
                        if isinstance(action, Deliver):
                            await self._room_for_history()
                            self._enqueue(action.item.decode(), "log")
                        elif isinstance(action, Skipped):
                            # The log cap dropped what lies between: say so, then go on.
                            self.send(m.Truncated(job_id=sub.job_id, offset=action.offset))
                        elif isinstance(action, FetchHistory):
                            fetch = action.from_offset
                self._apply(sub, sub.feed.release())
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
        job = await self.rt.jobs.find(job_id)
        if job is None or not self.principal.may_see(job.owner):
            # The same answer for "no such job" and "not yours": ids are not an oracle.
            self.send(m.Error(code=m.ERR_UNKNOWN_JOB, message="no such job", job_id=job_id))
            return
        start = max(0, msg.from_offset) if msg.from_offset is not None else None
        sub = _JobSubscription(job_id, JobFeed(next_offset=start, hold_limit_bytes=self._limit))
        self._feeds[topic] = sub
        first = sub.feed.start()  # before listening: live events are held until history is sent
        await self._listen(topic, job_channel(job_id))
        next_offset = await self.rt.jobs.next_log_offset(job_id)
        sub.feed.begin_at(next_offset)
        self.send(m.Subscribed(topic=topic, next_offset=next_offset))
        for action in first:
            if isinstance(action, FetchHistory):
                await self._catch_up(sub, action.from_offset)
        latest = await self.rt.jobs.find(job_id)
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

        async def fail(code: int, reason: str) -> None:
            self.close(code, reason)

        await run_socket(self._serve(), self._sender(), self._closed, finish, fail)

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
    conn = ClientConnection(rt, websocket, principal)
    # Registered before the upgrade: counted against the cap, and closed if its key is revoked.
    cap = rt.settings.max_client_sockets_per_principal
    if not rt.client_sockets.try_add(conn, cap):
        await deny(websocket, 429, "too-many-sockets", f"at most {cap} open client sockets per principal on one server")
        return
    try:
        await websocket.accept()
        await serve_counted(rt.metrics.websockets_open.labels("client"), conn.run)
    finally:
        rt.client_sockets.remove(conn)
