"""SqliteStore: the embedded default Store, on one SQLite file that several server processes on
one host may share.

Each Store method is one synchronous function run on the store's database thread
(sqlite_worker.py): one hop from the event loop, whatever the number of statements. Writes run
inside `BEGIN IMMEDIATE`, which takes SQLite's single write lock up front, so a compare-and-set
(read, check, write in one transaction) is atomic across processes and not only across
coroutines; another process waiting for the lock waits up to BUSY_TIMEOUT_MS. Writes that queue
up together share one transaction (group commit); each caller is answered after the COMMIT.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar, cast

import msgspec

from yardmaster.protocol.jobs import LEASED_STATES
from yardmaster.protocol.messages import Stream
from yardmaster.server.backends import logcap
from yardmaster.server.backends.base import BackendUnavailable, Conflict, JobUpdate
from yardmaster.server.backends.documents import (
    apply_changes,
    check_increments,
    from_json,
    job_changes,
    matches,
    to_json,
    user_keys,
)
from yardmaster.server.backends.records import (
    AgentRecord,
    ApiKeyRecord,
    AppendResult,
    AuditRecord,
    JobRecord,
    LogEntry,
    RefreshTokenRecord,
    UserRecord,
)
from yardmaster.server.backends.sqlite_worker import SqliteWorker, Work
from yardmaster.server.backends.stores import ensure_private_dir, ensure_private_file

SCHEMA_VERSION = 2

T = TypeVar("T")
R = TypeVar("R", ApiKeyRecord, AgentRecord)
BUSY_TIMEOUT_MS = 30_000
# Per connection; WAL with synchronous=NORMAL: a COMMIT survives the process dying at any point.
_PRAGMAS = (f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}", "PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL")
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


def _migrate_to_2(db: sqlite3.Connection) -> None:
    """Users, their sign-in sessions and the audit trail."""
    for statement in (
        "CREATE TABLE users (id TEXT PRIMARY KEY, username_key TEXT NOT NULL UNIQUE, email_key TEXT UNIQUE, "
        "identity_key TEXT UNIQUE, doc TEXT NOT NULL)",
        "CREATE TABLE refresh_tokens (id TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, family_id TEXT NOT NULL, "
        "user_id TEXT NOT NULL, doc TEXT NOT NULL)",
        "CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id)",
        "CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id)",
        "CREATE TABLE audit (id TEXT PRIMARY KEY, at REAL NOT NULL, actor TEXT, action TEXT NOT NULL, doc TEXT NOT NULL)",
        "CREATE INDEX audit_actor ON audit (actor, id)",
        "CREATE INDEX audit_action ON audit (action, id)",
        "CREATE INDEX audit_at ON audit (at)",
    ):
        db.execute(statement)


# MIGRATIONS[n] takes a database at schema version n - 1 to version n, inside the transaction
# that records n. The schema above is version 1: a new file runs every migration.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {2: _migrate_to_2}
assert sorted(MIGRATIONS) == list(range(2, SCHEMA_VERSION + 1))

_JOB_COLUMNS = "id, owner, state, agent_id, lease_expires_at, deadline, doc"
_INSERT_JOB = f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"


def _doc(rec: Any) -> str:
    return to_json(rec).decode()


def _job_row(rec: JobRecord) -> tuple[Any, ...]:
    return (rec.id, rec.owner, rec.state, rec.agent_id, rec.lease_expires_at, rec.deadline, _doc(rec))


class SqliteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._worker: SqliteWorker | None = None
        # Hops to the database thread since construction (start() included): one per Store call
        # that touches the database. Kept for tests that bound the round trips of a job; a plain
        # int, free to read or reset.
        self.round_trips = 0

    # -- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        ensure_private_dir(os.path.dirname(os.path.abspath(self.path)))
        # SQLite gives the -wal, -shm and -journal files it creates the main file's mode, so a
        # 0600 main file keeps them private; files left by an older version are fixed here.
        for suffix in ("", "-wal", "-shm", "-journal"):
            ensure_private_file(self.path + suffix, create=suffix == "")
        worker = SqliteWorker(self.path, busy_timeout_ms=BUSY_TIMEOUT_MS, pragmas=_PRAGMAS)
        try:
            await worker.start()
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"SQLite store at {self.path}: {exc}") from exc
        self._worker = worker
        try:
            version = await self._write(_create_schema)
        except BaseException:
            await self.close()
            raise
        if version > SCHEMA_VERSION:
            await self.close()
            raise BackendUnavailable(
                f"SQLite store at {self.path} has schema version {version}; this server knows {SCHEMA_VERSION}"
            )

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.close()

    async def ping(self) -> None:
        try:
            await self._read(lambda db: db.execute("SELECT 1").fetchall())
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"SQLite store at {self.path}: {exc}") from exc

    # -- plumbing ---------------------------------------------------------------------------------
    def _running(self) -> SqliteWorker:
        if self._worker is None:
            raise BackendUnavailable(f"SQLite store at {self.path} is not started")
        return self._worker

    async def _read(self, fn: Work[T]) -> T:
        worker = self._running()
        self.round_trips += 1
        return await worker.read(fn)

    async def _write(self, fn: Work[T]) -> T:
        """Run `fn` in a write transaction (BEGIN IMMEDIATE ... COMMIT): all of it or nothing."""
        worker = self._running()
        self.round_trips += 1
        return await worker.write(fn)

    async def _fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return await self._read(lambda db: db.execute(sql, params).fetchall())

    async def _fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return await self._read(lambda db: db.execute(sql, params).fetchone())

    # -- API keys ---------------------------------------------------------------------------------
    async def put_api_key(self, rec: ApiKeyRecord) -> None:
        await self._write(
            _statement(
                "INSERT INTO api_keys (id, token_hash, owner, doc) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET token_hash=excluded.token_hash, owner=excluded.owner, doc=excluded.doc",
                (rec.id, rec.token_hash, rec.owner, _doc(rec)),
            )
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
        return await self._write(lambda db: _revoke(db, "api_keys", ApiKeyRecord, key_id, at))

    async def touch_api_key(self, key_id: str, at: float) -> None:
        def touch(db: sqlite3.Connection) -> None:
            rec = _load(db, "api_keys", key_id, ApiKeyRecord)
            if rec is None or (rec.last_used_at is not None and rec.last_used_at >= at):
                return
            rec = apply_changes(rec, {"last_used_at": at})
            db.execute("UPDATE api_keys SET doc = ? WHERE id = ?", (_doc(rec), key_id))

        await self._write(touch)

    # -- users --------------------------------------------------------------------------------------
    async def create_user(self, rec: UserRecord) -> None:
        await self._write(lambda db: _put_user(db, rec, insert=True))

    async def get_user(self, user_id: str) -> UserRecord | None:
        row = await self._fetchone("SELECT doc FROM users WHERE id = ?", (user_id,))
        return from_json(row[0], UserRecord) if row else None

    async def find_user(self, login: str) -> UserRecord | None:
        key = login.casefold()
        row = await self._fetchone(
            "SELECT doc FROM users WHERE username_key = ? UNION ALL SELECT doc FROM users WHERE email_key = ? LIMIT 1",
            (key, key),
        )
        return from_json(row[0], UserRecord) if row else None

    async def get_user_by_identity(self, issuer: str, subject: str) -> UserRecord | None:
        row = await self._fetchone("SELECT doc FROM users WHERE identity_key = ?", (f"{issuer}\n{subject}",))
        return from_json(row[0], UserRecord) if row else None

    async def list_users(self, *, limit: int = 100, after: str | None = None) -> list[UserRecord]:
        rows = await self._fetchall(
            "SELECT doc FROM users WHERE id > ? ORDER BY id LIMIT ?", ("" if after is None else after, max(0, limit))
        )
        return [from_json(r[0], UserRecord) for r in rows]

    async def update_user(self, user_id: str, changes: Mapping[str, Any]) -> UserRecord | None:
        if "id" in changes:
            raise ValueError("a user's id cannot change")

        def update(db: sqlite3.Connection) -> UserRecord | None:
            rec = _load(db, "users", user_id, UserRecord)
            if rec is None:
                return None
            rec = apply_changes(rec, changes)
            _put_user(db, rec, insert=False)
            return rec

        return await self._write(update)

    async def delete_user(self, user_id: str) -> bool:
        return await self._write(lambda db: db.execute("DELETE FROM users WHERE id = ?", (user_id,)).rowcount > 0)

    # -- refresh tokens -----------------------------------------------------------------------------
    async def put_refresh_token(self, rec: RefreshTokenRecord) -> None:
        await self._write(
            _statement(
                "INSERT INTO refresh_tokens (id, token_hash, family_id, user_id, doc) VALUES (?, ?, ?, ?, ?)",
                (rec.id, rec.token_hash, rec.family_id, rec.user_id, _doc(rec)),
            )
        )

    async def spend_refresh_token(self, token_hash: str, at: float) -> RefreshTokenRecord | None:
        def spend(db: sqlite3.Connection) -> RefreshTokenRecord | None:
            row = db.execute("SELECT doc FROM refresh_tokens WHERE token_hash = ?", (token_hash,)).fetchone()
            if row is None:
                return None
            rec = from_json(row[0], RefreshTokenRecord)
            if rec.used_at is None and rec.revoked_at is None:
                used = apply_changes(rec, {"used_at": at})
                db.execute("UPDATE refresh_tokens SET doc = ? WHERE id = ?", (_doc(used), rec.id))
            return rec

        return await self._write(spend)

    async def revoke_refresh_tokens(self, at: float, *, family_id: str | None = None, user_id: str | None = None) -> int:
        if (family_id is None) == (user_id is None):
            raise ValueError("revoke the tokens of one family or of one user")
        column, value = ("family_id", family_id) if family_id is not None else ("user_id", user_id)

        def revoke(db: sqlite3.Connection) -> int:
            rows = db.execute(f"SELECT doc FROM refresh_tokens WHERE {column} = ?", (value,)).fetchall()
            count = 0
            for (doc,) in rows:
                rec = from_json(doc, RefreshTokenRecord)
                if rec.revoked_at is None:
                    db.execute("UPDATE refresh_tokens SET doc = ? WHERE id = ?", (_doc(apply_changes(rec, {"revoked_at": at})), rec.id))
                    count += 1
            return count

        return await self._write(revoke)

    # -- audit trail --------------------------------------------------------------------------------
    async def append_audit(self, rec: AuditRecord) -> None:
        await self._write(
            _statement(
                "INSERT INTO audit (id, at, actor, action, doc) VALUES (?, ?, ?, ?, ?)",
                (rec.id, rec.at, rec.actor, rec.action, _doc(rec)),
            )
        )

    async def list_audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        before: str | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        where: list[str] = []
        params: list[Any] = []
        if actor is not None:
            where.append("actor = ?")
            params.append(actor)
        if action is not None:
            if action.endswith("."):
                # A prefix: the range [action, action + U+FFFF) uses the index, unlike LIKE.
                where.append("action >= ? AND action < ?")
                params += [action, action + "\uffff"]
            else:
                where.append("action = ?")
                params.append(action)
        if since is not None:
            where.append("at >= ?")
            params.append(since)
        if before is not None:
            where.append("id < ?")
            params.append(before)
        sql = "SELECT doc FROM audit" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        params.append(max(0, limit))
        rows = await self._fetchall(sql, tuple(params))
        return [from_json(r[0], AuditRecord) for r in rows]

    # -- agents -----------------------------------------------------------------------------------
    async def put_agent(self, rec: AgentRecord) -> None:
        await self._write(
            _statement(
                "INSERT INTO agents (id, token_hash, doc) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET token_hash=excluded.token_hash, doc=excluded.doc",
                (rec.id, rec.token_hash, _doc(rec)),
            )
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

        def update(db: sqlite3.Connection) -> AgentRecord | None:
            rec = _load(db, "agents", agent_id, AgentRecord)
            if rec is None:
                return None
            rec = apply_changes(rec, changes)
            db.execute("UPDATE agents SET token_hash = ?, doc = ? WHERE id = ?", (rec.token_hash, _doc(rec), agent_id))
            return rec

        return await self._write(update)

    async def revoke_agent(self, agent_id: str, at: float) -> AgentRecord | None:
        return await self._write(lambda db: _revoke(db, "agents", AgentRecord, agent_id, at))

    # -- jobs -------------------------------------------------------------------------------------
    async def create_job(self, rec: JobRecord) -> None:
        try:
            await self._write(_statement(_INSERT_JOB, _job_row(rec)))
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"job {rec.id!r} already exists") from exc

    async def create_jobs(self, recs: Collection[JobRecord]) -> None:
        rows = [_job_row(rec) for rec in recs]
        if not rows:
            return
        try:
            await self._write(_statement(_INSERT_JOB, *rows))
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"a job of the batch already exists: {exc}") from exc

    async def get_job(self, job_id: str) -> JobRecord | None:
        row = await self._fetchone("SELECT doc FROM jobs WHERE id = ?", (job_id,))
        return from_json(row[0], JobRecord) if row else None

    async def get_jobs(self, job_ids: Collection[str]) -> dict[str, JobRecord]:
        if not job_ids:
            return {}
        # One parameter (a JSON array) whatever the number of ids: no SQLITE_MAX_VARIABLE_NUMBER.
        ids = json.dumps(list(job_ids))
        rows = await self._fetchall("SELECT doc FROM jobs WHERE id IN (SELECT value FROM json_each(?))", (ids,))
        recs = (from_json(r[0], JobRecord) for r in rows)
        return {rec.id: rec for rec in recs}

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
        rows = await self._fetchall(sql, tuple(params))
        return [from_json(r[0], JobRecord) for r in rows]

    async def update_job(
        self,
        job_id: str,
        *,
        expect_states: Collection[str],
        expect_attempt: int | None = None,
        expect_agent: str | None = None,
        fence_epoch: int | None = None,
        changes: Mapping[str, Any],
        increments: Mapping[str, int] | None = None,
    ) -> JobRecord | None:
        return (
            await self.update_jobs(
                [JobUpdate(job_id, expect_states, changes, expect_attempt, expect_agent, increments)],
                fence_epoch=fence_epoch,
            )
        )[0]

    async def update_jobs(self, updates: Sequence[JobUpdate], *, fence_epoch: int | None = None) -> list[JobRecord | None]:
        if not updates:
            return []
        prepared = [(u, job_changes(u.changes, fence_epoch), check_increments(JobRecord, u.increments)) for u in updates]

        def update(db: sqlite3.Connection) -> list[JobRecord | None]:
            # Recording our epoch before the compare is harmless when the compares then fail: the
            # epoch is a leader's that exists, and the fence only ever goes up.
            if fence_epoch is not None and _raise_meta(db, "fence_epoch", fence_epoch) > fence_epoch:
                return [None] * len(prepared)
            return [_update_job(db, u, changes, increments) for u, changes, increments in prepared]

        return await self._write(update)

    async def advance_fence(self, epoch: int) -> int:
        return await self._write(lambda db: _raise_meta(db, "fence_epoch", epoch))

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

    async def active_jobs_by_owner(self) -> dict[str, int]:
        rows = await self._fetchall(
            f"SELECT owner, COUNT(*) FROM jobs WHERE state IN ({_LEASED_SQL}) GROUP BY owner", _LEASED
        )
        return {r[0]: r[1] for r in rows}

    async def count_jobs(self, *, owner: str, states: Collection[str]) -> int:
        wanted = sorted(states)
        if not wanted:
            return 0
        rows = await self._fetchall(
            f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND state IN ({','.join('?' * len(wanted))})", (owner, *wanted)
        )
        return int(rows[0][0])

    async def renew_leases(self, agent_id: str, jobs: Collection[tuple[str, int]], until: float) -> list[str]:
        if not jobs:
            return []

        def renew(db: sqlite3.Connection) -> list[str]:
            renewed: list[str] = []
            for job_id, attempt in jobs:
                rec = _load(db, "jobs", job_id, JobRecord)
                if rec is None or not matches(rec, LEASED_STATES, attempt, agent_id):
                    continue
                if rec.lease_expires_at is None or rec.lease_expires_at < until:
                    rec = apply_changes(rec, {"lease_expires_at": until})
                    db.execute(
                        "UPDATE jobs SET lease_expires_at = ?, doc = ? WHERE id = ?",
                        (rec.lease_expires_at, _doc(rec), job_id),
                    )
                renewed.append(job_id)
            return renewed

        return await self._write(renew)

    # -- logs -------------------------------------------------------------------------------------
    async def append_log(
        self, job_id: str, attempt: int, seq: int, stream: str, data: bytes, ts: float, cap_bytes: int = 0
    ) -> AppendResult:
        data = bytes(data)

        def append(db: sqlite3.Connection) -> AppendResult:
            exists, max_seq, max_offset = db.execute(
                "SELECT (SELECT 1 FROM jobs WHERE id = ?), "
                "(SELECT MAX(seq) FROM logs WHERE job_id = ? AND attempt = ?), "
                '(SELECT MAX("offset") FROM logs WHERE job_id = ?)',
                (job_id, job_id, attempt, job_id),
            ).fetchone()
            if exists is None:
                return AppendResult(entry=None, acked_seq=-1)
            acked = -1 if max_seq is None else int(max_seq)
            if seq != acked + 1:
                return AppendResult(entry=None, acked_seq=acked)
            offset = 0 if max_offset is None else int(max_offset) + 1
            db.execute(
                'INSERT INTO logs (job_id, "offset", attempt, seq, stream, data, ts) VALUES (?, ?, ?, ?, ?, ?, ?)',
                (job_id, offset, attempt, seq, stream, data, ts),
            )
            _apply_log_cap(db, job_id, offset, len(data), cap_bytes)
            entry = LogEntry(
                job_id=job_id, offset=offset, attempt=attempt, seq=seq, stream=cast(Stream, stream), data=data, ts=ts
            )
            return AppendResult(entry=entry, acked_seq=seq)

        return await self._write(append)

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


# -- on the database thread, inside a write transaction ---------------------------------------------
def _statement(sql: str, *rows: tuple[Any, ...]) -> Work[None]:
    """The work of running one statement, once per row of parameters."""

    def run(db: sqlite3.Connection) -> None:
        db.executemany(sql, rows)

    return run


def _create_schema(db: sqlite3.Connection) -> int:
    """Create version 1 where nothing exists, run the migrations the file has not had (in this
    transaction: another process starting at once waits, then finds them done); the version now.
    A version above SCHEMA_VERSION is returned untouched (a newer server wrote this file)."""
    # executescript() would COMMIT first; run the statements one by one instead.
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    version = _meta(db, "schema_version") or 1
    for target in range(version + 1, SCHEMA_VERSION + 1):
        MIGRATIONS[target](db)
        version = target
    db.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (version,),
    )
    return version


def _load(db: sqlite3.Connection, table: str, key: str, cls: type[T]) -> T | None:
    row = db.execute(f"SELECT doc FROM {table} WHERE id = ?", (key,)).fetchone()
    return from_json(row[0], cls) if row else None  # type: ignore[type-var]


def _update_job(
    db: sqlite3.Connection, u: JobUpdate, changes: Mapping[str, Any], increments: Mapping[str, int]
) -> JobRecord | None:
    rec = _load(db, "jobs", u.job_id, JobRecord)
    if rec is None or not matches(rec, u.expect_states, u.expect_attempt, u.expect_agent):
        return None
    rec = apply_changes(rec, changes, increments)
    db.execute(
        "UPDATE jobs SET owner = ?, state = ?, agent_id = ?, lease_expires_at = ?, deadline = ?, doc = ? WHERE id = ?",
        (*_job_row(rec)[1:], u.job_id),
    )
    return rec


def _put_user(db: sqlite3.Connection, rec: UserRecord, *, insert: bool) -> None:
    username_key, email_key, identity_key = user_keys(rec)
    try:
        if insert:
            db.execute(
                "INSERT INTO users (id, username_key, email_key, identity_key, doc) VALUES (?, ?, ?, ?, ?)",
                (rec.id, username_key, email_key, identity_key, _doc(rec)),
            )
        else:
            db.execute(
                "UPDATE users SET username_key = ?, email_key = ?, identity_key = ?, doc = ? WHERE id = ?",
                (username_key, email_key, identity_key, _doc(rec), rec.id),
            )
    except sqlite3.IntegrityError as exc:
        message = str(exc)
        field = next(
            (f for column, f in _USER_UNIQUE.items() if f"users.{column}" in message),
            "id",
        )
        raise Conflict(field) from None


_USER_UNIQUE = {"username_key": "username", "email_key": "email", "identity_key": "oidc_subject", "id": "id"}


def _meta(db: sqlite3.Connection, key: str) -> int | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else int(row[0])


def _raise_meta(db: sqlite3.Connection, key: str, value: int) -> int:
    """Make the counter at least `value` in one statement; its value after."""
    (current,) = db.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value) RETURNING value",
        (key, value),
    ).fetchall()[0]
    return int(current)


def _revoke(db: sqlite3.Connection, table: str, cls: type[R], key: str, at: float) -> R | None:
    """Set revoked_at once; a second revoke keeps the first time."""
    rec = _load(db, table, key, cls)
    if rec is None or rec.revoked_at is not None:
        return rec
    rec = apply_changes(rec, {"revoked_at": at})
    db.execute(f"UPDATE {table} SET doc = ? WHERE id = ?", (_doc(rec), key))
    return rec


def _apply_log_cap(db: sqlite3.Connection, job_id: str, offset: int, size: int, cap: int) -> None:
    row = db.execute("SELECT stats FROM log_stats WHERE job_id = ?", (job_id,)).fetchone()
    stats = logcap.account(msgspec.json.decode(row[0], type=logcap.LogStats) if row else logcap.LogStats(), offset, size, cap)
    need = logcap.excess(stats, cap)
    while need > 0 and stats.head_end is not None:
        rows = db.execute(
            'SELECT "offset", length(data) FROM logs WHERE job_id = ? AND "offset" > ? ORDER BY "offset" LIMIT 256',
            (job_id, stats.head_end),
        ).fetchall()
        drops = logcap.choose_drops([(r[0], r[1]) for r in rows], need, offset)
        if not drops:
            break
        db.execute('DELETE FROM logs WHERE job_id = ? AND "offset" >= ? AND "offset" <= ?', (job_id, drops[0][0], drops[-1][0]))
        stats = logcap.dropped(stats, drops)
        need = logcap.excess(stats, cap)
    db.execute(
        "INSERT INTO log_stats (job_id, stats) VALUES (?, ?) ON CONFLICT (job_id) DO UPDATE SET stats = excluded.stats",
        (job_id, msgspec.json.encode(stats).decode()),
    )
