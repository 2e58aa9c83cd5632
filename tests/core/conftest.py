"""In-process core fixtures: one replica's `Runtime` over MemoryBroker and SqliteStore, fake agent
links, and the scheduler driven step by step (no loop, no sleeping).

Every test here also checks that each state written to the Store was just computed by
`protocol.jobs.transition` (the `CheckedStore` below): a hand-written state fails the test.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from yardmaster.protocol import messages as m
from yardmaster.protocol.jobs import JobEvent, JobSpec
from yardmaster.protocol.jobs import transition as real_transition
from yardmaster.server.backends.base import Broker, JobUpdate
from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.backends.records import AgentRecord, JobRecord
from yardmaster.server.backends.sqlite_store import SqliteStore
from yardmaster.server.core import jobs as jobs_module
from yardmaster.server.runtime import Runtime
from yardmaster.server.settings import Settings, load_settings

M = TypeVar("M", bound=msgspec.Struct)
MESSAGE_WAIT_S = 5.0  # a generous bound: pub/sub delivery in one process takes microseconds
CANCEL_GRACE_S = 7.5  # distinct from every default, so a test sees which grace was used

_agent_numbers = itertools.count(1)


class TransitionLedger:
    """States `transition()` produced and not yet written; the states written, in order."""

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.written: list[tuple[str, str]] = []  # (job id, state)

    def transition(self, state: str, event: JobEvent) -> str:
        new_state = real_transition(state, event)
        self.pending.append(new_state)
        return new_state


class CheckedStore(SqliteStore):
    """A real SqliteStore that refuses a state write `transition()` did not just compute."""

    def __init__(self, path: str, ledger: TransitionLedger) -> None:
        super().__init__(path)
        self.ledger = ledger

    async def update_jobs(self, updates: Sequence[JobUpdate], *, fence_epoch: int | None = None) -> list[JobRecord | None]:
        # update_job goes through here too (SqliteStore.update_job is update_jobs of one).
        states = [str(u.changes["state"]) for u in updates if "state" in u.changes]
        for job_id, state in zip((u.job_id for u in updates if "state" in u.changes), states, strict=True):
            assert state in self.ledger.pending, f"job {job_id}: state {state!r} written without transition()"
        if states:
            self.ledger.pending.clear()
        results = await super().update_jobs(updates, fence_epoch=fence_epoch)
        for u, updated in zip(updates, results, strict=True):
            if updated is not None and "state" in u.changes:
                self.ledger.written.append((u.job_id, updated.state))
        return results


class FakeAgentLink:
    """What the agent channel gives AgentHub, recording every message the core sends."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.session_id = f"ses_{agent_id}"
        self.sent: list[m.ServerToAgent] = []
        self.closed: tuple[int, str] | None = None
        self._inbox: asyncio.Queue[m.ServerToAgent] = asyncio.Queue()

    async def send(self, msg: m.ServerToAgent) -> None:
        self.sent.append(msg)
        self._inbox.put_nowait(msg)

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    async def next(self, kind: type[M]) -> M:
        """The next message sent to this agent, which must be a `kind`."""
        msg = await asyncio.wait_for(self._inbox.get(), MESSAGE_WAIT_S)
        assert isinstance(msg, kind), f"expected {kind.__name__}, got {msg!r}"
        return msg

    def nothing_pending(self) -> bool:
        return self._inbox.empty()


