"""MemoryBroker: the embedded, one-process Broker (asyncio only, no threads).

Also home of `QueueSubscription`, the bounded per-subscription buffer that RedisBroker reuses.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Collection, Sequence

from yardmaster.server.backends.base import BAND_SIZE, QueueEntry, RateCheck, RateDecision, priority_band, queue_score
from yardmaster.server.backends.fair_queue import next_tag
from yardmaster.server.security.gcra import combine, gcra

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
        self._owners: dict[str, str] = {}  # queued job id -> owner
        self._queued: dict[str, int] = {}  # owner -> queued entries
        self._last_tags: dict[str, dict[int, int]] = {}  # fair-share group -> band -> its last tag
        self._band_max: dict[int, int] = {}  # band -> highest tag given in it
        self._rates: dict[str, float] = {}  # bucket -> TAT (ms, monotonic clock)
        self._slots: dict[str, dict[str, float]] = {}  # name -> member -> expires at (monotonic)
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
    def _add(self, entry: QueueEntry, front: bool) -> None:
        band = priority_band(entry.priority)
        i = bisect.bisect_left(self._queue, (band * BAND_SIZE, ""))
        head = self._queue[i] if i < len(self._queue) else None
        head_tag = int(head[0]) - band * BAND_SIZE if head is not None and head[0] < (band + 1) * BAND_SIZE else None
        last = self._last_tags.get(entry.share, {})
        tag = next_tag(head_tag, self._band_max.get(band, 0), last.get(band, 0), front)
        if not front:
            self._last_tags.setdefault(entry.share, {})[band] = tag
        self._band_max[band] = max(self._band_max.get(band, 0), tag)
        score = queue_score(entry.priority, tag)
        self._scores[entry.job_id] = score
        self._owners[entry.job_id] = entry.owner
        self._queued[entry.owner] = self._queued.get(entry.owner, 0) + 1
        bisect.insort(self._queue, (score, entry.job_id))

    async def enqueue_many(self, entries: Sequence[QueueEntry], *, front: bool = False) -> None:
        for entry in entries:
            if entry.job_id not in self._scores:
                self._add(entry, front)

    async def admit_many(self, batches: Sequence[Sequence[QueueEntry]], quota: int) -> list[bool]:
        admitted: list[bool] = []
        for batch in batches:
            new = [e for e in dict((e.job_id, e) for e in batch).values() if e.job_id not in self._scores]
            if quota > 0:
                per_owner: dict[str, int] = {}
                for entry in new:
                    per_owner[entry.owner] = per_owner.get(entry.owner, 0) + 1
                if any(self._queued.get(owner, 0) + n > quota for owner, n in per_owner.items()):
                    admitted.append(False)
                    continue
            for entry in new:
                self._add(entry, False)
            admitted.append(True)
        return admitted

    async def queued_count(self, owner: str) -> int:
        return self._queued.get(owner, 0)

    async def peek(self, limit: int) -> list[str]:
        return [job_id for _, job_id in self._queue[: max(0, limit)]]

    async def remove(self, job_id: str) -> bool:
        score = self._scores.pop(job_id, None)
        if score is None:
            return False
        i = bisect.bisect_left(self._queue, (score, job_id))
        del self._queue[i]
        owner = self._owners.pop(job_id)
        left = self._queued[owner] - 1
        if left:
            self._queued[owner] = left
        else:
            del self._queued[owner]
            self._last_tags.pop(owner, None)  # a group with nothing queued starts at the next round
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

    # -- rate limits and slots -------------------------------------------------------------------
    async def rate_limit(self, checks: Sequence[RateCheck]) -> list[RateDecision]:
        now = time.monotonic() * 1000
        decisions = []
        for check in checks:
            verdicts = [gcra(self._rates.get(b), now, check.limit, check.period_ms, check.cost) for b in check.buckets]
            allowed, remaining, retry, reset = combine(verdicts)
            if allowed:
                for bucket, verdict in zip(check.buckets, verdicts, strict=True):
                    self._rates[bucket] = verdict.tat_ms
            decisions.append(RateDecision(allowed, remaining, retry, reset))
        if len(self._rates) > 10_000:  # a bucket whose TAT has passed is full: the same as none
            self._rates = {k: tat for k, tat in self._rates.items() if tat > now}
        return decisions

    def _held(self, name: str) -> dict[str, float]:
        held = self._slots.get(name, {})
        now = time.monotonic()
        for member in [m for m, expires_at in held.items() if expires_at <= now]:
            del held[member]
        return held

    async def acquire_slot(self, name: str, member: str, limit: int, ttl_ms: int) -> bool:
        held = self._held(name)
        if member not in held and len(held) >= limit:
            return False
        self._slots[name] = held
        held[member] = time.monotonic() + ttl_ms / 1000
        return True

    async def renew_slots(self, slots: Collection[tuple[str, str]], ttl_ms: int) -> None:
        expires_at = time.monotonic() + ttl_ms / 1000
        for name, member in slots:
            held = self._held(name)
            if member in held:
                held[member] = expires_at

    async def release_slot(self, name: str, member: str) -> None:
        held = self._slots.get(name)
        if held is not None:
            held.pop(member, None)
            if not held:
                del self._slots[name]

    async def count_slots(self, name: str) -> int:
        return len(self._held(name))

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
