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
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass

import msgspec
from starlette.types import Message, Receive, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from yardmaster.protocol import messages as m
from yardmaster.protocol.codec import Codec, DecodeError, client_server_codec
from yardmaster.protocol.feed import Action, Deliver, FetchHistory, JobFeed, Skipped
from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.backends.base import BackendUnavailable
from yardmaster.server.channels.common import (
    SEND_FLUSH_S,
    admit_handshake,
    deny,
    deny_refused,
    deny_unauthenticated,
    start_eagerly,
)
from yardmaster.server.backends.keys import ALL_JOBS_CHANNEL, job_channel, owner_channel
from yardmaster.server.core.events import EventHeader, log_message, state_message
from yardmaster.server.observability.middleware import WEBSOCKET_HANDOFF
from yardmaster.server.runtime import Runtime
from yardmaster.server.api.auth import authenticate
from yardmaster.server.security.principals import Principal
from yardmaster.server.security.origins import origin_allowed
from yardmaster.server.security.gcra import gcra
from yardmaster.server.security.rate_limits import CLIENT_MESSAGES, USER, RateLimited
from yardmaster.server.backends.base import RateDecision
from yardmaster.server.core.quotas import CLIENT_SOCKETS, SUBSCRIPTIONS, QuotaExceeded

log = logging.getLogger("yardmaster.channels.client")

HISTORY_PAGE = 500
NO_SUCH_JOB = "no such job"
_json = msgspec.json.Encoder()


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
        principal = await authenticate(websocket)
    if principal is None:
        await deny_unauthenticated(websocket, "a valid ticket, API key, access token or session cookie is required")
    return principal


@dataclass(slots=True, eq=False)
class _Subscription:
    """One topic of one socket, and its listener on the TopicHub."""

    conn: ClientConnection
    topic: str
    broker_topic: str

    def __call__(self, header: EventHeader, text: str) -> int:
        return self.conn._enqueue_counted(text)


@dataclass(slots=True, eq=False)
class _JobSubscription(_Subscription):
    """A `job:<id>` topic; its offset bookkeeping is a pure JobFeed of encoded `log`s."""

    job_id: str
    feed: JobFeed[str]

    def __call__(self, header: EventHeader, text: str) -> int:
        if header.type == "log" and header.offset is not None:
            return self.conn._apply(self, self.feed.live(header.offset, text, len(text)))
        return self.conn._enqueue_counted(text)


@functools.lru_cache(maxsize=4)
def _codec(max_bytes: int) -> Codec[m.ClientToServer]:
    return client_server_codec(max_bytes)  # stateless: one for all sockets (3 KiB each otherwise)


_TOO_SLOW = "too slow: resume from your last offset"


