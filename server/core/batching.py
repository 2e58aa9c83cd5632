"""Group sending for Broker calls that many callers make at once (publishes, enqueues): while
one round trip is on the wire, whatever other callers add waits and goes out together in the
next one. A lone caller sends at once; nothing waits for a timer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

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


class Batcher(Generic[T, R]):
    """`call(item)` returns `send`'s result for that item. Like Coalescer, a lone caller sends at
    once and callers that come while a send is on the wire go out together in the next one; an
    exception of `send` is raised to every caller of that batch."""

    def __init__(self, send: Callable[[Sequence[T]], Awaitable[Sequence[R]]], name: str) -> None:
        self._send = send
        self._name = name
        self._busy = False
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def call(self, item: T) -> R:
        if self._busy:
            future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
            self._pending.append((item, future))
            return await asyncio.shield(future)
        self._busy = True
        try:
            return (await self._send([item]))[0]
        finally:
            if self._pending:
                self._drainer = asyncio.create_task(self._drain(), name=f"batch-{self._name}")
            else:
                self._busy = False

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await self._send([item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - each caller gets it
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            self._busy = False
            for _, future in self._pending:  # only left over when cancelled at shutdown
                future.cancel()
            self._pending = []

    async def close(self) -> None:
        if self._drainer is not None and not self._drainer.done():
            self._drainer.cancel()
            await asyncio.gather(self._drainer, return_exceptions=True)
