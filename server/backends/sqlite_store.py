"""SqliteStore: the embedded default Store, on one SQLite file that several server processes on
one host may share.

Every read-then-write runs inside `BEGIN IMMEDIATE`, which takes SQLite's single write lock
up front, so a compare-and-set is atomic across processes and not only across coroutines.
Each process keeps one connection; an asyncio.Lock keeps one transaction at a time on it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Collection, Iterable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar, cast

import aiosqlite
import msgspec

from yardmaster.protocol.jobs import LEASED_STATES
from yardmaster.server.backends import logcap
from yardmaster.server.backends.base import BackendUnavailable
from yardmaster.server.backends.documents import apply_changes, from_json, job_changes, matches, to_json
from yardmaster.protocol.messages import Stream
from yardmaster.server.backends.records import AgentRecord, ApiKeyRecord, AppendResult, JobRecord, LogEntry
from yardmaster.server.backends.stores import ensure_private_dir, ensure_private_file

SCHEMA_VERSION = 1

R = TypeVar("R", ApiKeyRecord, AgentRecord)
BUSY_TIMEOUT_MS = 30_000
_LEASED = tuple(sorted(LEASED_STATES))
_LEASED_SQL = ",".join("?" * len(_LEASED))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_owner ON api_keys (owner, id);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    agent_id TEXT,
    lease_expires_at REAL,
    deadline REAL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_agent ON jobs (agent_id, state);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (state, lease_expires_at);
CREATE INDEX IF NOT EXISTS jobs_deadline ON jobs (state, deadline);
CREATE TABLE IF NOT EXISTS logs (
    job_id TEXT NOT NULL,
    "offset" INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    data BLOB NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (job_id, "offset"),
    UNIQUE (job_id, attempt, seq)
);
CREATE TABLE IF NOT EXISTS log_stats (job_id TEXT PRIMARY KEY, stats TEXT NOT NULL);
"""

_JOB_COLUMNS = "id, owner, state, agent_id, lease_expires_at, deadline, doc"


def _doc(rec: Any) -> str:
    return to_json(rec).decode()


def _job_row(rec: JobRecord) -> tuple[Any, ...]:
    return (rec.id, rec.owner, rec.state, rec.agent_id, rec.lease_expires_at, rec.deadline, _doc(rec))


class SqliteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        ensure_private_dir(os.path.dirname(os.path.abspath(self.path)))
        # SQLite gives the -wal, -shm and -journal files it creates the main file's mode, so a
        # 0600 main file keeps them private; files left by an older version are fixed here.
        for suffix in ("", "-wal", "-shm", "-journal"):
            ensure_private_file(self.path + suffix, create=suffix == "")
        try:
            pending = aiosqlite.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
            # aiosqlite's worker thread is not a daemon: a process that dies without close() would
            # hang at exit. SQLite rolls back an interrupted transaction, so a daemon is safe.
            thread = getattr(pending, "_thread", None)
            if thread is not None:
                thread.daemon = True
            db = await pending
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"SQLite store at {self.path}: {exc}") from exc
        self._db = db
        await db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        async with self._write() as tx:
            await tx.executescript_in_tx(_SCHEMA)
            version = await tx.meta("schema_version")
            if version is None:
                await tx.set_meta("schema_version", SCHEMA_VERSION)
            elif version > SCHEMA_VERSION:
                raise BackendUnavailable(
                    f"SQLite store at {self.path} has schema version {version}; this server knows {SCHEMA_VERSION}"
                )

    async def close(self) -> None:
        if self._db is not None:
            async with self._lock:
                await self._db.close()
                self._db = None

    async def ping(self) -> None:
        try:
            await self._fetchone("SELECT 1")
        except (sqlite3.Error, ValueError, RuntimeError) as exc:
            raise BackendUnavailable(f"SQLite store at {self.path}: {exc}") from exc

    # -- plumbing ---------------------------------------------------------------------------------
    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise BackendUnavailable(f"SQLite store at {self.path} is not started")
        return self._db

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[_Tx]:
        async with self._lock:
            db = self._conn()
            await _run_to_end(db.execute("BEGIN IMMEDIATE"))
            try:
                yield _Tx(db)
                await _run_to_end(db.execute("COMMIT"))
            except BaseException:
                with suppress(sqlite3.Error):  # "no transaction is active" after a failed COMMIT
                    await _run_to_end(db.execute("ROLLBACK"))
                raise

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            async with self._conn().execute(sql, tuple(params)) as cur:
                return list(await cur.fetchall())

    async def _fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    # -- API keys ---------------------------------------------------------------------------------
    async def put_api_key(self, rec: ApiKeyRecord) -> None:
        async with self._write() as tx:
            await tx.execute(
                "INSERT INTO api_keys (id, token_hash, owner, doc) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET token_hash=excluded.token_hash, owner=excluded.owner, doc=excluded.doc",
                (rec.id, rec.token_hash, rec.owner, _doc(rec)),
            )

    async def get_api_key_by_hash(self, token_hash: str) -> ApiKeyRecord | None:
        row = await self._fetchone("SELECT doc FROM api_keys WHERE token_hash = ?", (token_hash,))
        return from_json(row[0], ApiKeyRecord) if row else None

    async def list_api_keys(self, owner: str | None = None) -> list[ApiKeyRecord]:
        if owner is None:
            rows = await self._fetchall("SELECT doc FROM api_keys ORDER BY id")
        else:
            rows = await self._fetchall("SELECT doc FROM api_keys WHERE owner = ? ORDER BY id", (owner,))
        return [from_json(r[0], ApiKeyRecord) for r in rows]

    async def revoke_api_key(self, key_id: str, at: float) -> ApiKeyRecord | None:
        return await self._revoke("api_keys", ApiKeyRecord, key_id, at)

    async def _revoke(self, table: str, cls: type[R], key: str, at: float) -> R | None:
        """Set revoked_at once; a second revoke keeps the first time."""
        async with self._write() as tx:
            rec = await tx.load(table, key, cls)
            if rec is None or rec.revoked_at is not None:
                return rec  # type: ignore[no-any-return]
            rec = apply_changes(rec, {"revoked_at": at})
            await tx.execute(f"UPDATE {table} SET doc = ? WHERE id = ?", (_doc(rec), key))
            return rec  # type: ignore[no-any-return]

    async def touch_api_key(self, key_id: str, at: float) -> None:
        async with self._write() as tx:
            rec = await tx.load("api_keys", key_id, ApiKeyRecord)
            if rec is None or (rec.last_used_at is not None and rec.last_used_at >= at):
                return
            rec = apply_changes(rec, {"last_used_at": at})
            await tx.execute("UPDATE api_keys SET doc = ? WHERE id = ?", (_doc(rec), key_id))

    # -- agents -----------------------------------------------------------------------------------
    async def put_agent(self, rec: AgentRecord) -> None:
        async with self._write() as tx:
            await tx.execute(
                "INSERT INTO agents (id, token_hash, doc) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET token_hash=excluded.token_hash, doc=excluded.doc",
                (rec.id, rec.token_hash, _doc(rec)),
            )

    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        row = await self._fetchone("SELECT doc FROM agents WHERE id = ?", (agent_id,))
        return from_json(row[0], AgentRecord) if row else None

    async def get_agent_by_token_hash(self, token_hash: str) -> AgentRecord | None:
        row = await self._fetchone("SELECT doc FROM agents WHERE token_hash = ?", (token_hash,))
        return from_json(row[0], AgentRecord) if row else None

    async def list_agents(self) -> list[AgentRecord]:
        rows = await self._fetchall("SELECT doc FROM agents ORDER BY id")
        return [from_json(r[0], AgentRecord) for r in rows]

    async def update_agent(self, agent_id: str, changes: Mapping[str, Any]) -> AgentRecord | None:
        if "id" in changes:
            raise ValueError("an agent's id cannot change")
        async with self._write() as tx:
            rec = await tx.load("agents", agent_id, AgentRecord)
            if rec is None:
                return None
            rec = apply_changes(rec, changes)
            await tx.execute(
                "UPDATE agents SET token_hash = ?, doc = ? WHERE id = ?", (rec.token_hash, _doc(rec), agent_id)
            )
            return rec

    async def revoke_agent(self, agent_id: str, at: float) -> AgentRecord | None:
        return await self._revoke("agents", AgentRecord, agent_id, at)

    # -- jobs -------------------------------------------------------------------------------------
    async def create_job(self, rec: JobRecord) -> None:
        try:
            async with self._write() as tx:
                await tx.execute(f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", _job_row(rec))
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"job {rec.id!r} already exists") from exc

    async def get_job(self, job_id: str) -> JobRecord | None:
        row = await self._fetchone("SELECT doc FROM jobs WHERE id = ?", (job_id,))
        return from_json(row[0], JobRecord) if row else None

    async def list_jobs(
        self,
        *,
        owner: str | None = None,
        states: Collection[str] | None = None,
        agent_id: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> list[JobRecord]:
        where: list[str] = []
        params: list[Any] = []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if states is not None:
            states = list(states)
            if not states:
                return []
            where.append(f"state IN ({','.join('?' * len(states))})")
            params.extend(states)
        if agent_id is not None:
            where.append("agent_id = ?")
            params.append(agent_id)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        sql = "SELECT doc FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(max(0, limit))
        rows = await self._fetchall(sql, params)
        return [from_json(r[0], JobRecord) for r in rows]

    async def update_job(
        self,
        job_id: str,
        *,
        expect_states: Collection[str],
        expect_attempt: int | None = None,
        fence_epoch: int | None = None,
        changes: Mapping[str, Any],
    ) -> JobRecord | None:
        changes = job_changes(changes, fence_epoch)
        async with self._write() as tx:
            if fence_epoch is not None and fence_epoch < (await tx.meta("fence_epoch") or 0):
                return None
            rec = await tx.load("jobs", job_id, JobRecord)
            if rec is None or not matches(rec, expect_states, expect_attempt):
                return None
            rec = apply_changes(rec, changes)
            await tx.execute(
                "UPDATE jobs SET owner = ?, state = ?, agent_id = ?, lease_expires_at = ?, deadline = ?, doc = ? "
                "WHERE id = ?",
                (*_job_row(rec)[1:], job_id),
            )
            if fence_epoch is not None:
                await tx.max_meta("fence_epoch", fence_epoch)
            return rec

    async def advance_fence(self, epoch: int) -> int:
        async with self._write() as tx:
            return await tx.max_meta("fence_epoch", epoch)

    async def jobs_with_expired_leases(self, now: float, limit: int = 100) -> list[JobRecord]:
        rows = await self._fetchall(
            f"SELECT doc FROM jobs WHERE state IN ({_LEASED_SQL}) AND lease_expires_at < ? "
            "ORDER BY lease_expires_at LIMIT ?",
            (*_LEASED, now, limit),
        )
        return [from_json(r[0], JobRecord) for r in rows]

    async def jobs_past_deadline(self, now: float, limit: int = 100) -> list[JobRecord]:
        rows = await self._fetchall(
            f"SELECT doc FROM jobs WHERE state IN ({_LEASED_SQL}) AND deadline < ? ORDER BY deadline LIMIT ?",
            (*_LEASED, now, limit),
        )
        return [from_json(r[0], JobRecord) for r in rows]

    async def count_jobs_by_state(self) -> dict[str, int]:
        rows = await self._fetchall("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {r[0]: int(r[1]) for r in rows}

    async def active_job_counts(self) -> dict[str, int]:
        rows = await self._fetchall(
            f"SELECT agent_id, COUNT(*) FROM jobs WHERE state IN ({_LEASED_SQL}) AND agent_id IS NOT NULL "
            "GROUP BY agent_id",
            _LEASED,
        )
        return {r[0]: r[1] for r in rows}

    async def renew_leases(self, agent_id: str, jobs: Collection[tuple[str, int]], until: float) -> list[str]:
        renewed: list[str] = []
        if not jobs:
            return renewed
        async with self._write() as tx:
            for job_id, attempt in jobs:
                rec = await tx.load("jobs", job_id, JobRecord)
                if rec is None or rec.agent_id != agent_id or not matches(rec, LEASED_STATES, attempt):
                    continue
                if rec.lease_expires_at is None or rec.lease_expires_at < until:
                    rec = apply_changes(rec, {"lease_expires_at": until})
                    await tx.execute(
                        "UPDATE jobs SET lease_expires_at = ?, doc = ? WHERE id = ?",
                        (rec.lease_expires_at, _doc(rec), job_id),
                    )
                renewed.append(job_id)
        return renewed

    # -- logs -------------------------------------------------------------------------------------
    async def append_log(
        self, job_id: str, attempt: int, seq: int, stream: str, data: bytes, ts: float, cap_bytes: int = 0
    ) -> AppendResult:
        async with self._write() as tx:
            if await tx.fetchone("SELECT 1 FROM jobs WHERE id = ?", (job_id,)) is None:
                return AppendResult(entry=None, acked_seq=-1)
            acked = await tx.acked_seq(job_id, attempt)
            if seq != acked + 1:
                return AppendResult(entry=None, acked_seq=acked)
            row = await tx.fetchone('SELECT MAX("offset") FROM logs WHERE job_id = ?', (job_id,))
            offset = 0 if row is None or row[0] is None else row[0] + 1
            entry = LogEntry(
                job_id=job_id, offset=offset, attempt=attempt, seq=seq, stream=cast(Stream, stream), data=bytes(data), ts=ts
            )
            await tx.execute(
                'INSERT INTO logs (job_id, "offset", attempt, seq, stream, data, ts) VALUES (?, ?, ?, ?, ?, ?, ?)',
                (job_id, offset, attempt, seq, stream, entry.data, ts),
            )
            await self._apply_log_cap(tx, job_id, offset, len(entry.data), cap_bytes)
            return AppendResult(entry=entry, acked_seq=seq)

    async def _apply_log_cap(self, tx: _Tx, job_id: str, offset: int, size: int, cap: int) -> None:
        row = await tx.fetchone("SELECT stats FROM log_stats WHERE job_id = ?", (job_id,))
        stats = logcap.account(msgspec.json.decode(row[0], type=logcap.LogStats) if row else logcap.LogStats(), offset, size, cap)
        need = logcap.excess(stats, cap)
        while need > 0 and stats.head_end is not None:
            rows = await tx.fetchall(
                'SELECT "offset", length(data) FROM logs WHERE job_id = ? AND "offset" > ? ORDER BY "offset" LIMIT 256',
                (job_id, stats.head_end),
            )
            drops = logcap.choose_drops([(r[0], r[1]) for r in rows], need, offset)
            if not drops:
                break
            await tx.execute(
                'DELETE FROM logs WHERE job_id = ? AND "offset" >= ? AND "offset" <= ?', (job_id, drops[0][0], drops[-1][0])
            )
            stats = logcap.dropped(stats, drops)
            need = logcap.excess(stats, cap)
        await tx.execute(
            "INSERT INTO log_stats (job_id, stats) VALUES (?, ?) ON CONFLICT (job_id) DO UPDATE SET stats = excluded.stats",
            (job_id, msgspec.json.encode(stats).decode()),
        )

    async def log_dropped_bytes(self, job_id: str) -> int:
        row = await self._fetchone("SELECT stats FROM log_stats WHERE job_id = ?", (job_id,))
        return 0 if row is None else msgspec.json.decode(row[0], type=logcap.LogStats).dropped_bytes

    async def read_logs(self, job_id: str, from_offset: int = 0, limit: int = 1000) -> list[LogEntry]:
        rows = await self._fetchall(
            'SELECT "offset", attempt, seq, stream, data, ts FROM logs WHERE job_id = ? AND "offset" >= ? '
            'ORDER BY "offset" LIMIT ?',
            (job_id, from_offset, max(0, limit)),
        )
        return [
            LogEntry(job_id=job_id, offset=r[0], attempt=r[1], seq=r[2], stream=cast(Stream, r[3]), data=bytes(r[4]), ts=r[5])
            for r in rows
        ]

    async def acked_seq(self, job_id: str, attempt: int) -> int:
        row = await self._fetchone("SELECT MAX(seq) FROM logs WHERE job_id = ? AND attempt = ?", (job_id, attempt))
        return -1 if row is None or row[0] is None else int(row[0])

    async def next_log_offset(self, job_id: str) -> int:
        row = await self._fetchone('SELECT MAX("offset") FROM logs WHERE job_id = ?', (job_id,))
        return 0 if row is None or row[0] is None else int(row[0]) + 1


async def _run_to_end(aw: Awaitable[Any]) -> None:
    """Await a statement to completion even if we are cancelled meanwhile, then re-raise the
    cancel: a BEGIN or COMMIT still runs on aiosqlite's thread after its awaiter is cancelled,
    and the lock must not be released while the connection is in an unknown state."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and task.cancelled():
                raise
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


class _Tx:
    """Statements inside one open IMMEDIATE transaction (the store's lock is held)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> None:
        await self._db.execute(sql, tuple(params))

    async def executescript_in_tx(self, script: str) -> None:
        # executescript() would COMMIT first; run the statements one by one instead.
        for statement in script.split(";"):
            if statement.strip():
                await self._db.execute(statement)

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        async with self._db.execute(sql, tuple(params)) as cur:
            return await cur.fetchone()

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._db.execute(sql, tuple(params)) as cur:
            return list(await cur.fetchall())

    async def load(self, table: str, key: str, cls: type[Any]) -> Any:
        row = await self.fetchone(f"SELECT doc FROM {table} WHERE id = ?", (key,))
        return from_json(row[0], cls) if row else None

    async def meta(self, key: str) -> int | None:
        row = await self.fetchone("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else int(row[0])

    async def set_meta(self, key: str, value: int) -> None:
        await self.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def max_meta(self, key: str, value: int) -> int:
        current = await self.meta(key)
        if current is None or value > current:
            await self.set_meta(key, value)
            return value
        return current

    async def acked_seq(self, job_id: str, attempt: int) -> int:
        row = await self.fetchone("SELECT MAX(seq) FROM logs WHERE job_id = ? AND attempt = ?", (job_id, attempt))
        return -1 if row is None or row[0] is None else int(row[0])
