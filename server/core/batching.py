"""Group sending for Broker calls that many callers make at once (publishes, enqueues): while
one round trip is on the wire, whatever other callers add waits and goes out together in the
next one. A lone caller sends at once; nothing waits for a timer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

log = logging.getLogger("yardmaster.batching")


class Coalescer(Generic[T]):
    """`add(items)` returns once `send` has had its items (in one call with others' when a send
    was in flight). `send` must handle its own errors: one it raises is logged, not returned."""

    def __init__(self, send: Callable[[Sequence[T]], Awaitable[None]], name: str) -> None:
        self._send = send
        self._name = name
        self._busy = False
        self._pending: list[T] = []
        self._pending_sent: asyncio.Future[None] | None = None
        self._drainer: asyncio.Task[None] | None = None

    async def add(self, items: Sequence[T]) -> None:
        if self._busy:
            self._pending.extend(items)
            if self._pending_sent is None:
                self._pending_sent = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._pending_sent)
            return
        self._busy = True
        try:
            await self._send_logged(items)
        finally:
            if self._pending:
                # Those who queued meanwhile go out in a task, so this caller is not held up by
                # later callers' round trips.
                self._drainer = asyncio.create_task(self._drain(), name=f"coalesce-{self._name}")
            else:
                self._busy = False

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                sent, self._pending_sent = self._pending_sent, None
                try:
                    await self._send_logged(batch)
                finally:
                    if sent is not None and not sent.done():
                        sent.set_result(None)
        finally:
            self._busy = False
            self._pending = []  # only left over when cancelled at shutdown
            if self._pending_sent is not None and not self._pending_sent.done():
                self._pending_sent.set_result(None)  # cancelled at shutdown: release the waiters
            self._pending_sent = None

    async def _send_logged(self, items: Sequence[T]) -> None:
        try:
            await self._send(items)
        except Exception:
            log.exception("batched send failed", extra={"batch": self._name, "items": len(items)})

    async def close(self) -> None:
        if self._drainer is not None and not self._drainer.done():
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)
