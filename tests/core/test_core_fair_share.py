"""Fair share in the scheduler (issue 9), on both Brokers: inside a priority band the queue takes
users round-robin, so user A's 1,000 jobs queued first never make user B's 10 jobs behind them
wait for all of A's; each user's own jobs keep their order. YM_FAIR_SHARE=false is plain FIFO."""

from __future__ import annotations

import pytest

from tests.core.conftest import Core, CoreFactory, FakeAgentLink
from tests.support.redis_plugin import RedisBrokerFactory
from yardmaster.protocol import messages as m
from yardmaster.protocol.jobs import JobSpec
from yardmaster.server.backends.base import Broker

A_JOBS = 1000  # the default queued-jobs quota: exactly what user A may queue
B_JOBS = 10
SPEC = JobSpec(image="busybox", command=["true"])


async def assignments(core: Core, link: FakeAgentLink, count: int) -> list[str]:
    """Run scheduling passes until `count` jobs were assigned; their ids in assignment order.
    Each pass fills the agent, whose jobs then succeed (so the next pass has free slots)."""
    order: list[str] = []
    while len(order) < count:
        assert await core.rt.scheduler.tick() > 0
        while not link.nothing_pending():
            assign = await link.next(m.JobAssign)
            order.append(assign.job_id)
            await core.rt.jobs.on_reports(link.agent_id, [
                m.JobAccept(job_id=assign.job_id, attempt=assign.attempt),
                m.Result(job_id=assign.job_id, attempt=assign.attempt, state="succeeded", exit_code=0),
            ])
    return order[:count]


async def queue_a_then_b(core: Core) -> tuple[list[str], list[str]]:
    a = [job.id for job in await core.rt.jobs.submit_many([SPEC] * A_JOBS, "user-a")]
    b = [job.id for job in await core.rt.jobs.submit_many([SPEC] * B_JOBS, "user-b")]
    return a, b


def in_order(ids: list[str], submitted: list[str]) -> bool:
    """`ids` are a prefix of the submission order `submitted`: FIFO within one user."""
    return ids == submitted[: len(ids)]


async def fair_share_scenario(core: Core) -> None:
    link = await core.add_agent(capacity=4)
    a, b = await queue_a_then_b(core)
    await core.lead()
    first = await assignments(core, link, 2 * B_JOBS)
    assert set(b) <= set(first), "every job of B starts within the first 2x10 assignments"
    assert in_order([j for j in first if j in set(a)], a)
    assert in_order([j for j in first if j in set(b)], b)
    # The rest of A's jobs are still queued, in their order.
    rest = await core.broker.peek(2 * A_JOBS)
    assert rest == a[len(first) - B_JOBS :]


async def fifo_scenario(core: Core) -> None:
    link = await core.add_agent(capacity=4)
    a, b = await queue_a_then_b(core)
    assert await core.broker.peek(2 * A_JOBS) == a + b  # B behind all of A
    await core.lead()
    assert await assignments(core, link, 2 * B_JOBS) == a[: 2 * B_JOBS]


async def test_fair_share_starts_b_within_the_first_twenty_assignments(make_core: CoreFactory) -> None:
    await fair_share_scenario(await make_core())


async def test_without_fair_share_the_queue_is_plain_fifo(make_core: CoreFactory) -> None:
    await fifo_scenario(await make_core(fair_share=False))


async def test_a_user_who_queues_after_a_pause_joins_the_current_round(make_core: CoreFactory) -> None:
    """No credit saved up: B, idle while A's jobs ran, does not get a run of turns of its own."""
    core = await make_core()
    link = await core.add_agent(capacity=4)
    a = [job.id for job in await core.rt.jobs.submit_many([SPEC] * 20, "user-a")]
    await core.lead()
    assert await assignments(core, link, 8) == a[:8]
    b = [job.id for job in await core.rt.jobs.submit_many([SPEC] * 4, "user-b")]
    # A's next and B's first share the current round; then they alternate.
    assert await core.broker.peek(8) == [a[8], b[0], a[9], b[1], a[10], b[2], a[11], b[3]]


async def test_fair_share_holds_inside_each_priority_band_only(make_core: CoreFactory) -> None:
    """A higher priority still goes first, whoever queued it."""
    core = await make_core()
    low_a = [job.id for job in await core.rt.jobs.submit_many([SPEC] * 3, "user-a")]
    high_a = [job.id for job in await core.rt.jobs.submit_many([JobSpec(image="busybox", command=["true"], priority=5)] * 2, "user-a")]
    low_b = [job.id for job in await core.rt.jobs.submit_many([SPEC] * 2, "user-b")]
    assert await core.broker.peek(10) == [*high_a, low_a[0], low_b[0], low_a[1], low_b[1], low_a[2]]


@pytest.mark.redis
@pytest.mark.parametrize("fair_share", [True, False], ids=["fair-share", "fifo"])
async def test_the_scenario_on_redis(make_core: CoreFactory, redis_broker: RedisBrokerFactory, fair_share: bool) -> None:
    broker: Broker = redis_broker()
    core = await make_core(broker=broker, fair_share=fair_share)
    await (fair_share_scenario(core) if fair_share else fifo_scenario(core))
