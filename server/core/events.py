"""Job events over the Broker's pub/sub, and their local fan-out.

Every log entry and job-state change is encoded once as the client-channel JSON message and
published on its topics. Each replica holds one Broker subscription per topic, shared by all of
its local listeners, and drops it when the last listener leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import msgspec

from yardmaster.protocol import messages as m
from yardmaster.server.backends.base import BackendUnavailable, Broker, Subscription
from yardmaster.server.backends.keys import ALL_JOBS_CHANNEL, job_channel, owner_channel
from yardmaster.server.backends.records import JobRecord, LogEntry
from yardmaster.server.core.batching import Coalescer
from yardmaster.server.core.subscriptions import read_forever

log = logging.getLogger("yardmaster.events")

_json = msgspec.json.Encoder()


class EventHeader(msgspec.Struct):
    """The part of a published event a listener needs without decoding it whole."""

    type: str
    offset: int | None = None


_header = msgspec.json.Decoder(EventHeader)


def log_message(entry: LogEntry) -> m.Log:
    return m.Log(
        job_id=entry.job_id,
        attempt=entry.attempt,
        offset=entry.offset,
        stream=entry.stream,
        text=entry.data.decode("utf-8", errors="replace"),
    )


def state_message(job: JobRecord) -> m.JobStateMsg:
    return m.JobStateMsg(
        job_id=job.id,
        state=job.state,
        attempt=job.attempt,
        exit_code=job.exit_code,
        error=job.error,
        agent_id=job.agent_id,
    )


class EventPublisher:
    """Publishes made while another is on its way to the Broker go out together in the next
    round trip (a Redis pipeline), in the order they were made."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._out: Coalescer[tuple[str, bytes]] = Coalescer(self._publish, "events")

    async def log_entry(self, entry: LogEntry) -> None:
        await self._out.add([(job_channel(entry.job_id), _json.encode(log_message(entry)))])

    async def job_state(self, job: JobRecord) -> None:
        await self.job_states([job])

    async def job_states(self, jobs: Sequence[JobRecord]) -> None:
        """Each job's state on its three topics."""
        messages: list[tuple[str, bytes]] = []
        for job in jobs:
            data = _json.encode(state_message(job))
            messages += [(job_channel(job.id), data), (owner_channel(job.owner), data), (ALL_JOBS_CHANNEL, data)]
        await self._out.add(messages)

    async def _publish(self, messages: Sequence[tuple[str, bytes]]) -> None:
        # Live delivery is best effort; subscribers recover anything missed from the Store.
        try:
            await self._broker.publish_many(messages)
        except BackendUnavailable as exc:
            log.warning("events not published", extra={"messages": len(messages), "reason": str(exc)})

    async def close(self) -> None:
        await self._out.close()


Listener = Callable[[EventHeader, str], int]
"""Gets each event of its topic: the header, and the message as text (decoded once for every
listener). Must not block: it sends or queues, and returns how many messages it sent (0 or 1)."""

Counted = Callable[[str, int], None]
"""Told, once per event, the event's type and how many messages the listeners sent for it."""


class _Topic:
    __slots__ = ("listeners", "subscription", "reader", "subscribing")

    def __init__(self) -> None:
        self.listeners: set[Listener] = set()
        self.subscription: Subscription | None = None
        self.reader: asyncio.Task[None] | None = None
        # Pending while the Broker subscription is being made; None once it is made (or failed).
        self.subscribing: asyncio.Future[None] | None = asyncio.get_running_loop().create_future()


class TopicHub:
    """Local fan-out of broker topics. Listeners must not block: they queue and return."""

    def __init__(self, broker: Broker, counted: Counted | None = None) -> None:
        self._broker = broker
        self._counted = counted
        self._topics: dict[str, _Topic] = {}

    async def add(self, topic: str, listener: Listener) -> None:
        """Register a listener; returns once events published from now on will reach it."""
        entry = self._topics.get(topic)
        if entry is None:
            entry = self._topics[topic] = _Topic()
            entry.listeners.add(listener)
            try:
                entry.subscription = await self._broker.subscribe(topic)
            except BaseException:
                entry.listeners.discard(listener)
                if self._topics.get(topic) is entry:
                    del self._topics[topic]
                _made(entry)
                raise
            entry.reader = asyncio.create_task(
                read_forever(self._broker, topic, entry.subscription, lambda data: self._fan_out(topic, entry, data)),
                name=f"topic-{topic}",
            )
            _made(entry)
        else:
            entry.listeners.add(listener)
            if entry.subscribing is not None:
                await asyncio.shield(entry.subscribing)  # shielded: it is shared with the other joiners
            if entry.subscription is None:
                entry.listeners.discard(listener)
                raise BackendUnavailable("broker: subscription failed")

    async def remove(self, topic: str, listener: Listener) -> None:
        entry = self._topics.get(topic)
        if entry is None:
            return
        entry.listeners.discard(listener)
        if not entry.listeners and entry.subscribing is None:
            del self._topics[topic]
            await self._close(entry)

    async def close(self) -> None:
        topics, self._topics = self._topics, {}
        for entry in topics.values():
            await self._close(entry)

    async def _close(self, entry: _Topic) -> None:
        if entry.reader is not None:
            entry.reader.cancel()  # the reader closes the subscription it holds
            await asyncio.gather(entry.reader, return_exceptions=True)
        if entry.subscription is not None:  # a reader cancelled before it ever ran closed nothing
            with contextlib.suppress(Exception):
                await entry.subscription.close()

    async def _fan_out(self, topic: str, entry: _Topic, data: bytes) -> None:
        try:
            header = _header.decode(data)
            text = data.decode()
        except (msgspec.DecodeError, UnicodeDecodeError):
            log.warning("undecodable event dropped", extra={"topic": topic})
            return
        sent = 0
        for listener in list(entry.listeners):
            try:
                sent += listener(header, text)
            except Exception:  # one socket's failure must not cost the others this event
                log.exception("event listener failed", extra={"topic": topic})
        # Counted once per event, not once per socket: a Prometheus inc() per socket and frame
        # was a fifth of the fan-out's CPU.
        if sent and self._counted is not None:
            self._counted(header.type, sent)


def _made(entry: _Topic) -> None:
    """The Broker subscription of `entry` is made, or failed: wake whoever joined meanwhile."""
    subscribing, entry.subscribing = entry.subscribing, None
    if subscribing is not None:
        subscribing.set_result(None)