class ClientConnection:
    """One client socket.

    A frame goes to the socket at once (`_send_now`): an ASGI send to a socket that can take it
    completes without waiting, so fan-out needs no task per socket. Only when the socket has to
    wait (its transport is over the high-water mark) does a sender task exist, which sends, in
    order, what piled up in `_pending` meanwhile; `_buffered` counts those bytes against the
    socket's limit (4008 past it). An idle socket has no task of its own besides the one serving
    it, and no asyncio primitive that it does not use.
    """

    __slots__ = (
        "rt", "principal", "_send", "_limit", "_buffered", "_pending", "_sender", "_room", "_subscriptions",
        "_close_code", "_close_reason", "_close_sent", "_stop", "_errors", "_lock", "_catch_ups",
        "_rate_tat", "_refusals_tat",
    )

    def __init__(self, rt: Runtime, principal: Principal) -> None:
        self.rt = rt
        self.principal = principal
        self._send: Send | None = None  # the ASGI send, once the socket is accepted
        self._limit = rt.settings.viewer_buffer_bytes
        self._buffered = 0  # bytes in `_pending` and in the send under way, if it waits
        self._pending: deque[str] | None = None  # frames waiting while a sender task exists
        self._sender: asyncio.Task[None] | None = None
        self._room: asyncio.Future[None] | None = None  # history waits here for room in the buffer
        self._subscriptions: dict[str, _Subscription] = {}
        self._close_code: int | None = None  # set once: the socket is closing, nothing more is sent
        self._close_reason = ""
        self._close_sent = False
        self._stop: asyncio.Timeout | None = None  # the receive loop's cancel scope (see `run`)
        self._errors = 0  # invalid messages so far
        self._lock: asyncio.Lock | None = None  # one catch-up at a time; made when first needed
        self._catch_ups: set[asyncio.Task[None]] | None = None  # held here: the loop keeps only weak refs
        # The socket's message rate (YM_RATE_CLIENT_MESSAGES), counted here: GCRA theoretical
        # arrival times of its messages, and of its refused ones (too many of those: 1008).
        self._rate_tat: float | None = None
        self._refusals_tat: float | None = None

    # ---- sending -------------------------------------------------------------------------------

    def _enqueue(self, text: str) -> bool:
        """Send one frame, or queue it behind a waiting send; False if it was not taken."""
        if self._close_code is not None:
            return False
        size = len(text)
        if self._buffered + size > self._limit:
            self.rt.metrics.slow_consumers.inc()
            self.close(CloseCode.TOO_SLOW, _TOO_SLOW)
            return False
        if self._sender is None and self._send is not None:
            self._send_now({"type": "websocket.send", "text": text}, size)
        else:
            if self._pending is None:
                self._pending = deque()  # made when needed: an empty deque is ~600 bytes
            self._pending.append(text)
            self._buffered += size
        return True

    def send(self, msg: msgspec.Struct) -> None:
        if self._enqueue(_json.encode(msg).decode()):
            self.rt.metrics.client_messages_out(m.tag_of(msg))

    def _send_now(self, message: Message, size: int) -> None:
        """Hand `message` to the socket; if the socket makes it wait, a sender task finishes it and
        then sends whatever was queued meanwhile."""
        assert self._send is not None
        try:
            rest = start_eagerly(self._send(message))
        except Exception as exc:
            self._send_failed(exc)
            return
        if rest is not None:
            self._buffered += size
            self._sender = asyncio.create_task(self._send_rest(rest, size))

    async def _send_rest(self, rest: Awaitable[None], size: int) -> None:
        assert self._send is not None
        try:
            await rest
            self._sent(size)
            while self._pending:
                text = self._pending.popleft()
                await self._send({"type": "websocket.send", "text": text})
                self._sent(len(text))
        except Exception as exc:
            self._send_failed(exc)
        except asyncio.CancelledError:  # flushing took too long (see `_finish`): no close frame
            self._close_sent = True
            raise
        finally:
            self._sender = None
            self._pending = None
            self._wake_history()
        if self._close_code is not None and not self._close_sent:
            self._send_close()  # closed meanwhile: the close frame goes after what was queued

    def _sent(self, size: int) -> None:
        self._buffered -= size
        if self._buffered <= self._limit // 2:
            self._wake_history()

    def _send_failed(self, exc: Exception) -> None:
        self._pending = None
        self._buffered = 0
        if isinstance(exc, (OSError, WebSocketDisconnect)):  # the peer is gone (uvicorn's ClientDisconnected)
            self._close_sent = True
            self.close(CloseCode.GOING_AWAY, "")
        elif not self._close_sent:
            log.error("unexpected error on a WebSocket; closing it with 1011", exc_info=exc)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    def close(self, code: int, reason: str) -> None:
        """Close the socket after what is queued (at once if nothing is) and stop serving it."""
        if self._close_code is not None:
            return
        self._close_code, self._close_reason = code, reason
        self._wake_history()
        if self._sender is None and self._send is not None and not self._close_sent:
            self._send_close()
        stop = self._stop
        if stop is not None and not stop.expired():
            stop.reschedule(0)  # a time in the past: the receive loop is cancelled right away

    def _send_close(self) -> None:
        self._close_sent = True
        self._send_now({"type": "websocket.close", "code": self._close_code, "reason": self._close_reason}, 0)

    def _wake_history(self) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    async def _room_for_history(self) -> None:
        """History is paced by the socket, so replaying a long log never trips the slow-consumer
        limit; only live traffic that the client cannot keep up with does."""
        while self._buffered > self._limit // 2 and self._close_code is None:
            if self._room is None or self._room.done():  # done: cancelled with a catch-up before
                self._room = asyncio.get_running_loop().create_future()
            await self._room

    # ---- live events -----------------------------------------------------------------------------

    def _enqueue_counted(self, text: str) -> int:
        return 1 if self._enqueue(text) else 0

    def _apply(self, sub: _JobSubscription, actions: list[Action[str]]) -> int:
        """Carry out what the feed says, for live events (never waits); how many `log`s were sent."""
        sent = 0
        for action in actions:
            if isinstance(action, Deliver):
                sent += self._enqueue(action.item)
            elif isinstance(action, Skipped):
                self.send(m.Truncated(job_id=sub.job_id, offset=action.offset))
            elif isinstance(action, FetchHistory):
                # A live event went missing (broker hiccup): fill the hole from the Store.
                task = asyncio.create_task(self._catch_up(sub, action.from_offset))
                if self._catch_ups is None:
                    self._catch_ups = set()
                self._catch_ups.add(task)
                task.add_done_callback(self._catch_ups.discard)
            else:
                self.rt.metrics.slow_consumers.inc()
                self.close(CloseCode.TOO_SLOW, _TOO_SLOW)
        return sent

    async def _catch_up(self, sub: _JobSubscription, from_offset: int) -> None:
        """Send stored entries from `from_offset` on, paced by the socket, then what the feed held."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        try:
            async with self._lock:
                fetch: int | None = from_offset
                while fetch is not None:
                    entries = (await self.rt.jobs.logs(sub.job_id, fetch, HISTORY_PAGE)).entries
                    page = ((e.offset, _json.encode(log_message(e)).decode()) for e in entries)
                    fetch = None
                    sent = 0
                    for action in sub.feed.history(page, complete=len(entries) < HISTORY_PAGE):
                        if isinstance(action, Deliver):
                            await self._room_for_history()
                            sent += self._enqueue(action.item)
                        elif isinstance(action, Skipped):
                            # The log cap dropped what lies between: say so, then go on.
                            self.send(m.Truncated(job_id=sub.job_id, offset=action.offset))
                        elif isinstance(action, FetchHistory):
                            fetch = action.from_offset
                    if sent:
                        self.rt.metrics.client_messages_out("log", sent)
                sent = self._apply(sub, sub.feed.release())
                if sent:
                    self.rt.metrics.client_messages_out("log", sent)
        except BackendUnavailable:
            self.close(CloseCode.INTERNAL_ERROR, "state temporarily unavailable: resume from your last offset")

    # ---- requests ----------------------------------------------------------------------------------

    def _within_rate(self) -> bool:
        """Whether a message may be handled now; if not, it is answered `error rate-limited`, and
        a socket that goes on (more refused messages than the policy's count within its period)
        is closed with 1008."""
        policy = self.rt.settings.rate(CLIENT_MESSAGES)
        if policy is None:
            return True
        now_ms, period_ms = time.monotonic() * 1000, policy.period_s * 1000
        verdict = gcra(self._rate_tat, now_ms, policy.count, period_ms)
        if verdict.allowed:
            self._rate_tat = verdict.tat_ms
            return True
        self.rt.metrics.rate_limited.labels(CLIENT_MESSAGES).inc()
        refusals = gcra(self._refusals_tat, now_ms, policy.count, period_ms)
        if not refusals.allowed:
            self.close(CloseCode.POLICY, "message rate exceeded")
            return False
        self._refusals_tat = refusals.tat_ms
        decision = RateDecision(False, verdict.remaining, verdict.retry_after_ms, verdict.reset_ms)
        self.send(m.Error(code=m.ERR_RATE_LIMITED, message=str(RateLimited(CLIENT_MESSAGES, policy, decision))))
        return False

    async def _subscribe(self, msg: m.Subscribe) -> None:
        topic = msg.topic
        if topic in self._subscriptions:
            self.send(m.Error(code=m.ERR_BAD_TOPIC, message=f"already subscribed to {topic}"))
            return
        quota = self.rt.settings.quota_subscriptions
        if quota and len(self._subscriptions) >= quota:
            self.rt.metrics.quota_exceeded.labels(SUBSCRIPTIONS).inc()
            self.send(m.Error(code=m.ERR_QUOTA_EXCEEDED, message=f"{QuotaExceeded(SUBSCRIPTIONS, quota)} on one socket"))
            return
        if not self.principal.may("jobs:read"):
            self.send(m.Error(code=m.ERR_FORBIDDEN, message="this credential lacks the jobs:read scope"))
            return
        if topic == "jobs":
            # Only the caller's jobs (an admin's: all): the channel itself is per owner.
            broker_topic = ALL_JOBS_CHANNEL if self.principal.is_admin else owner_channel(self.principal.id)
            await self._listen(_Subscription(self, topic, broker_topic))
            self.send(m.Subscribed(topic=topic))
            return
        if not topic.startswith("job:"):
            self.send(m.Error(code=m.ERR_BAD_TOPIC, message="topic must be job:<id> or jobs"))
            return
        job_id = topic[4:]
        job = await self.rt.jobs.find(job_id)
        if job is None or not self.principal.may_see(job.owner):
            # One answer, code and wording, for "no such job" and "not yours": ids are not an oracle.
            self.send(m.Error(code=m.ERR_FORBIDDEN, message=NO_SUCH_JOB, job_id=job_id))
            return
        start = max(0, msg.from_offset) if msg.from_offset is not None else None
        sub = _JobSubscription(self, topic, job_channel(job_id), job_id, JobFeed(next_offset=start, hold_limit_bytes=self._limit))
        first = sub.feed.start()  # before listening: live events are held until history is sent
        await self._listen(sub)
        next_offset = await self.rt.jobs.next_log_offset(job_id)
        sub.feed.begin_at(next_offset)
        self.send(m.Subscribed(topic=topic, next_offset=next_offset))
        for action in first:
            if isinstance(action, FetchHistory):
                await self._catch_up(sub, action.from_offset)
        latest = await self.rt.jobs.find(job_id)
        if latest is not None:
            self.send(state_message(latest))

    async def _listen(self, sub: _Subscription) -> None:
        self._subscriptions[sub.topic] = sub
        await self.rt.topics.add(sub.broker_topic, sub)

    async def _unsubscribe(self, topic: str) -> None:
        sub = self._subscriptions.pop(topic, None)
        if sub is not None:
            await self.rt.topics.remove(sub.broker_topic, sub)

    async def run(self, receive: Receive, send: Send) -> None:
        """Serve the accepted socket until the peer goes or we close it, then clean up."""
        self._send = send
        gauge = self.rt.metrics.websockets_open.labels("client")
        gauge.inc()
        try:
            if self._close_code is not None:  # closed (its key revoked) during the handshake
                self._send_close()
                return
            # A cancel scope instead of a task that only waits for `close`: `close` expires it,
            # which cancels the receive loop wherever it waits.
            try:
                async with asyncio.timeout(None) as stop:
                    self._stop = stop
                    # Each message is handled in a call of its own: nothing of it stays referenced
                    # while the socket waits for the next one (a few hundred bytes per idle socket).
                    while await self._handle(await receive()):
                        pass
            except TimeoutError:
                if not stop.expired():  # not ours
                    raise
            finally:
                self._stop = None
        except Exception as exc:
            log.error("unexpected error on a WebSocket; closing it with 1011", exc_info=exc)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            try:
                await self._finish()
            finally:
                gauge.dec()
                await self.rt.client_sockets.release(self)

    async def _finish(self) -> None:
        for task in list(self._catch_ups or ()):
            task.cancel()
        for topic in list(self._subscriptions):
            await self._unsubscribe(topic)
        self.close(CloseCode.NORMAL, "")
        # Let what is queued go out, for a while (a sender that ends may start one for the close frame).
        deadline = asyncio.get_running_loop().time() + SEND_FLUSH_S
        while (sender := self._sender) is not None:
            try:
                await asyncio.wait_for(sender, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                return  # wait_for cancelled it

    async def _handle(self, message: Message) -> bool:
        """Handle one received ASGI message; False when the socket is done."""
        if message["type"] == "websocket.disconnect":
            return False
        if not self._within_rate():
            return self._close_code is None
        frame = message.get("text")
        if frame is None:
            frame = message.get("bytes") or b""
        try:
            msg = _codec(self.rt.settings.max_client_message_bytes).decode(frame)
        except DecodeError as exc:
            self.rt.metrics.messages.labels("client", "in", "invalid").inc()
            if exc.code == m.ERR_TOO_BIG:
                self.close(CloseCode.TOO_BIG, "message too big")
                return False
            self._errors += 1
            if self._errors > 20:
                self.close(CloseCode.PROTOCOL_ERROR, "too many invalid messages")
                return False
            self.send(exc.to_error())
            return True
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
            return False
        return True


async def client_endpoint(websocket: WebSocket) -> None:
    rt: Runtime = websocket.app.state.runtime
    principal = await authenticate_client(rt, websocket)
    if principal is None:
        return
    if not await admit_handshake(websocket, USER, principal.id):
        return
    conn = ClientConnection(rt, principal)
    # Registered before the upgrade: counted against the user's quota (on every replica), and
    # closed if its key is revoked. It leaves the registry when `run` ends.
    quota = rt.settings.quota_client_sockets
    if not await rt.client_sockets.open(conn, quota):
        rt.metrics.quota_exceeded.labels(CLIENT_SOCKETS).inc()
        await deny_refused(websocket, QuotaExceeded(CLIENT_SOCKETS, quota))
        return
    try:
        await websocket.accept()
    except BaseException:
        await rt.client_sockets.release(conn)
        raise
    if WEBSOCKET_HANDOFF in websocket.scope:
        websocket.scope[WEBSOCKET_HANDOFF] = conn.run  # served from RequestContextMiddleware, once we return
    else:
        await conn.run(websocket.receive, websocket.send)
