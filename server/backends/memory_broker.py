"""MemoryBroker: the embedded, one-process Broker (asyncio only, no threads).

Also home of `QueueSubscription`, the bounded per-subscription buffer that RedisBroker reuses.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Collection, Sequence

from yardmaster.server.backends.base import queue_score

DEFAULT_SUBSCRIPTION_BUFFER = 10_000
"""Messages a subscription may hold unread. A subscriber that falls this far behind is dropped
(its iterator raises SubscriptionDropped) so that a slow consumer never blocks publishers."""


class SubscriptionDropped(Exception):
    """The subscriber fell `buffer` messages behind and was dropped; it missed messages and
    must recover from the Store."""


class QueueSubscription:
    """Messages of one channel, buffered in a bounded queue, in publish order.

    Iterating stops after close(); raises SubscriptionDropped after an overflow.
    """

    def __init__(
        self,
        channel: str,
        buffer: int,
        on_detach: Callable[[QueueSubscription], None],
        on_close: Callable[[QueueSubscription], object] | None = None,
    ) -> None:
        self.channel = channel
        self._buffer = buffer
        # Unbounded so that the close marker always fits; the bound is enforced in deliver().
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._closed = False
        self._dropped = False
        self._on_detach = on_detach
        self._on_close = on_close

    @property
    def closed(self) -> bool:
        return self._closed

    def deliver(self, data: bytes) -> None:
        if self._closed:
            return
        if self._queue.qsize() >= self._buffer:
            self._dropped = True
            self._finish()
            return
        self._queue.put_nowait(data)

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)  # wakes a reader blocked in get()
            self._on_detach(self)

    def __aiter__(self) -> QueueSubscription:
        return self

    async def __anext__(self) -> bytes:
        if self._dropped:
            raise SubscriptionDropped(f"subscription to {self.channel!r} fell {self._buffer} messages behind")
        if self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            if self._dropped:
                raise SubscriptionDropped(f"subscription to {self.channel!r} fell {self._buffer} messages behind")
            raise StopAsyncIteration
        return item

    async def close(self) -> None:
        if self._closed:
            return
        self._finish()
        if self._on_close is not None:
            result = self._on_close(self)
            if asyncio.iscoroutine(result):
                await result

    def close_nowait(self) -> None:
        """Stop iteration without notifying the broker (the broker itself is closing)."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)


