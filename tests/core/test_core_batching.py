"""Batched paths of the core: an agent's job-accepts and results handled as one batch, the claims
of a scheduling pass as one Store transaction, and leadership kept while a pass is held up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

from tests.core.conftest import CheckedStore, Core, TransitionLedger, core_settings
from yardmaster.protocol import messages as m
from yardmaster.server.backends.base import JobUpdate
from yardmaster.server.backends.keys import SCHEDULER_LOCK
from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.backends.records import JobRecord
from yardmaster.server.runtime import Runtime

WAIT_S = 5.0  # a generous bound for what takes milliseconds


def accept(assign: m.JobAssign) -> m.JobAccept:
    return m.JobAccept(job_id=assign.job_id, attempt=assign.attempt)


def succeeded(assign: m.JobAssign) -> m.Result:
    return m.Result(job_id=assign.job_id, attempt=assign.attempt, state="succeeded", exit_code=0)


async def test_accepts_and_results_of_many_jobs_are_one_store_round_trip(core: Core) -> None:
    link = await core.add_agent(capacity=20)
    jobs = [await core.submit() for _ in range(20)]
    await core.lead()
    assert await core.rt.scheduler.tick() == 20
    assigns = [await link.next(m.JobAssign) for _ in jobs]
    batch: list[m.JobAccept | m.Result] = [msg for a in assigns for msg in (accept(a), succeeded(a))]
    before = core.store.round_trips
    replies = await core.rt.jobs.on_reports(link.agent_id, batch)
    assert core.store.round_trips - before == 1
    assert replies == [m.ResultAck(job_id=a.job_id, attempt=a.attempt, accepted=True) for a in assigns]
    for j in jobs:
        done = await core.job(j.id)
        assert (done.state, done.runs, done.exit_code) == ("succeeded", 1, 0)
        assert done.started_at is not None and done.finished_at is not None
    assert (core.transitions("running"), core.transitions("succeeded")) == (20, 20)


async def test_a_batch_answers_as_messages_handled_one_by_one_would(core: Core) -> None:
    """Stale, crossed and replayed messages in a batch take the full path, in order."""
    link = await core.add_agent(capacity=3)
    plain, cancelled, replayed = await core.submit(), await core.submit(), await core.submit()
    await core.lead()
    assert await core.rt.scheduler.tick() == 3
    assigns = {a.job_id: a for a in [await link.next(m.JobAssign) for _ in range(3)]}
    await core.rt.jobs.cancel(cancelled.id)  # the cancel crosses the assignment
    assert (await link.next(m.Cancel)).job_id == cancelled.id
    a_plain, a_cancel, a_replay = assigns[plain.id], assigns[cancelled.id], assigns[replayed.id]
    stale = m.Result(job_id=plain.id, attempt=7, state="failed", exit_code=1)
    replies = await core.rt.jobs.on_reports(
        link.agent_id,
        [
            accept(a_plain),
            stale,
            accept(a_cancel),
            accept(a_replay),
            accept(a_replay),  # a replay: nothing to change, no reply
            succeeded(a_plain),
            m.Result(job_id=cancelled.id, attempt=a_cancel.attempt, state="failed", exit_code=143),
        ],
    )
    assert [type(r) for r in replies] == [m.Error, m.Cancel, m.ResultAck, m.ResultAck]
    error, cancel, ack_plain, ack_cancel = replies
    assert isinstance(error, m.Error) and error.code == m.ERR_STALE_ATTEMPT and error.job_id == plain.id
    assert isinstance(cancel, m.Cancel) and cancel.job_id == cancelled.id
    assert ack_plain == m.ResultAck(job_id=plain.id, attempt=a_plain.attempt, accepted=True)
    assert ack_cancel == m.ResultAck(job_id=cancelled.id, attempt=a_cancel.attempt, accepted=True)
    assert (await core.job(plain.id)).state == "succeeded"
    assert (await core.job(cancelled.id)).state == "cancelled"  # the SIGTERM'd exit is the cancel working
    still = await core.job(replayed.id)
    assert (still.state, still.runs) == ("running", 1)


async def test_the_claims_of_a_pass_are_one_store_write(core: Core) -> None:
    link = await core.add_agent(capacity=50)
    jobs = [await core.submit() for _ in range(50)]
    await core.lead()
    before = core.store.round_trips
    assert await core.rt.scheduler.tick() == 50
    # Slots in use and the agents (the leader's first look), the candidates, then the claims:
    # one write for all 50, not one each.
    assert core.store.round_trips - before == 4
    assert {(await link.next(m.JobAssign)).job_id for _ in jobs} == {j.id for j in jobs}
    assert {(await core.job(j.id)).state for j in jobs} == {"assigned"}


async def test_claims_behind_a_newer_leader_fail_and_the_old_one_steps_down(core: Core) -> None:
    link = await core.add_agent(capacity=5)
    jobs = [await core.submit() for _ in range(5)]
    old = await core.lead()
    await core.store.advance_fence(old + 1)  # a newer leader recorded its epoch meanwhile
    await core.broker.raise_epoch(SCHEDULER_LOCK, old + 1)
    assert await core.rt.scheduler.tick() == 0
    assert not core.rt.scheduler.is_leader
    assert {(await core.job(j.id)).state for j in jobs} == {"queued"}
    assert link.nothing_pending()


class PausingStore(CheckedStore):
    """Holds every job write until `release` is set: a scheduling pass that takes long."""

    def __init__(self, path: str, ledger: TransitionLedger) -> None:
        super().__init__(path, ledger)
        self.release = asyncio.Event()
        self.paused = asyncio.Event()

    async def update_jobs(self, updates: Sequence[JobUpdate], *, fence_epoch: int | None = None) -> list[JobRecord | None]:
        self.paused.set()
        await self.release.wait()
        return await super().update_jobs(updates, fence_epoch=fence_epoch)


async def test_the_leader_keeps_its_lock_while_a_pass_is_held_up(tmp_path: Path, ledger: TransitionLedger) -> None:
    store = PausingStore(str(tmp_path / "yardmaster.db"), ledger)
    broker = MemoryBroker()
    settings = core_settings(tmp_path, leader_lock_ttl_s=0.6, leader_renew_s=0.1, schedule_interval_s=0.05)
    rt = Runtime(settings, broker, store)
    await store.start()
    await broker.start()
    await rt.agents.start()
    scheduler = rt.scheduler
    scheduler.start()
    try:
        core = Core(rt, store, broker, ledger)
        link = await core.add_agent()
        await core.submit()
        await asyncio.wait_for(store.paused.wait(), WAIT_S)
        epoch = scheduler.epoch
        held_until = time.monotonic() + 3 * settings.leader_lock_ttl_s
        while time.monotonic() < held_until:  # the pass stays held up for several lock TTLs
            await asyncio.sleep(0.05)
            assert await broker.lock_holder(SCHEDULER_LOCK) == (scheduler.owner, epoch)
        assert scheduler.epoch == epoch
        store.release.set()
        # The held pass completes as the leader: its fenced claim still counts.
        assert (await link.next(m.JobAssign)).attempt == 1
    finally:
        store.release.set()
        await scheduler.stop()
        await rt.stop()
