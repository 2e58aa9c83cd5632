"""SqliteStore schema migrations, from a database file as the previous release (schema version 1,
before users) left it: the migration runs at start and is recorded, the old rows are intact and
readable, the new tables work, and the bootstrap admin key of that release keeps working as the
bootstrap admin user. A file written by a newer server (a higher version) is refused untouched."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from yardmaster.server.app import build_app
from yardmaster.server.backends.base import BackendUnavailable
from yardmaster.server.backends.records import AuditRecord, RefreshTokenRecord, UserRecord
from yardmaster.server.backends.sqlite_store import SCHEMA_VERSION, SqliteStore
from yardmaster.server.security import tokens
from yardmaster.server.settings import load_settings

# The schema of the release before users (commit 49d5c80, sqlite_store._SCHEMA), verbatim.
V1_SCHEMA = """
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

OLD_TOKEN = tokens.new_token("api-key")
NOW = time.time()

# Documents as that release wrote them (its records had no `scopes` on keys, and no users).
OLD_KEY = {
    "id": "key_old",
    "token_hash": tokens.token_hash(OLD_TOKEN),
    "hint": tokens.hint(OLD_TOKEN),
    "name": "admin (first start)",
    "owner": "admin",
    "role": "admin",
    "created_at": NOW - 86400,
    "expires_at": None,
    "last_used_at": NOW - 3600,
    "revoked_at": None,
}
OLD_AGENT = {
    "id": "agt_old",
    "name": "builder-1",
    "token_hash": "ab" * 32,
    "labels": ["linux"],
    "capacity": 4,
    "declared_labels": ["linux"],
    "declared_capacity": 4,
    "created_at": NOW - 86400,
    "revoked_at": None,
    "last_seen_at": NOW - 60,
    "version": "0.1.0",
    "executor": "docker",
    "draining_since": None,
}
OLD_JOB = {
    "id": "job_old",
    "owner": "admin",
    "spec": {"image": "busybox", "command": ["echo", "hi"], "env": {"A": "1"}},
    "state": "succeeded",
    "attempt": 1,
    "runs": 1,
    "priority": 0,
    "agent_id": "agt_old",
    "epoch": 3,
    "exit_code": 0,
    "created_at": NOW - 7200,
    "updated_at": NOW - 7100,
    "enqueued_at": NOW - 7200,
    "finished_at": NOW - 7100,
}


