"""One contract suite for every Store implementation (DESIGN §3)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from yardmaster.protocol.jobs import JobSpec
from yardmaster.server.backends.base import Store
from yardmaster.server.backends.documents import from_document, from_json
from yardmaster.server.backends.records import AgentRecord, ApiKeyRecord, JobRecord

MONGO_SKIP_REASON = (
    "MongoDB contract suite skipped: set YM_TEST_MONGODB_URL to a MongoDB server to run it; "
    "no MongoDB server can be installed on this machine"
)

_counter = itertools.count()


def new_id(prefix: str = "j") -> str:
    """Time-sortable ids: later calls sort after earlier ones."""
    return f"{prefix}_{time.time_ns():020d}{next(_counter):08d}"


def job(owner: str = "alice", state: str = "queued", **fields: Any) -> JobRecord:
    now = time.time()
    base: dict[str, Any] = {
        "id": new_id(),
        "owner": owner,
        "spec": JobSpec(image="busybox", command=["true"]),
        "state": state,
        "created_at": now,
        "updated_at": now,
        "enqueued_at": now,
    }
    base.update(fields)
    return JobRecord(**base)


def api_key(owner: str = "alice", **fields: Any) -> ApiKeyRecord:
    kid = new_id("k")
    base: dict[str, Any] = {
        "id": kid,
        "token_hash": uuid.uuid4().hex,
        "hint": "ym_key_...Ab3x",
        "name": f"key {kid}",
        "owner": owner,
        "role": "user",
        "created_at": time.time(),
    }
    base.update(fields)
    return ApiKeyRecord(**base)


def agent(**fields: Any) -> AgentRecord:
    aid = new_id("a")
    base: dict[str, Any] = {
        "id": aid,
        "name": f"agent-{aid}",
        "token_hash": uuid.uuid4().hex,
        "labels": ["linux"],
        "capacity": 2,
        "created_at": time.time(),
    }
    base.update(fields)
    return AgentRecord(**base)


@pytest.fixture(params=["sqlite", "mongodb"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    impl: Store
    if request.param == "sqlite":
        from yardmaster.server.backends.sqlite_store import SqliteStore

        impl = SqliteStore(str(tmp_path / "data" / "yardmaster.db"))
        await impl.start()
        yield impl
        await impl.close()
        return

    url = os.environ.get("YM_TEST_MONGODB_URL")
    if not url:
        pytest.skip(MONGO_SKIP_REASON)
    from pymongo import AsyncMongoClient

    from yardmaster.server.backends.mongo_store import MongoStore

    database = f"ym_test_{uuid.uuid4().hex[:12]}"
    impl = MongoStore(url, database)
    await impl.start()
    yield impl
    await impl.close()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
    await client.drop_database(database)
    await client.close()


# -- lifecycle ------------------------------------------------------------------------------------


async def test_ping(store: Store) -> None:
    await store.ping()
    assert await store.count_jobs_by_state() == {}
    assert await store.active_job_counts() == {}


# -- API keys -------------------------------------------------------------------------------------


async def test_api_keys(store: Store) -> None:
    a1, a2, b1 = api_key("alice"), api_key("alice"), api_key("bob", role="admin")
    for k in (a1, a2, b1):
        await store.put_api_key(k)

    assert await store.get_api_key_by_hash(a1.token_hash) == a1
    assert await store.get_api_key_by_hash("0" * 64) is None
    assert [k.id for k in await store.list_api_keys("alice")] == [a1.id, a2.id]
    assert {k.id for k in await store.list_api_keys()} == {a1.id, a2.id, b1.id}
    assert await store.list_api_keys("nobody") == []

    await store.touch_api_key(a1.id, 1000.0)
    got = await store.get_api_key_by_hash(a1.token_hash)
    assert got is not None and got.last_used_at == 1000.0

    revoked = await store.revoke_api_key(a1.id, 2000.0)
    assert revoked is not None and revoked.revoked_at == 2000.0
    again = await store.revoke_api_key(a1.id, 3000.0)
    assert again is not None and again.revoked_at == 2000.0  # revoked once
    got = await store.get_api_key_by_hash(a1.token_hash)
    assert got is not None and got.revoked_at == 2000.0
    assert await store.revoke_api_key("k_missing", 1.0) is None

    untouched = await store.get_api_key_by_hash(a2.token_hash)
    assert untouched == a2


async def test_put_api_key_replaces_same_id(store: Store) -> None:
    k = api_key()
    await store.put_api_key(k)
    renamed = ApiKeyRecord(**{**{f: getattr(k, f) for f in k.__struct_fields__}, "name": "renamed"})
    await store.put_api_key(renamed)
    assert [x.name for x in await store.list_api_keys(k.owner)] == ["renamed"]


# -- agents ---------------------------------------------------------------------------------------


async def test_agents(store: Store) -> None:
    a, b = agent(), agent(labels=["gpu"], capacity=4, version="1.0", executor="docker")
    await store.put_agent(a)
    await store.put_agent(b)

    assert await store.get_agent(a.id) == a
    assert await store.get_agent("a_missing") is None
    assert await store.get_agent_by_token_hash(b.token_hash) == b
    assert await store.get_agent_by_token_hash("nope") is None
    assert [x.id for x in await store.list_agents()] == [a.id, b.id]

    updated = await store.update_agent(a.id, {"last_seen_at": 42.0, "labels": ["linux", "arm64"]})
    assert updated is not None and updated.last_seen_at == 42.0 and updated.labels == ["linux", "arm64"]
    assert await store.get_agent(a.id) == updated
    assert await store.update_agent("a_missing", {"last_seen_at": 1.0}) is None
    with pytest.raises(ValueError):
        await store.update_agent(a.id, {"no_such_field": 1})
    assert await store.get_agent(a.id) == updated

    revoked = await store.revoke_agent(a.id, 100.0)
    assert revoked is not None and revoked.revoked_at == 100.0
    again = await store.revoke_agent(a.id, 200.0)
    assert again is not None and again.revoked_at == 100.0
    assert await store.revoke_agent("a_missing", 1.0) is None
    b_now = await store.get_agent(b.id)
    assert b_now is not None and b_now.revoked_at is None


async def test_agent_registration_and_declaration_are_kept_apart(store: Store) -> None:
    a = agent(labels=["a"], capacity=2)
    await store.put_agent(a)
    fresh = await store.get_agent(a.id)
    assert fresh is not None and (fresh.declared_labels, fresh.declared_capacity) == ([], None)
    said = await store.update_agent(a.id, {"declared_labels": ["prod"], "declared_capacity": 8, "executor": "process"})
    assert said is not None and (said.labels, said.capacity) == (["a"], 2)
    assert (said.declared_labels, said.declared_capacity, said.executor) == (["prod"], 8, "process")
    changed = await store.update_agent(a.id, {"labels": [], "capacity": 1})
    assert changed is not None and (changed.labels, changed.capacity, changed.declared_labels) == ([], 1, ["prod"])
    assert await store.get_agent(a.id) == changed
    with pytest.raises(ValueError):
        await store.update_agent(a.id, {"declared_capacity": "many"})


def test_an_agent_document_written_before_the_declared_fields_still_reads() -> None:
    old = b'{"id":"agt_1","name":"a","token_hash":"h","labels":["x"],"capacity":3,"created_at":1.0}'
    for rec in (from_json(old, AgentRecord), from_document(json.loads(old), AgentRecord)):
        assert (rec.labels, rec.capacity, rec.declared_labels, rec.declared_capacity) == (["x"], 3, [], None)


# -- jobs -----------------------------------------------------------------------------------------


async def test_create_get_job_roundtrip(store: Store) -> None:
    spec = JobSpec(image="busybox", command="echo hi", env={"A": "1"}, labels=["linux"], priority=5)
    j = job(spec=spec, priority=5)
    await store.create_job(j)
    assert await store.get_job(j.id) == j
    assert await store.get_job("j_missing") is None
    with pytest.raises(ValueError):
        await store.create_job(j)


async def test_create_jobs_creates_the_whole_batch(store: Store) -> None:
    batch = [job(), job("bob"), job(state="queued", priority=3)]
    await store.create_jobs(batch)
    for j in batch:
        assert await store.get_job(j.id) == j
    await store.create_jobs([])  # an empty batch is a no-op
    assert await store.count_jobs_by_state() == {"queued": 3}


async def test_create_jobs_is_all_or_none(store: Store) -> None:
    existing = job()
    await store.create_job(existing)

    before, after = job(), job()
    with pytest.raises(ValueError):
        await store.create_jobs([before, job(id=existing.id, owner="mallory"), after])
    assert await store.get_job(before.id) is None
    assert await store.get_job(after.id) is None
    assert await store.get_job(existing.id) == existing

    first = job()
    with pytest.raises(ValueError):  # the same id twice within the batch
        await store.create_jobs([first, job(), job(id=first.id)])
    assert await store.get_job(first.id) is None
    assert await store.count_jobs_by_state() == {"queued": 1}


async def test_get_jobs_returns_the_existing_ones_by_id(store: Store) -> None:
    a, b = job(), job(state="running", agent_id="ag1", attempt=1)
    await store.create_jobs([a, b])
    assert await store.get_jobs([a.id, "j_missing", b.id, a.id]) == {a.id: a, b.id: b}
    assert await store.get_jobs({b.id}) == {b.id: b}
    assert await store.get_jobs(["j_missing"]) == {}
    assert await store.get_jobs([]) == {}


async def test_get_jobs_takes_more_ids_than_a_statement_has_parameters(store: Store) -> None:
    # SQLite allows 32766 parameters in one statement; a list of ids must not be bound by that.
    wanted = [job() for _ in range(20)]
    await store.create_jobs(wanted)
    missing = [f"j_missing_{n:06d}" for n in range(40_000)]
    ids = missing[:20_000] + [j.id for j in wanted] + missing[20_000:]
    assert await store.get_jobs(ids) == {j.id: j for j in wanted}


async def test_list_jobs_filters_and_order(store: Store) -> None:
    a1 = job("alice")
    b1 = job("bob", state="running", agent_id="ag1", attempt=1)
    a2 = job("alice", state="running", agent_id="ag2", attempt=1)
    a3 = job("alice", state="succeeded", agent_id="ag1", attempt=1)
    for j in (a1, b1, a2, a3):
        await store.create_job(j)

    assert [j.id for j in await store.list_jobs()] == [a3.id, a2.id, b1.id, a1.id]
    assert [j.id for j in await store.list_jobs(owner="alice")] == [a3.id, a2.id, a1.id]
    assert [j.id for j in await store.list_jobs(states=["running"])] == [a2.id, b1.id]
    assert [j.id for j in await store.list_jobs(states={"queued", "succeeded"})] == [a3.id, a1.id]
    assert [j.id for j in await store.list_jobs(agent_id="ag1")] == [a3.id, b1.id]
    assert [j.id for j in await store.list_jobs(owner="alice", states=["running"], agent_id="ag2")] == [a2.id]
    assert await store.list_jobs(owner="carol") == []
    assert await store.list_jobs(states=[]) == []


async def test_list_jobs_pagination(store: Store) -> None:
    jobs = [job() for _ in range(7)]
    for j in jobs:
        await store.create_job(j)
    expected = [j.id for j in reversed(jobs)]

    seen: list[str] = []
    before: str | None = None
    while True:
        page = await store.list_jobs(limit=3, before=before)
        if not page:
            break
        assert len(page) <= 3
        seen.extend(j.id for j in page)
        before = page[-1].id
    assert seen == expected
    assert [j.id for j in await store.list_jobs(limit=2)] == expected[:2]


# -- compare-and-set ------------------------------------------------------------------------------


async def test_update_job_cas(store: Store) -> None:
    j = job()
    await store.create_job(j)

    wrong_state = await store.update_job(j.id, expect_states=["running"], changes={"state": "failed"})
    assert wrong_state is None
    assert await store.get_job(j.id) == j

    claimed = await store.update_job(
        j.id,
        expect_states=["queued"],
        changes={"state": "assigned", "attempt": 1, "agent_id": "ag1", "lease_expires_at": 50.0},
    )
    assert claimed is not None
    assert (claimed.state, claimed.attempt, claimed.agent_id, claimed.lease_expires_at) == ("assigned", 1, "ag1", 50.0)
    assert await store.get_job(j.id) == claimed

    stale = await store.update_job(
        j.id, expect_states=["assigned"], expect_attempt=2, changes={"state": "running"}
    )
    assert stale is None
    assert await store.get_job(j.id) == claimed

    running = await store.update_job(
        j.id, expect_states=["assigned", "running"], expect_attempt=1, changes={"state": "running", "started_at": 7.0}
    )
    assert running is not None and running.state == "running" and running.started_at == 7.0
    assert running.spec == j.spec

    assert await store.update_job("j_missing", expect_states=["queued"], changes={"state": "assigned"}) is None


async def test_update_job_increments_integer_fields_in_the_same_compare_and_set(store: Store) -> None:
    j = job(state="assigned", agent_id="ag1", attempt=2, runs=1)
    await store.create_job(j)
    running = await store.update_job(
        j.id, expect_states=["assigned"], expect_attempt=2, expect_agent="ag1",
        changes={"state": "running"}, increments={"runs": 1},
    )
    assert running is not None and (running.state, running.runs) == ("running", 2)
    assert (await store.get_job(j.id)) == running
    # A failed compare increments nothing.
    assert await store.update_job(j.id, expect_states=["assigned"], changes={}, increments={"runs": 1}) is None
    assert (await store.get_job(j.id)).runs == 2  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        await store.update_job(j.id, expect_states=["running"], changes={}, increments={"state": 1})
    with pytest.raises(ValueError):
        await store.update_job(j.id, expect_states=["running"], changes={}, increments={"runs": 1.5})  # type: ignore[dict-item]


async def test_update_job_expect_agent(store: Store) -> None:
    j = job(state="running", agent_id="ag1", attempt=1)
    unassigned = job()
    await store.create_jobs([j, unassigned])

    assert await store.update_job(j.id, expect_states=["running"], expect_agent="ag2", changes={"state": "failed"}) is None
    assert await store.get_job(j.id) == j
    assert (
        await store.update_job(unassigned.id, expect_states=["queued"], expect_agent="ag1", changes={"priority": 1})
        is None
    )
    assert await store.get_job(unassigned.id) == unassigned

    done = await store.update_job(
        j.id, expect_states=["running"], expect_attempt=1, expect_agent="ag1", changes={"state": "succeeded"}
    )
    assert done is not None and done.state == "succeeded" and done.agent_id == "ag1"
    # Every given part must hold: the right agent at a stale attempt is refused.
    assert (
        await store.update_job(j.id, expect_states=["succeeded"], expect_attempt=2, expect_agent="ag1", changes={"priority": 5})
        is None
    )
    assert await store.get_job(j.id) == done


async def test_a_failing_change_among_concurrent_ones_fails_alone(store: Store) -> None:
    jobs = [job() for _ in range(30)]
    await store.create_jobs(jobs)

    async def change(n: int, j: JobRecord) -> JobRecord | None:
        changes: dict[str, Any] = {"bogus": 1} if n % 3 == 1 else {"priority": n}
        return await store.update_job(j.id, expect_states=["queued"], fence_epoch=1, changes=changes)

    results = await asyncio.gather(*(change(n, j) for n, j in enumerate(jobs)), return_exceptions=True)
    for n, (j, result) in enumerate(zip(jobs, results, strict=True)):
        stored = await store.get_job(j.id)
        if n % 3 == 1:
            assert isinstance(result, ValueError)
            assert stored == j
        else:
            assert isinstance(result, JobRecord) and result.priority == n
            assert stored == result


async def test_update_job_rejects_bad_changes(store: Store) -> None:
    j = job()
    await store.create_job(j)
    with pytest.raises(ValueError):
        await store.update_job(j.id, expect_states=["queued"], changes={"bogus": 1})
    with pytest.raises(ValueError):
        await store.update_job(j.id, expect_states=["queued"], changes={"state": "not-a-state"})
    assert await store.get_job(j.id) == j


async def test_concurrent_claims_exactly_one_wins(store: Store) -> None:
    j = job()
    await store.create_job(j)

    async def claim(n: int) -> JobRecord | None:
        return await store.update_job(
            j.id, expect_states=["queued"], changes={"state": "assigned", "attempt": 1, "agent_id": f"ag{n}"}
        )

    results = await asyncio.gather(*(claim(n) for n in range(20)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    final = await store.get_job(j.id)
    assert final is not None and final.agent_id == winners[0].agent_id and final.state == "assigned"


async def test_fencing(store: Store) -> None:
    j = job()
    await store.create_job(j)
    assert await store.advance_fence(5) == 5
    assert await store.advance_fence(3) == 5  # never goes back

    stale_leader = await store.update_job(j.id, expect_states=["queued"], fence_epoch=4, changes={"priority": 1})
    assert stale_leader is None
    assert await store.get_job(j.id) == j

    new_leader = await store.update_job(j.id, expect_states=["queued"], fence_epoch=6, changes={"priority": 2})
    assert new_leader is not None and new_leader.priority == 2 and new_leader.epoch == 6
    assert await store.advance_fence(0) == 6  # recorded by the fenced change

    deposed = await store.update_job(j.id, expect_states=["queued"], fence_epoch=5, changes={"priority": 3})
    assert deposed is None
    current = await store.get_job(j.id)
    assert current is not None and current.priority == 2

    same = await store.update_job(j.id, expect_states=["queued"], fence_epoch=6, changes={"priority": 4})
    assert same is not None and same.priority == 4

    # A fenced-out leader is refused on other jobs too, not only on jobs the new leader touched.
    other = job()
    await store.create_job(other)
    assert await store.update_job(other.id, expect_states=["queued"], fence_epoch=5, changes={"priority": 9}) is None


# -- leases, deadlines, slots ---------------------------------------------------------------------


async def test_expired_leases_and_deadlines(store: Store) -> None:
    expired = job(state="running", agent_id="ag1", attempt=1, lease_expires_at=100.0, deadline=1000.0)
    assigned_expired = job(state="assigned", agent_id="ag1", attempt=2, lease_expires_at=90.0)
    cancelling_late = job(state="cancelling", agent_id="ag2", attempt=1, lease_expires_at=500.0, deadline=150.0)
    alive = job(state="running", agent_id="ag2", attempt=1, lease_expires_at=300.0, deadline=400.0)
    finished = job(state="succeeded", agent_id="ag1", attempt=1, lease_expires_at=10.0, deadline=10.0)
    queued = job()
    for j in (expired, assigned_expired, cancelling_late, alive, finished, queued):
        await store.create_job(j)

    lease_ids = {j.id for j in await store.jobs_with_expired_leases(200.0)}
    assert lease_ids == {expired.id, assigned_expired.id}
    assert len(await store.jobs_with_expired_leases(200.0, limit=1)) == 1
    assert await store.jobs_with_expired_leases(50.0) == []

    deadline_ids = {j.id for j in await store.jobs_past_deadline(200.0)}
    assert deadline_ids == {cancelling_late.id}
    assert {j.id for j in await store.jobs_past_deadline(2000.0)} == {expired.id, cancelling_late.id, alive.id}

    assert await store.active_job_counts() == {"ag1": 2, "ag2": 2}
    assert await store.count_jobs_by_state() == {"running": 2, "assigned": 1, "cancelling": 1, "succeeded": 1, "queued": 1}


async def test_renew_leases(store: Store) -> None:
    mine = job(state="running", agent_id="ag1", attempt=2, lease_expires_at=100.0)
    mine_assigned = job(state="assigned", agent_id="ag1", attempt=1, lease_expires_at=100.0)
    theirs = job(state="running", agent_id="ag2", attempt=1, lease_expires_at=100.0)
    done = job(state="succeeded", agent_id="ag1", attempt=1, lease_expires_at=100.0)
    for j in (mine, mine_assigned, theirs, done):
        await store.create_job(j)

    renewed = await store.renew_leases(
        "ag1",
        [(mine.id, 2), (mine_assigned.id, 1), (theirs.id, 1), (done.id, 1), ("j_missing", 1)],
        until=500.0,
    )
    assert sorted(renewed) == sorted([mine.id, mine_assigned.id])
    assert await store.renew_leases("ag1", [(mine.id, 1)], until=900.0) == []  # stale attempt

    for j, lease in ((mine, 500.0), (mine_assigned, 500.0), (theirs, 100.0), (done, 100.0)):
        got = await store.get_job(j.id)
        assert got is not None and got.lease_expires_at == lease, j.id
    assert await store.jobs_with_expired_leases(200.0) == [await store.get_job(theirs.id)]


# -- logs -----------------------------------------------------------------------------------------


async def test_log_append_contiguous_duplicate_gap(store: Store) -> None:
    j = job(state="running", attempt=1)
    await store.create_job(j)
    assert await store.acked_seq(j.id, 1) == -1
    assert await store.next_log_offset(j.id) == 0

    r0 = await store.append_log(j.id, 1, 0, "stdout", b"hello\n", 1.0)
    assert r0.entry is not None and (r0.entry.offset, r0.entry.seq, r0.acked_seq) == (0, 0, 0)
    r1 = await store.append_log(j.id, 1, 1, "stderr", b"oops\n", 2.0)
    assert r1.entry is not None and (r1.entry.offset, r1.acked_seq) == (1, 1)

    dup = await store.append_log(j.id, 1, 1, "stderr", b"different\n", 3.0)
    assert dup.entry is None and dup.acked_seq == 1
    dup0 = await store.append_log(j.id, 1, 0, "stdout", b"hello\n", 1.0)
    assert dup0.entry is None and dup0.acked_seq == 1

    gap = await store.append_log(j.id, 1, 3, "stdout", b"later\n", 4.0)
    assert gap.entry is None and gap.acked_seq == 1

    logs = await store.read_logs(j.id)
    assert [(e.offset, e.seq, e.stream, e.data) for e in logs] == [
        (0, 0, "stdout", b"hello\n"),
        (1, 1, "stderr", b"oops\n"),
    ]
    assert await store.acked_seq(j.id, 1) == 1
    assert await store.next_log_offset(j.id) == 2

    filled = await store.append_log(j.id, 1, 2, "stdout", b"x", 5.0)
    assert filled.entry is not None and filled.acked_seq == 2
    after_gap = await store.append_log(j.id, 1, 3, "stdout", b"later\n", 6.0)
    assert after_gap.entry is not None and after_gap.entry.offset == 3 and after_gap.acked_seq == 3


async def test_log_unknown_job(store: Store) -> None:
    r = await store.append_log("j_missing", 1, 0, "stdout", b"x", 1.0)
    assert r.entry is None and r.acked_seq == -1
    assert await store.read_logs("j_missing") == []


async def test_log_offsets_monotonic_across_attempts_and_jobs(store: Store) -> None:
    j, other = job(state="running", attempt=1), job(state="running", attempt=1)
    await store.create_job(j)
    await store.create_job(other)
    for seq in range(3):
        await store.append_log(j.id, 1, seq, "stdout", f"a1-{seq}".encode(), float(seq))
    first_other = await store.append_log(other.id, 1, 0, "stdout", b"other", 1.0)
    assert first_other.entry is not None and first_other.entry.offset == 0  # offsets are per job

    r = await store.append_log(j.id, 2, 0, "stdout", b"a2-0", 10.0)
    assert r.entry is not None and r.entry.offset == 3 and r.entry.attempt == 2 and r.acked_seq == 0
    assert await store.acked_seq(j.id, 1) == 2
    assert await store.acked_seq(j.id, 2) == 0
    assert await store.acked_seq(j.id, 3) == -1
    logs = await store.read_logs(j.id)
    assert [(e.offset, e.attempt, e.seq) for e in logs] == [(0, 1, 0), (1, 1, 1), (2, 1, 2), (3, 2, 0)]
    assert await store.next_log_offset(j.id) == 4


async def test_read_logs_from_offset_and_limit(store: Store) -> None:
    j = job(state="running", attempt=1)
    await store.create_job(j)
    for seq in range(10):
        await store.append_log(j.id, 1, seq, "stdout", bytes([seq]), float(seq))
    page = await store.read_logs(j.id, from_offset=4, limit=3)
    assert [e.offset for e in page] == [4, 5, 6]
    assert [e.data for e in page] == [b"\x04", b"\x05", b"\x06"]
    assert [e.offset for e in await store.read_logs(j.id, from_offset=8)] == [8, 9]
    assert await store.read_logs(j.id, from_offset=10) == []
    assert len(await store.read_logs(j.id, limit=5)) == 5


async def test_log_bytes_roundtrip_exactly(store: Store) -> None:
    j = job(state="running", attempt=1)
    await store.create_job(j)
    payloads = [b"\xff\xfe\x00\x80 not utf-8 \xc3\x28", bytes(range(256)), b"", "ünïcode\n".encode()]
    for seq, data in enumerate(payloads):
        r = await store.append_log(j.id, 1, seq, "stderr", data, 1.5)
        assert r.entry is not None and r.entry.data == data
    logs = await store.read_logs(j.id)
    assert [e.data for e in logs] == payloads
    assert all(type(e.data) is bytes and e.ts == 1.5 and e.job_id == j.id for e in logs)


async def test_concurrent_duplicate_appends_store_once(store: Store) -> None:
    j = job(state="running", attempt=1)
    await store.create_job(j)
    results = await asyncio.gather(*(store.append_log(j.id, 1, 0, "stdout", b"once", 1.0) for _ in range(10)))
    assert sum(r.entry is not None for r in results) == 1
    assert all(r.acked_seq == 0 for r in results)
    assert [e.data for e in await store.read_logs(j.id)] == [b"once"]


async def test_log_cap_keeps_head_and_tail_and_drops_the_middle(store: Store) -> None:
    j = job(state="running", attempt=1)
    await store.create_job(j)
    cap = 1000
    for seq in range(30):  # 30 chunks of 100 bytes: 3000 bytes for a 1000-byte cap
        r = await store.append_log(j.id, 1, seq, "stdout", bytes([65 + seq % 26]) * 100, float(seq), cap_bytes=cap)
        assert r.entry is not None and r.acked_seq == seq
    logs = await store.read_logs(j.id)
    offsets = [e.offset for e in logs]
    assert sum(len(e.data) for e in logs) <= cap
    assert offsets[:5] == [0, 1, 2, 3, 4]  # the head: the first cap/2 bytes
    assert offsets[-1] == 29 and offsets[-5:] == [25, 26, 27, 28, 29]  # the tail, newest last
    gap = [b for a, b in zip(offsets, offsets[1:], strict=False) if b != a + 1]
    assert len(gap) == 1  # one contiguous dropped range
    assert await store.log_dropped_bytes(j.id) == 3000 - sum(len(e.data) for e in logs)
    assert await store.acked_seq(j.id, 1) == 29
    assert await store.next_log_offset(j.id) == 30
    dup = await store.append_log(j.id, 1, 5, "stdout", b"x", 0.0, cap_bytes=cap)
    assert dup.entry is None and dup.acked_seq == 29


async def test_no_cap_keeps_everything(store: Store) -> None:
    j = job(state="running", attempt=1)
    await store.create_job(j)
    for seq in range(20):
        await store.append_log(j.id, 1, seq, "stdout", b"y" * 100, float(seq))
    assert len(await store.read_logs(j.id)) == 20
    assert await store.log_dropped_bytes(j.id) == 0
