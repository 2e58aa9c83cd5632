"""Lease expiry, re-queue and `lost`, and fencing of a stale leader, in process."""

from __future__ import annotations

from yardmaster.protocol import messages as m
from yardmaster.server.backends.keys import SCHEDULER_LOCK
from yardmaster.server.core.scheduler import Scheduler, SchedulerTimings
from tests.core.conftest import CANCEL_GRACE_S, Core


async def test_lease_expiry_requeues_as_attempt_2_then_ends_lost_after_max_attempts(core: Core) -> None:
    link = await core.add_agent()
    job = await core.submit(max_attempts=2)
    await core.lead()
    await core.run(job, link)

    await core.expire_lease(job.id)
    await core.rt.scheduler.reap()
    requeued = await core.job(job.id)
    assert (requeued.state, requeued.attempt, requeued.runs, requeued.agent_id) == ("queued", 1, 1, None)
    assert requeued.enqueued_at == job.enqueued_at and await core.broker.is_queued(job.id)
    stop = await link.next(m.Cancel)
    assert (stop.attempt, stop.reason, stop.grace_s) == (1, "lease expired", CANCEL_GRACE_S)

    assert (await core.run(job, link)).attempt == 2
    await core.expire_lease(job.id)
    await core.rt.scheduler.reap()
    lost = await core.job(job.id)
    assert (lost.state, lost.attempt, lost.runs) == ("lost", 2, 2)
    assert lost.error is not None and "2 of 2 attempts" in lost.error and lost.finished_at is not None
    assert (await link.next(m.Cancel)).attempt == 2
    assert await core.rt.scheduler.tick() == 0 and not await core.broker.is_queued(job.id)


async def test_an_assignment_never_accepted_returns_to_the_queue(core: Core) -> None:
    link = await core.add_agent()
    job = await core.submit(max_attempts=1)
    await core.lead()
    await core.assign(job, link)
    await core.expire_lease(job.id)
    await core.rt.scheduler.reap()
    # Not accepted, so no run was used: even with max_attempts 1 it is queued again, not lost.
    assert (await core.job(job.id)).state == "queued"
    assert (await link.next(m.Cancel)).reason == "lease expired"


async def test_a_stale_leader_cannot_assign_after_a_newer_epoch_was_recorded(core: Core) -> None:
    link = await core.add_agent()
    job = await core.submit()
    old = core.rt.scheduler
    old_epoch = await core.lead()
    # The old leader pauses; its lock runs out and another replica takes over.
    assert await core.broker.release_lock(SCHEDULER_LOCK, old.owner)
    new = Scheduler(
        core.broker, core.store, core.rt.agents, core.rt.jobs, core.rt.metrics,
        SchedulerTimings(lock_ttl_s=10, renew_s=3, tick_s=0.5, reaper_s=1, timeout_slack_s=30),
        owner="rep_newer",
    )
    await new._hold_lock()
    assert new.epoch == old_epoch + 1 and old.epoch == old_epoch  # the old one still believes it leads

    assert await old.tick() == 0
    assert old.epoch is None  # the refused write told it a newer leader exists
    stale = await core.job(job.id)
    assert (stale.state, stale.attempt) == ("queued", 0) and await core.broker.is_queued(job.id)
    assert link.nothing_pending() and core.transitions("assigned") == 0

    assert await new.tick() == 1
    assert (await link.next(m.JobAssign)).attempt == 1
    assert (await core.job(job.id)).epoch == new.epoch


async def test_a_stale_leader_cannot_reap_after_a_newer_epoch_was_recorded(core: Core) -> None:
    link = await core.add_agent()
    job = await core.submit()
    epoch = await core.lead()
    await core.run(job, link)
    await core.store.advance_fence(epoch + 1)  # a newer leader exists somewhere
    await core.expire_lease(job.id)
    await core.pass_deadline(job.id)
    await core.rt.scheduler.reap()
    assert (await core.job(job.id)).state == "running"
    assert link.nothing_pending()