def write_v1_file(path: Path, version: int = 1) -> None:
    """A database file as the previous release made and used it, with rows in every table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    try:
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (version,))
        db.execute("INSERT INTO meta (key, value) VALUES ('fence_epoch', 3)")
        db.execute(
            "INSERT INTO api_keys (id, token_hash, owner, doc) VALUES (?, ?, ?, ?)",
            (OLD_KEY["id"], OLD_KEY["token_hash"], OLD_KEY["owner"], json.dumps(OLD_KEY)),
        )
        db.execute("INSERT INTO agents (id, token_hash, doc) VALUES (?, ?, ?)", (OLD_AGENT["id"], OLD_AGENT["token_hash"], json.dumps(OLD_AGENT)))
        db.execute(
            "INSERT INTO jobs (id, owner, state, agent_id, lease_expires_at, deadline, doc) VALUES (?, ?, ?, ?, NULL, NULL, ?)",
            (OLD_JOB["id"], OLD_JOB["owner"], OLD_JOB["state"], OLD_JOB["agent_id"], json.dumps(OLD_JOB)),
        )
        db.execute(
            'INSERT INTO logs (job_id, "offset", attempt, seq, stream, data, ts) VALUES (?, 0, 1, 0, ?, ?, ?)',
            ("job_old", "stdout", b"hi\n", NOW - 7150),
        )
        db.commit()
    finally:
        db.close()


def schema_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
    finally:
        db.close()


def tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()


@pytest.fixture
def v1_file(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "yardmaster.db"
    write_v1_file(path)
    assert "users" not in tables(path)
    return path


async def test_a_version_1_file_is_migrated_at_start_and_its_rows_are_intact(v1_file: Path) -> None:
    store = SqliteStore(str(v1_file))
    await store.start()
    try:
        assert schema_version(v1_file) == SCHEMA_VERSION == 2
        key = await store.get_api_key_by_hash(OLD_KEY["token_hash"])
        assert key is not None and (key.id, key.owner, key.role, key.last_used_at) == ("key_old", "admin", "admin", OLD_KEY["last_used_at"])
        assert key.scopes is None  # every scope of its role, as before scopes existed
        agent = await store.get_agent("agt_old")
        assert agent is not None and (agent.name, agent.capacity, agent.last_seen_at) == ("builder-1", 4, OLD_AGENT["last_seen_at"])
        job = await store.get_job("job_old")
        assert job is not None and (job.owner, job.state, job.exit_code, job.spec.env) == ("admin", "succeeded", 0, {"A": "1"})
        assert [j.id for j in await store.list_jobs(owner="admin")] == ["job_old"]
        assert [e.data for e in await store.read_logs("job_old")] == [b"hi\n"]
        assert await store.next_log_offset("job_old") == 1
        assert await store.advance_fence(1) == 3  # the recorded fence survived

        # The tables of version 2 work.
        alice = UserRecord(id="usr_alice", username="Alice", email="alice@example.com", created_at=NOW)
        await store.create_user(alice)
        assert await store.find_user("ALICE@example.com") == alice
        await store.put_refresh_token(
            RefreshTokenRecord(id="rt_1", family_id="f", user_id=alice.id, token_hash="cd" * 32, created_at=NOW, expires_at=NOW + 60)
        )
        assert await store.revoke_refresh_tokens(NOW, user_id=alice.id) == 1
        entry = AuditRecord(id="aud_1", at=NOW, action="user.created", actor="admin", target=alice.id)
        await store.append_audit(entry)
        assert await store.list_audit() == [entry]
    finally:
        await store.close()

    # A second start finds nothing to do and keeps everything.
    again = SqliteStore(str(v1_file))
    await again.start()
    try:
        assert schema_version(v1_file) == 2
        assert await again.get_user("usr_alice") is not None
        assert await again.get_job("job_old") is not None
    finally:
        await again.close()


async def test_replicas_starting_together_on_a_version_1_file_migrate_it_once(v1_file: Path) -> None:
    stores = [SqliteStore(str(v1_file)) for _ in range(3)]
    await asyncio.gather(*(s.start() for s in stores))  # one migrates; the others wait, then find it done
    try:
        assert schema_version(v1_file) == 2
        await stores[0].create_user(UserRecord(id="usr_1", username="one", created_at=NOW))
        assert await stores[2].get_user("usr_1") is not None
    finally:
        for s in stores:
            await s.close()


async def test_a_file_from_a_newer_server_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "data" / "yardmaster.db"
    write_v1_file(path, version=SCHEMA_VERSION + 1)
    before = tables(path)
    store = SqliteStore(str(path))
    with pytest.raises(BackendUnavailable, match=f"schema version {SCHEMA_VERSION + 1}"):
        await store.start()
    assert schema_version(path) == SCHEMA_VERSION + 1
    assert tables(path) == before  # no migration ran on it


def test_the_previous_releases_admin_key_works_after_the_upgrade_as_the_bootstrap_admin(v1_file: Path) -> None:
    settings = load_settings({"YM_DATA_DIR": str(v1_file.parent)})
    auth = {"Authorization": f"Bearer {OLD_TOKEN}"}
    with TestClient(build_app(settings), base_url="http://127.0.0.1:8080") as client:
        me = client.get("/api/v1/users/me", headers=auth)
        assert me.status_code == 200, me.text
        assert (me.json()["id"], me.json()["username"], me.json()["role"]) == ("admin", "admin", "admin")
        jobs = client.get("/api/v1/jobs", headers=auth)
        assert [j["id"] for j in jobs.json()["jobs"]] == ["job_old"]  # the old jobs are the bootstrap admin's
    assert not (v1_file.parent / "admin-key").exists()  # an admin key existed: no new one was made
