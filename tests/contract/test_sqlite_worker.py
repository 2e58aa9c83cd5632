"""SqliteWorker: whole transactions on one database thread, with group commit."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from yardmaster.server.backends.sqlite_worker import SqliteWorker


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[SqliteWorker]:
    w = SqliteWorker(str(tmp_path / "w.db"), busy_timeout_ms=5000, pragmas=("PRAGMA foreign_keys=ON",))
    await w.start()
    await w.write(lambda db: db.execute("CREATE TABLE t (k TEXT PRIMARY KEY)"))
    # A parent table with a deferred foreign key: a bad insert passes, and its COMMIT fails.
    await w.write(lambda db: db.execute("CREATE TABLE p (k TEXT PRIMARY KEY)"))
    await w.write(
        lambda db: db.execute("CREATE TABLE c (k TEXT REFERENCES p (k) DEFERRABLE INITIALLY DEFERRED)")
    )
    yield w
    await w.close()


class Blocker:
    """Holds the database thread inside a read until released, so that calls queue up and the
    thread then finds them all waiting at once. Records the statements the connection runs."""

    def __init__(self, worker: SqliteWorker) -> None:
        self.worker = worker
        self.running = threading.Event()
        self.release = threading.Event()
        self.statements: list[str] = []
        self.task: asyncio.Task[None] | None = None

    def _hold(self, db: sqlite3.Connection) -> None:
        db.set_trace_callback(self.statements.append)
        self.running.set()
        self.release.wait(10)

    async def __aenter__(self) -> Blocker:
        self.task = asyncio.ensure_future(self.worker.read(self._hold))
        assert await asyncio.to_thread(self.running.wait, 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.task is not None
        await self.task


def _insert(key: str) -> Callable[[sqlite3.Connection], str]:
    def run(db: sqlite3.Connection) -> str:
        db.execute("INSERT INTO t (k) VALUES (?)", (key,))
        return key

    return run


async def _keys(worker: SqliteWorker, table: str = "t") -> list[str]:
    rows = await worker.read(lambda db: db.execute(f"SELECT k FROM {table} ORDER BY k").fetchall())
    return [r[0] for r in rows]


async def test_waiting_writes_share_one_commit_and_a_failing_one_rolls_back_alone(worker: SqliteWorker) -> None:
    def insert_then_fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t (k) VALUES ('b')")
        raise RuntimeError("b failed after writing")

    async with Blocker(worker) as blocker:
        calls = [
            asyncio.ensure_future(worker.write(_insert("a"))),
            asyncio.ensure_future(worker.write(insert_then_fail)),
            asyncio.ensure_future(worker.write(_insert("c"))),
            asyncio.ensure_future(worker.write(_insert("a"))),  # a duplicate of the first
        ]
        await asyncio.sleep(0.05)  # let every call reach the queue
        assert not any(c.done() for c in calls)  # nothing is answered before its commit
    results = await asyncio.gather(*calls, return_exceptions=True)

    assert results[0] == "a" and results[2] == "c"
    assert isinstance(results[1], RuntimeError)
    assert isinstance(results[3], sqlite3.IntegrityError)
    assert await _keys(worker) == ["a", "c"]
    writes = [s for s in blocker.statements if s.split()[0] in ("BEGIN", "COMMIT", "ROLLBACK")]
    assert writes == ["BEGIN IMMEDIATE", "ROLLBACK TO item", "ROLLBACK TO item", "COMMIT"]


async def test_a_failed_commit_fails_every_write_of_the_group(worker: SqliteWorker) -> None:
    def orphan(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO c (k) VALUES ('no-parent')")  # checked at COMMIT

    async with Blocker(worker):
        calls = [
            asyncio.ensure_future(worker.write(_insert("x"))),
            asyncio.ensure_future(worker.write(orphan)),
        ]
        await asyncio.sleep(0.05)
    results = await asyncio.gather(*calls, return_exceptions=True)

    assert all(isinstance(r, sqlite3.IntegrityError) for r in results), results
    assert await _keys(worker) == [] and await _keys(worker, "c") == []
    assert await worker.write(_insert("y")) == "y"  # the connection is usable
    assert await _keys(worker) == ["y"]


async def test_a_single_failing_write_rolls_back(worker: SqliteWorker) -> None:
    def insert_then_fail(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO t (k) VALUES ('z')")
        raise ValueError("nope")

    with pytest.raises(ValueError):
        await worker.write(insert_then_fail)
    assert await _keys(worker) == []
    assert await worker.write(_insert("z")) == "z"


async def test_a_call_cancelled_before_it_runs_never_happens(worker: SqliteWorker) -> None:
    async with Blocker(worker):
        cancelled = asyncio.ensure_future(worker.write(_insert("gone")))
        kept = asyncio.ensure_future(worker.write(_insert("kept")))
        await asyncio.sleep(0.05)
        cancelled.cancel()
    assert await kept == "kept"
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await _keys(worker) == ["kept"]


async def test_a_read_that_fails_inside_its_own_snapshot_leaves_no_transaction(worker: SqliteWorker) -> None:
    def snapshot_then_fail(db: sqlite3.Connection) -> None:
        db.execute("BEGIN")
        db.execute("SELECT * FROM t").fetchall()
        raise LookupError("bad read")

    with pytest.raises(LookupError):
        await worker.read(snapshot_then_fail)
    assert await worker.write(_insert("after")) == "after"


async def test_close_finishes_queued_calls_then_refuses_new_ones(worker: SqliteWorker) -> None:
    queued = [asyncio.ensure_future(worker.write(_insert(f"k{n}"))) for n in range(20)]
    await asyncio.sleep(0)  # the calls are queued before close()
    await worker.close()
    assert [await q for q in queued] == [f"k{n}" for n in range(20)]
    with pytest.raises(RuntimeError):
        await worker.read(lambda db: None)


async def test_an_unopenable_file_fails_start(tmp_path: Path) -> None:
    w = SqliteWorker(str(tmp_path / "no" / "such" / "dir.db"), busy_timeout_ms=100)
    with pytest.raises(sqlite3.OperationalError):
        await w.start()
