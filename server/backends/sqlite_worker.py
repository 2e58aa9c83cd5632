"""One thread that owns a SQLite connection and runs whole transactions for the event loop.

Each call hands the thread one synchronous function: a read runs as it is (SQLite gives each
statement its own snapshot; a function that needs several consistent reads opens its own
`BEGIN`), a write runs inside `BEGIN IMMEDIATE ... COMMIT`. So a Store method costs one hop to
the thread however many statements it runs.

Group commit: the writes the thread finds waiting when it wakes run in ONE `BEGIN IMMEDIATE`,
each in its own SAVEPOINT (a write that raises rolls back only itself), with one COMMIT; every
caller is answered only after that COMMIT, so nothing is acknowledged before it is committed.
Writes that waited together were concurrent, so running them in one transaction, in queue order,
is the same as running them one after another.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]

# The most writes one COMMIT carries: bounds how long the first of them waits for its answer.
MAX_GROUP = 128


@dataclass(slots=True)
class _Item(Generic[T]):
    fn: Work[T]
    write: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    outcome: tuple[bool, Any] | None = field(default=None)  # (ok, result or exception)


@dataclass(slots=True)
class _Stop:
    """close()'s marker: the thread answers `closed` after the items queued before it."""

    loop: asyncio.AbstractEventLoop
    closed: asyncio.Future[None]


class SqliteWorker:
    def __init__(self, path: str, *, busy_timeout_ms: int, pragmas: tuple[str, ...] = ()) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._pragmas = pragmas
        self._queue: queue.SimpleQueue[Any] | None = None

    async def start(self) -> None:
        """Open the connection on a new daemon thread; raises sqlite3.Error if it cannot be opened.
        A daemon, so a process that exits without close() is not held up: SQLite rolls back a
        transaction that a dying process left open."""
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        thread = threading.Thread(target=self._main, args=(jobs, loop, opened), name="ym-sqlite", daemon=True)
        thread.start()
        try:
            await opened
        except BaseException:
            jobs.put(_Stop(loop, loop.create_future()))  # a thread that did open must not linger
            raise
        self._queue = jobs

    async def close(self) -> None:
        """Finish every call already queued, then close the connection."""
        jobs, self._queue = self._queue, None
        if jobs is None:
            return
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()
        jobs.put(_Stop(loop, closed))
        await asyncio.shield(closed)

    async def read(self, fn: Work[T]) -> T:
        return await self._submit(fn, False)

    async def write(self, fn: Work[T]) -> T:
        """Run `fn` inside a write transaction; answered after its COMMIT."""
        return await self._submit(fn, True)

    async def _submit(self, fn: Work[T], write: bool) -> T:
        jobs = self._queue
        if jobs is None:
            raise RuntimeError("the SQLite connection is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        jobs.put(_Item(fn, write, loop, future))
        return await future

    # -- the thread -----------------------------------------------------------------------------
    def _main(self, jobs: queue.SimpleQueue[Any], loop: asyncio.AbstractEventLoop, opened: asyncio.Future[None]) -> None:
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=self._busy_timeout_ms / 1000, check_same_thread=True
            )
            try:
                for pragma in self._pragmas:
                    conn.execute(pragma).fetchall()
            except BaseException:
                conn.close()
                raise
        except Exception as exc:
            _answer(loop, [(opened, (False, exc))])
            return
        _answer(loop, [(opened, (True, None))])
        try:
            stop = self._serve(conn, jobs)
        finally:
            conn.close()
        _answer(stop.loop, [(stop.closed, (True, None))])

    def _serve(self, conn: sqlite3.Connection, jobs: queue.SimpleQueue[Any]) -> _Stop:
        while True:
            batch: list[_Item[Any]] = []
            stop: _Stop | None = None
            item = jobs.get()
            while True:
                if isinstance(item, _Stop):
                    stop = item
                    break
                # A call cancelled before the thread reached it is skipped: it never happened. One
                # cancelled later runs to the end; only its answer is lost.
                if not item.future.cancelled():
                    batch.append(item)
                if len(batch) >= MAX_GROUP:
                    break
                try:
                    item = jobs.get_nowait()
                except queue.Empty:
                    break
            # Reads first: they need no lock, so they need not wait for the writes' transaction.
            reads = [i for i in batch if not i.write]
            for r in reads:
                r.outcome = _run(r.fn, conn)
                if conn.in_transaction:  # a read that opened a snapshot and then raised
                    _rollback(conn)
            _flush(reads)
            writes = [i for i in batch if i.write]
            if writes:
                _commit_group(conn, writes)
                _flush(writes)
            if stop is not None:
                return stop


def _run(fn: Work[Any], conn: sqlite3.Connection) -> tuple[bool, Any]:
    try:
        return True, fn(conn)
    except Exception as exc:
        return False, exc


def _commit_group(conn: sqlite3.Connection, items: list[_Item[Any]]) -> None:
    """Run the writes in one transaction and set each item's outcome."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except Exception as exc:
        for item in items:
            item.outcome = (False, exc)
        return
    try:
        if len(items) == 1:
            items[0].outcome = _run(items[0].fn, conn)
            if not items[0].outcome[0]:
                conn.execute("ROLLBACK")
                return
        else:
            for item in items:
                conn.execute("SAVEPOINT item")
                item.outcome = _run(item.fn, conn)
                if not item.outcome[0]:
                    conn.execute("ROLLBACK TO item")
                conn.execute("RELEASE item")
        conn.execute("COMMIT")
    except Exception as exc:
        # The transaction as a whole failed (a failed COMMIT, or an error such as a full disk
        # that makes SQLite abandon it): none of its writes happened.
        _rollback(conn)
        for item in items:
            if item.outcome is None or item.outcome[0]:
                item.outcome = (False, exc)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _flush(items: list[_Item[Any]]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], tuple[bool, Any]]]] = {}
    for item in items:
        assert item.outcome is not None
        by_loop.setdefault(item.loop, []).append((item.future, item.outcome))
    for loop, answers in by_loop.items():
        _answer(loop, answers)


def _answer(loop: asyncio.AbstractEventLoop, answers: list[tuple[asyncio.Future[Any], tuple[bool, Any]]]) -> None:
    try:
        loop.call_soon_threadsafe(_resolve, answers)
    except RuntimeError:
        pass  # the loop is closed: nobody is waiting any more


def _resolve(answers: list[tuple[asyncio.Future[Any], tuple[bool, Any]]]) -> None:
    for future, (ok, value) in answers:
        if future.done():
            continue  # cancelled meanwhile
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
