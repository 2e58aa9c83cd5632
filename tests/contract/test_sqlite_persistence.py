"""SqliteStore specifics: data survives a restart, and several processes share one file safely."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import pytest

from yardmaster.protocol.jobs import JobSpec
from yardmaster.server.backends.records import AgentRecord, ApiKeyRecord, JobRecord
from yardmaster.server.backends.sqlite_store import SqliteStore

ROOT = Path(__file__).resolve().parents[2]


def _job(job_id: str) -> JobRecord:
    now = time.time()
    return JobRecord(
        id=job_id,
        owner="alice",
        spec=JobSpec(image="busybox", command=["true"]),
        state="queued",
        created_at=now,
        updated_at=now,
        enqueued_at=now,
    )


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "nested" / "dir" / "yardmaster.db")  # directories are created
    store = SqliteStore(path)
    await store.start()
    key = ApiKeyRecord(
        id="k1", token_hash="h" * 64, hint="ym_key_...abcd", name="ci", owner="alice", role="admin", created_at=1.0
    )
    ag = AgentRecord(id="a1", name="box", token_hash="t" * 64, created_at=1.0)
    job = _job("j1")
    await store.put_api_key(key)
    await store.put_agent(ag)
    await store.create_job(job)
    claimed = await store.update_job(
        "j1", expect_states=["queued"], fence_epoch=3, changes={"state": "assigned", "attempt": 1, "agent_id": "a1"}
    )
    assert claimed is not None
    await store.append_log("j1", 1, 0, "stdout", b"\xffbefore restart", 1.0)
    await store.close()

    reopened = SqliteStore(path)
    await reopened.start()
    try:
        assert await reopened.get_api_key_by_hash("h" * 64) == key
        assert await reopened.get_agent("a1") == ag
        assert await reopened.get_job("j1") == claimed
        assert await reopened.advance_fence(0) == 3
        assert [e.data for e in await reopened.read_logs("j1")] == [b"\xffbefore restart"]
        assert await reopened.acked_seq("j1", 1) == 0
        appended = await reopened.append_log("j1", 1, 1, "stdout", b"after", 2.0)
        assert appended.entry is not None and appended.entry.offset == 1
    finally:
        await reopened.close()


_WORKER = r"""
import asyncio, json, sys, time
from yardmaster.server.backends.sqlite_store import SqliteStore

async def main(path: str, worker: str, start_at: float, ids: list[str], together: bool) -> None:
    store = SqliteStore(path)
    await store.start()
    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))

        async def claim(job_id: str) -> bool:
            rec = await store.update_job(
                job_id, expect_states=["queued"], changes={"state": "assigned", "attempt": 1, "agent_id": worker}
            )
            return rec is not None

        if together:  # all at once: claims share group commits
            won = [j for j, ok in zip(ids, await asyncio.gather(*(claim(j) for j in ids))) if ok]
        else:
            won = [j for j in ids if await claim(j)]
    finally:
        await store.close()
    print(json.dumps(won))

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5] == "1"))
"""


@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "all-at-once"])
async def test_two_processes_claim_each_job_exactly_once(tmp_path: Path, together: bool) -> None:
    path = str(tmp_path / "shared.db")
    store = SqliteStore(path)
    await store.start()
    ids = [f"j{i:05d}" for i in range(300)]
    for job_id in ids:
        await store.create_job(_job(job_id))

    start_at = time.time() + 1.5  # both workers begin claiming at the same moment
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WORKER,
            path,
            worker,
            str(start_at),
            json.dumps(ids),
            "1" if together else "0",
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for worker in ("w1", "w2")
    ]
    try:
        outputs = [await asyncio.wait_for(p.communicate(), timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()
    won = {worker: json.loads(out) for worker, (out, _) in zip(("w1", "w2"), outputs, strict=True)}

    assert not set(won["w1"]) & set(won["w2"])
    assert sorted(won["w1"] + won["w2"]) == ids
    for job_id in ids:
        rec = await store.get_job(job_id)
        assert rec is not None and rec.state == "assigned"
        assert job_id in won[rec.agent_id or ""]
    await store.close()


_SUBMITTER = r"""
import asyncio, sys, time
from yardmaster.protocol.jobs import JobSpec
from yardmaster.server.backends.records import JobRecord
from yardmaster.server.backends.sqlite_store import SqliteStore

async def submit(store: SqliteStore, n: int) -> None:
    now = time.time()
    rec = JobRecord(id=f"j{n:06d}", owner="alice", spec=JobSpec(image="busybox", command=["true"]),
                    state="queued", created_at=now, updated_at=now, enqueued_at=now)
    await store.create_job(rec)
    sys.stdout.write(rec.id + "\n")  # acknowledged
    sys.stdout.flush()

async def main(path: str) -> None:
    store = SqliteStore(path)
    await store.start()
    n = 0
    while True:  # until killed: 16 submissions in flight at a time, so commits are shared
        await asyncio.gather(*(submit(store, n + k) for k in range(16)))
        n += 16

asyncio.run(main(sys.argv[1]))
"""


async def test_every_acknowledged_write_survives_the_process_being_killed(tmp_path: Path) -> None:
    path = str(tmp_path / "crash.db")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SUBMITTER, path, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    acknowledged: list[str] = []
    try:
        while len(acknowledged) < 2000:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert line, (await proc.stderr.read()).decode() if proc.stderr else ""
            acknowledged.append(line.decode().strip())
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-flight: no close(), no checkpoint
        await proc.wait()

    store = SqliteStore(path)
    await store.start()
    try:
        stored = await store.get_jobs(acknowledged)
        assert sorted(stored) == sorted(acknowledged)
        assert all(rec.state == "queued" for rec in stored.values())
    finally:
        await store.close()


async def test_each_store_call_is_one_round_trip(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "rt.db"))
    await store.start()
    try:
        jobs = [_job(f"j{n}") for n in range(5)]
        calls = [
            store.create_jobs(jobs),
            store.get_jobs([j.id for j in jobs]),
            store.update_job(
                "j0", expect_states=["queued"], fence_epoch=2, changes={"state": "assigned", "attempt": 1, "agent_id": "a1"}
            ),
            store.update_job("j0", expect_states=["assigned"], expect_attempt=1, expect_agent="a1", changes={"state": "running"}),
            store.append_log("j0", 1, 0, "stdout", b"out", 1.0, cap_bytes=1024),
            store.renew_leases("a1", [("j0", 1), ("j1", 1)], until=99.0),
            store.get_job("j0"),
            store.list_jobs(states=["running"]),
        ]
        for call in calls:
            before = store.round_trips
            await call
            assert store.round_trips == before + 1
        before = store.round_trips
        assert await store.get_jobs([]) == {} and await store.create_jobs([]) is None
        assert store.round_trips == before  # nothing to do: no trip
    finally:
        await store.close()