class MemoryBroker:
    """Everything lives in this process; TTLs use the monotonic clock."""

    def __init__(self, *, subscription_buffer: int = DEFAULT_SUBSCRIPTION_BUFFER) -> None:
        self._buffer = subscription_buffer
        self._queue: list[tuple[float, str]] = []  # sorted (score, job_id), like a Redis zset
        self._scores: dict[str, float] = {}
        self._locks: dict[str, tuple[str, float]] = {}  # name -> (owner, expires_at)
        self._epochs: dict[str, int] = {}
        self._presence: dict[str, dict[str, tuple[str, float]]] = {}
        self._counters: dict[str, tuple[int, float]] = {}  # name -> (value, expires_at)
        self._subs: dict[str, set[QueueSubscription]] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.close_nowait()
        self._subs.clear()

    async def ping(self) -> None:
        pass

    # -- job queue ---------------------------------------------------------------------------
    async def enqueue(self, job_id: str, priority: int, enqueued_at: float) -> None:
        if job_id in self._scores:
            return
        score = queue_score(priority, enqueued_at)
        self._scores[job_id] = score
        bisect.insort(self._queue, (score, job_id))

    async def enqueue_many(self, items: Collection[tuple[str, int, float]]) -> None:
        for job_id, priority, enqueued_at in items:
            await self.enqueue(job_id, priority, enqueued_at)

    async def peek(self, limit: int) -> list[str]:
        return [job_id for _, job_id in self._queue[: max(0, limit)]]

    async def remove(self, job_id: str) -> bool:
        score = self._scores.pop(job_id, None)
        if score is None:
            return False
        i = bisect.bisect_left(self._queue, (score, job_id))
        del self._queue[i]
        return True

    async def remove_many(self, job_ids: Collection[str]) -> None:
        for job_id in job_ids:
            await self.remove(job_id)

    async def is_queued(self, job_id: str) -> bool:
        return job_id in self._scores

    async def queue_depth(self) -> int:
        return len(self._scores)

    # -- leader lock ---------------------------------------------------------------------------
    def _holder(self, name: str) -> str | None:
        entry = self._locks.get(name)
        if entry is None:
            return None
        if entry[1] <= time.monotonic():
            del self._locks[name]
            return None
        return entry[0]

    async def acquire_lock(self, name: str, owner: str, ttl_ms: int) -> int | None:
        if self._holder(name) is not None:
            return None
        self._locks[name] = (owner, time.monotonic() + ttl_ms / 1000)
        epoch = self._epochs.get(name, 0) + 1
        self._epochs[name] = epoch
        return epoch

    async def raise_epoch(self, name: str, floor: int) -> int:
        self._epochs[name] = max(self._epochs.get(name, 0), floor)
        return self._epochs[name]

    async def renew_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        if self._holder(name) != owner:
            return False
        self._locks[name] = (owner, time.monotonic() + ttl_ms / 1000)
        return True

    async def release_lock(self, name: str, owner: str) -> bool:
        if self._holder(name) != owner:
            return False
        del self._locks[name]
        return True

    async def lock_holder(self, name: str) -> tuple[str | None, int]:
        return self._holder(name), self._epochs.get(name, 0)

    # -- presence ------------------------------------------------------------------------------
    async def set_presence(self, kind: str, member: str, value: str, ttl_ms: int) -> None:
        self._presence.setdefault(kind, {})[member] = (value, time.monotonic() + ttl_ms / 1000)

    async def get_presence(self, kind: str, member: str) -> str | None:
        entries = self._presence.get(kind)
        if not entries or member not in entries:
            return None
        value, expires_at = entries[member]
        if expires_at <= time.monotonic():
            del entries[member]
            return None
        return value

    async def list_presence(self, kind: str) -> dict[str, str]:
        entries = self._presence.get(kind)
        if not entries:
            return {}
        now = time.monotonic()
        for member in [m for m, (_, exp) in entries.items() if exp <= now]:
            del entries[member]
        return {member: value for member, (value, _) in entries.items()}

    async def delete_presence(self, kind: str, member: str, if_value: str | None = None) -> bool:
        current = await self.get_presence(kind, member)
        if current is None or (if_value is not None and current != if_value):
            return False
        del self._presence[kind][member]
        return True

    # -- counters ------------------------------------------------------------------------------
    async def incr_counter(self, name: str, ttl_ms: int, by: int = 1) -> int:
        now = time.monotonic()
        value, expires_at = self._counters.get(name, (0, 0.0))
        if expires_at <= now:
            value, expires_at = 0, now + ttl_ms / 1000
        self._counters[name] = (value + by, expires_at)
        if len(self._counters) > 10_000:  # expired counters are dropped now and then, not on a timer
            self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
        return value + by

    async def get_counter(self, name: str) -> int:
        value, expires_at = self._counters.get(name, (0, 0.0))
        return value if expires_at > time.monotonic() else 0

    async def delete_counter(self, name: str) -> None:
        self._counters.pop(name, None)

    # -- pub/sub -------------------------------------------------------------------------------
    async def publish(self, channel: str, data: bytes) -> None:
        for sub in list(self._subs.get(channel, ())):
            sub.deliver(data)

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        for channel, data in messages:
            await self.publish(channel, data)

    async def subscribe(self, channel: str) -> QueueSubscription:
        sub = QueueSubscription(channel, self._buffer, self._detach)
        self._subs.setdefault(channel, set()).add(sub)
        return sub

    def _detach(self, sub: QueueSubscription) -> None:
        subs = self._subs.get(sub.channel)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.channel]
