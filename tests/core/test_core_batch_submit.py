"""Batch submit (`JobService.submit_many`): all or nothing, submission order kept, one Broker
round trip to enqueue and one to announce."""

from __future__ import annotations

import pytest

from tests.core.conftest import Core
from yardmaster.protocol.jobs import JobSpec, Resources
from yardmaster.server.backends.keys import ALL_JOBS_CHANNEL
from yardmaster.server.core.admission import AdmissionRefused


def specs(n: int, **fields: object) -> list[JobSpec]:
    return [JobSpec(image="busybox", command=["echo", str(i)], **fields) for i in range(n)]  # type: ignore[arg-type]


async def test_a_batch_is_queued_in_submission_order_in_one_enqueue_and_one_publish(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []  # the JobService's calls (MemoryBroker's *_many call the single ones)
    depth = 0
    for name in ("admit_many", "enqueue_many", "publish", "publish_many"):
        real = getattr(core.broker, name)

        async def counted(*args: object, _real=real, _name=name) -> object:  # type: ignore[no-untyped-def]
            nonlocal depth
            if depth == 0:
                calls.append(_name)
            depth += 1
            try:
                return await _real(*args)
            finally:
                depth -= 1

        monkeypatch.setattr(core.broker, name, counted)
    watcher = await core.broker.subscribe(ALL_JOBS_CHANNEL)
    jobs = await core.rt.jobs.submit_many(specs(50), "alice")
    assert calls == ["admit_many", "publish_many"]
    assert [j.spec.command for j in jobs] == [["echo", str(i)] for i in range(50)]
    assert await core.broker.peek(100) == [j.id for j in jobs]  # same priority: FIFO in batch order
    stored = await core.rt.jobs.list_jobs(owner="alice", limit=100)
    assert [j.id for j in stored] == [j.id for j in reversed(jobs)] and {j.state for j in stored} == {"queued"}
    assert core.transitions("queued") == 50
    announced = [await anext(aiter(watcher)) for _ in range(50)]
    assert [a for a in announced if b'"state":"queued"' in a] == announced
    await watcher.close()


async def test_a_refused_spec_refuses_the_whole_batch_naming_its_index(core: Core) -> None:
    batch = specs(3)
    batch[2] = JobSpec(image="busybox", command=["true"], resources=Resources(memory_mb=1_000_000))
    with pytest.raises(AdmissionRefused) as refused:
        await core.rt.jobs.submit_many(batch, "alice")
    assert refused.value.field == "[2].resources.memory_mb"
    assert await core.rt.jobs.list_jobs(owner=None) == []
    assert await core.broker.queue_depth() == 0 and core.transitions("queued") == 0
