"""The running-jobs quota in the scheduler leader (issue 9): a user with that many jobs in leased
states gets no further assignment; their queued jobs wait (never refused, never dropped) while
other users' jobs are assigned, and start as soon as one of theirs ends."""

from __future__ import annotations

import dataclasses

from tests.core.conftest import Core, CoreFactory, FakeAgentLink
from yardmaster.protocol import messages as m
from yardmaster.protocol.jobs import JobSpec
from yardmaster.server.backends.keys import SCHEDULER_LOCK
from yardmaster.server.backends.records import JobRecord

QUOTA = 2
SPEC = JobSpec(image="busybox", command=["true"])


async def assigned_now(link: FakeAgentLink) -> list[str]:
    ids: list[str] = []
    while not link.nothing_pending():
        ids.append((await link.next(m.JobAssign)).job_id)
    return ids


async def succeed(core: Core, link: FakeAgentLink, job_id: str) -> None:
    job = await core.job(job_id)
    await core.rt.jobs.on_reports(link.agent_id, [
        m.JobAccept(job_id=job_id, attempt=job.attempt),
        m.Result(job_id=job_id, attempt=job.attempt, state="succeeded", exit_code=0),
    ])
    assert (await core.job(job_id)).state == "succeeded"


async def submit(core: Core, owner: str, count: int) -> list[JobRecord]:
    return await core.rt.jobs.submit_many([SPEC] * count, owner)


async def test_a_user_at_the_quota_waits_while_another_users_job_is_assigned(make_core: CoreFactory) -> None:
    core = await make_core(quota_running_jobs=QUOTA)
    link = await core.add_agent(capacity=10)
    a = await submit(core, "user-a", 4)
    b = await submit(core, "user-b", 1)
    await core.lead()
    assert await core.rt.scheduler.tick() == 3
    assert sorted(await assigned_now(link)) == sorted([a[0].id, a[1].id, b[0].id])
    # A's other jobs wait in the queue: not refused, not dropped.
    for job in a[2:]:
        assert (await core.job(job.id)).state == "queued"
        assert await core.broker.is_queued(job.id)
    assert await core.rt.scheduler.tick() == 0  # the agent has room; A has not
    # One of A's jobs ends: the next pass starts A's next job (and only one).
    await succeed(core, link, a[0].id)
    assert await core.rt.scheduler.tick() == 1
    assert await assigned_now(link) == [a[2].id]
    assert await core.rt.scheduler.tick() == 0
    await succeed(core, link, a[1].id)
    assert await core.rt.scheduler.tick() == 1
    assert await assigned_now(link) == [a[3].id]


async def test_one_pass_never_assigns_past_the_quota(make_core: CoreFactory) -> None:
    """The leader counts its own claims at once, within a pass and across passes."""
    core = await make_core(quota_running_jobs=QUOTA)
    link = await core.add_agent(capacity=10)
    a = await submit(core, "user-a", 5)
    await core.lead()
    assert await core.rt.scheduler.tick() == QUOTA
    assert await assigned_now(link) == [a[0].id, a[1].id]
    core.rt.scheduler._t = dataclasses.replace(core.rt.scheduler._t, view_max_age_s=3600.0)
    for _ in range(3):
        assert await core.rt.scheduler.tick() == 0
    assert await core.rt.store.count_jobs(owner="user-a", states=["queued"]) == 3


async def test_a_new_leader_counts_the_jobs_a_former_one_assigned(make_core: CoreFactory) -> None:
    core = await make_core(quota_running_jobs=QUOTA)
    link = await core.add_agent(capacity=10)
    a = await submit(core, "user-a", 3)
    first_epoch = await core.lead()
    assert await core.rt.scheduler.tick() == QUOTA
    await assigned_now(link)
    scheduler = core.rt.scheduler
    assert await core.broker.release_lock(SCHEDULER_LOCK, scheduler.owner)
    scheduler._step_down("test: leadership changes hands")
    assert await core.lead() > first_epoch
    assert await scheduler.tick() == 0
    assert (await core.job(a[2].id)).state == "queued"


async def test_a_lost_lease_frees_its_place_in_the_quota(make_core: CoreFactory) -> None:
    core = await make_core(quota_running_jobs=1)
    link = await core.add_agent(capacity=10)
    first, second = await submit(core, "user-a", 2)
    await core.lead()
    await core.run(first, link)
    assert await core.rt.scheduler.tick() == 0
    await core.expire_lease(first.id)
    await core.rt.scheduler.reap()  # `first` goes back to the queue, at the head of its round
    assert (await link.next(m.Cancel)).job_id == first.id
    assert await core.rt.scheduler.tick() == 1
    assert await assigned_now(link) == [first.id]
    assert (await core.job(second.id)).state == "queued"


async def test_without_fair_share_a_backlog_at_the_quota_does_not_hide_other_users_jobs(make_core: CoreFactory) -> None:
    """Plain FIFO puts A's whole backlog first: the pass looks past the jobs that wait."""
    core = await make_core(quota_running_jobs=QUOTA, fair_share=False)
    scheduler = core.rt.scheduler
    scheduler._t = dataclasses.replace(scheduler._t, peek=5)
    link = await core.add_agent(capacity=10)
    a = await submit(core, "user-a", 30)
    b = await submit(core, "user-b", 1)
    assert (await core.broker.peek(100))[-1] == b[0].id
    await core.lead()
    assert await scheduler.tick() == QUOTA + 1
    assert sorted(await assigned_now(link)) == sorted([a[0].id, a[1].id, b[0].id])


async def test_a_quota_of_zero_is_no_quota(make_core: CoreFactory) -> None:
    core = await make_core(quota_running_jobs=0)
    link = await core.add_agent(capacity=30)
    await submit(core, "user-a", 30)
    await core.lead()
    assert await core.rt.scheduler.tick() == 30
    assert len(await assigned_now(link)) == 30
