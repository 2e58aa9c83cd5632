"""Assignment and results, in process: the scheduler's pass, the agent's accept and result."""

from __future__ import annotations

from yardmaster.protocol import messages as m
from tests.core.conftest import Core


async def test_a_queued_job_is_assigned_to_the_agent_as_attempt_1(core: Core) -> None:
    link = await core.add_agent()
    job = await core.submit(env={"TOKEN": "s3cret"})
    epoch = await core.lead()
    assign = await core.assign(job, link)
    assert assign.attempt == 1 and assign.spec == job.spec
    assert assign.spec.env == {"TOKEN": "s3cret"}  # the agent needs the real values
    assigned = await core.job(job.id)
    assert (assigned.state, assigned.attempt, assigned.agent_id, assigned.epoch) == ("assigned", 1, link.agent_id, epoch)
    assert assigned.lease_expires_at is not None and assigned.deadline is not None
    assert not await core.broker.is_queued(job.id)


async def test_the_transition_metric_counts_assigned_once_per_assignment(core: Core) -> None:
    link = await core.add_agent(capacity=2)
    first, second = await core.submit(), await core.submit()
    await core.lead()
    assert await core.rt.scheduler.tick() == 2
    assert {(await link.next(m.JobAssign)).job_id for _ in range(2)} == {first.id, second.id}
    assert core.transitions("assigned") == 2
    assert core.transitions("queued") == 2


async def test_accept_then_result_succeeds_once_and_a_replay_changes_nothing(core: Core) -> None:
    link = await core.add_agent()
    job = await core.submit()
    await core.lead()
    running = await core.run(job, link)
    assert running.runs == 1 and running.started_at is not None
    result = m.Result(job_id=job.id, attempt=1, state="succeeded", exit_code=0)
    ack = m.ResultAck(job_id=job.id, attempt=1, accepted=True)
    assert await core.rt.jobs.on_result(link.agent_id, result) == [ack]
    done = await core.job(job.id)
    assert (done.state, done.exit_code, done.lease_expires_at) == ("succeeded", 0, None)
    replay = m.Result(job_id=job.id, attempt=1, state="failed", exit_code=3)
    assert await core.rt.jobs.on_result(link.agent_id, replay) == [ack]
    assert (await core.job(job.id)).state == "succeeded" and (await core.job(job.id)).exit_code == 0
    assert core.transitions("succeeded") == 1 and core.transitions("failed") == 0


async def test_a_result_for_an_old_attempt_is_refused_as_stale(core: Core) -> None:
    link = await core.add_agent()
    job = await core.submit()
    await core.lead()
    await core.run(job, link)
    await core.expire_lease(job.id)
    await core.rt.scheduler.reap()
    assert (await link.next(m.Cancel)).attempt == 1
    assert (await core.assign(job, link)).attempt == 2
    late = m.Result(job_id=job.id, attempt=1, state="succeeded", exit_code=0)
    [reply] = await core.rt.jobs.on_result(link.agent_id, late)
    assert isinstance(reply, m.Error) and reply.code == m.ERR_STALE_ATTEMPT and reply.attempt == 1
    current = await core.job(job.id)
    assert (current.state, current.attempt, current.exit_code) == ("assigned", 2, None)


async def test_a_result_from_another_agent_is_refused_as_stale(core: Core) -> None:
    link = await core.add_agent()
    other = await core.add_agent()
    job = await core.submit(labels=["only-here"])
    await core.store.update_agent(link.agent_id, {"labels": ["only-here"]})
    await core.lead()
    await core.run(job, link)
    [reply] = await core.rt.jobs.on_result(other.agent_id, m.Result(job_id=job.id, attempt=1, state="failed"))
    assert isinstance(reply, m.Error) and reply.code == m.ERR_STALE_ATTEMPT
    assert (await core.job(job.id)).state == "running"


async def test_a_job_no_agent_can_take_does_not_block_the_one_behind_it(core: Core) -> None:
    link = await core.add_agent(labels=["cpu"])
    stuck = await core.submit(labels=["gpu"])
    behind = await core.submit()
    await core.lead()
    assert await core.rt.scheduler.tick() == 1
    assert (await link.next(m.JobAssign)).job_id == behind.id
    assert (await core.job(stuck.id)).state == "queued" and await core.broker.is_queued(stuck.id)
    assert (await core.job(behind.id)).state == "assigned"


async def test_a_replica_that_does_not_lead_assigns_nothing(core: Core) -> None:
    link = await core.add_agent()
    job = await core.submit()
    assert await core.rt.scheduler.tick() == 0
    assert (await core.job(job.id)).state == "queued" and link.nothing_pending()


async def test_every_state_change_of_a_job_goes_through_transition(core: Core) -> None:
    """The CheckedStore fails any state write transition() did not compute; here every kind of
    write the leader and the agent make is exercised once, and their order recorded."""
    link = await core.add_agent(capacity=3)
    await core.lead()
    ok, lost, late = await core.submit(), await core.submit(max_attempts=1), await core.submit()
    assert await core.rt.scheduler.tick() == 3
    for _ in range(3):
        await link.next(m.JobAssign)
    for job in (ok, lost, late):
        await core.rt.jobs.on_accept(link.agent_id, m.JobAccept(job_id=job.id, attempt=1))
    await core.rt.jobs.on_result(link.agent_id, m.Result(job_id=ok.id, attempt=1, state="succeeded", exit_code=0))
    await core.expire_lease(lost.id)
    await core.pass_deadline(late.id)
    await core.rt.scheduler.reap()
    by_job: dict[str, list[str]] = {}
    for job_id, state in core.ledger.written:
        by_job.setdefault(job_id, []).append(state)
    assert by_job == {
        ok.id: ["assigned", "running", "succeeded"],
        lost.id: ["assigned", "running", "lost"],
        late.id: ["assigned", "running", "timed-out"],
    }
