"""Cancels and the server-side timeout, in process: states, the `cancel` sent, its grace."""

from __future__ import annotations

import pytest

from yardmaster.protocol import messages as m
from yardmaster.server.core.jobs import JobAlreadyFinished
from tests.core.conftest import CANCEL_GRACE_S, Core


async def test_cancel_of_a_queued_job_is_immediate(core: Core) -> None:
    link = await core.add_agent()
    job = await core.submit()
    cancelled = await core.rt.jobs.cancel(job.id, reason="cancelled by alice")
    assert (cancelled.state, cancelled.cancel_reason) == ("cancelled", "cancelled by alice")
    assert cancelled.finished_at is not None and not await core.broker.is_queued(job.id)
    await core.lead()
    assert await core.rt.scheduler.tick() == 0 and link.nothing_pending()
    with pytest.raises(JobAlreadyFinished):
        await core.rt.jobs.cancel(job.id)


async def test_cancel_of_a_running_job_sends_cancel_with_the_configured_grace_then_ack_ends_it(core: Core) -> None:
    link = await core.add_agent()
    job = await core.submit()
    await core.lead()
    await core.run(job, link)
    cancelling = await core.rt.jobs.cancel(job.id, reason="cancelled by alice")
    assert cancelling.state == "cancelling"
    stop = await link.next(m.Cancel)
    assert (stop.job_id, stop.attempt, stop.reason, stop.grace_s) == (job.id, 1, "cancelled by alice", CANCEL_GRACE_S)
    assert (await core.rt.jobs.cancel(job.id)).state == "cancelling"  # asking again changes nothing
    assert await core.rt.jobs.on_cancel_ack(link.agent_id, m.CancelAck(job_id=job.id, attempt=1)) == []
    done = await core.job(job.id)
    assert done.state == "cancelled" and done.lease_expires_at is None and done.finished_at is not None


async def test_a_cancel_that_crossed_the_assignment_is_said_again_on_accept(core: Core) -> None:
    link = await core.add_agent()
    job = await core.submit()
    await core.lead()
    await core.assign(job, link)
    await core.rt.jobs.cancel(job.id)
    assert (await link.next(m.Cancel)).grace_s == CANCEL_GRACE_S
    [again] = await core.rt.jobs.on_accept(link.agent_id, m.JobAccept(job_id=job.id, attempt=1))
    assert isinstance(again, m.Cancel) and again.grace_s == CANCEL_GRACE_S
    assert (await core.job(job.id)).state == "cancelling"


async def test_server_side_timeout_ends_the_job_and_cancels_it_with_the_configured_grace(core: Core) -> None:
    link = await core.add_agent()
    job = await core.submit(timeout_s=5)
    await core.lead()
    await core.run(job, link)
    await core.pass_deadline(job.id)
    await core.rt.scheduler.reap()
    timed_out = await core.job(job.id)
    assert timed_out.state == "timed-out" and timed_out.lease_expires_at is None
    assert timed_out.error == "timed out after 5 s (enforced by the server)"
    stop = await link.next(m.Cancel)
    assert (stop.attempt, stop.reason, stop.grace_s) == (1, "timed out", CANCEL_GRACE_S)
    assert core.transitions("timed-out") == 1
    # The agent's late result is acknowledged and changes nothing.
    late = m.Result(job_id=job.id, attempt=1, state="succeeded", exit_code=0)
    assert await core.rt.jobs.on_result(link.agent_id, late) == [m.ResultAck(job_id=job.id, attempt=1, accepted=True)]
    assert (await core.job(job.id)).state == "timed-out"