class Core:
    def __init__(self, rt: Runtime, store: CheckedStore, broker: Broker, ledger: TransitionLedger) -> None:
        self.rt = rt
        self.store = store
        self.broker = broker
        self.ledger = ledger

    @property
    def settings(self) -> Settings:
        return self.rt.settings

    async def add_agent(self, labels: Collection[str] = (), capacity: int = 1) -> FakeAgentLink:
        agent_id = f"agt_{next(_agent_numbers):04d}"
        await self.store.put_agent(
            AgentRecord(
                id=agent_id, name=agent_id, token_hash=agent_id, labels=sorted(labels), capacity=capacity,
                created_at=time.time(),
            )
        )
        link = FakeAgentLink(agent_id)
        await self.rt.agents.register(link)
        return link

    async def lead(self) -> int:
        """Take the scheduler lock (as the loop's first pass would); the fencing epoch."""
        await self.rt.scheduler._hold_lock()
        assert self.rt.scheduler.epoch is not None
        return self.rt.scheduler.epoch

    async def submit(self, owner: str = "alice", **fields: Any) -> JobRecord:
        fields.setdefault("image", "busybox")
        fields.setdefault("command", ["true"])
        return await self.rt.jobs.submit(JobSpec(**fields), owner)

    async def job(self, job_id: str) -> JobRecord:
        return await self.rt.jobs.get(job_id)

    async def expire_lease(self, job_id: str) -> None:
        """Move the job's lease into the past (its state is untouched), as waiting would."""
        job = await self.job(job_id)
        assert await self.store.update_job(
            job_id, expect_states=[job.state], changes={"lease_expires_at": time.time() - 1}
        )

    async def pass_deadline(self, job_id: str) -> None:
        job = await self.job(job_id)
        past = time.time() - self.settings.timeout_slack_s - 1
        assert await self.store.update_job(job_id, expect_states=[job.state], changes={"deadline": past})

    async def assign(self, job: JobRecord, link: FakeAgentLink) -> m.JobAssign:
        """One scheduling pass that must give `job` to `link`'s agent; the job-assign it got."""
        assert await self.rt.scheduler.tick() >= 1
        msg = await link.next(m.JobAssign)
        assert msg.job_id == job.id
        return msg

    async def run(self, job: JobRecord, link: FakeAgentLink) -> JobRecord:
        """Assign and accept: the job is running on `link`'s agent."""
        assign = await self.assign(job, link)
        assert await self.rt.jobs.on_accept(link.agent_id, m.JobAccept(job_id=job.id, attempt=assign.attempt)) == []
        running = await self.job(job.id)
        assert running.state == "running"
        return running

    def transitions(self, state: str) -> float:
        value = self.rt.metrics.registry.get_sample_value("yardmaster_job_transitions_total", {"state": state})
        return value or 0.0


def core_settings(tmp_path: Path, **overrides: Any) -> Settings:
    # No running-jobs quota unless a test sets one (tests/core/test_core_quotas.py): many tests
    # here run more jobs of one owner at once than the default allows.
    overrides.setdefault("quota_running_jobs", 0)
    return load_settings({}, data_dir=str(tmp_path), cancel_grace_s=CANCEL_GRACE_S, **overrides)


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> TransitionLedger:
    ledger = TransitionLedger()
    monkeypatch.setattr(jobs_module, "transition", ledger.transition)
    return ledger


CoreFactory = Callable[..., Awaitable[Core]]


@pytest.fixture
async def make_core(tmp_path: Path, ledger: TransitionLedger) -> AsyncIterator[CoreFactory]:
    """`await make_core(broker=None, **settings)`: a Core on `broker` (a MemoryBroker by default)
    with those settings; one per test (they share the test's SQLite file)."""
    made: list[Runtime] = []

    async def make(broker: Broker | None = None, **overrides: Any) -> Core:
        assert not made, "one Core per test"
        store = CheckedStore(str(tmp_path / "yardmaster.db"), ledger)
        broker = broker if broker is not None else MemoryBroker()
        rt = Runtime(core_settings(tmp_path, **overrides), broker, store)
        made.append(rt)
        # Runtime.start without its loops: the tests drive the scheduler themselves.
        await store.start()
        await broker.start()
        await rt.agents.start()
        return Core(rt, store, broker, ledger)

    try:
        yield make
    finally:
        for rt in made:
            await rt.stop()


@pytest.fixture
async def core(make_core: CoreFactory) -> Core:
    return await make_core()
