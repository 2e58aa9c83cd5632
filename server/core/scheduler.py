"""The scheduler: one leader at a time assigns queued jobs, reaps lost leases, enforces deadlines.
It decides what happens and when; every resulting change of a job's state is made by JobService.

Leadership is the Broker's lock with a fencing epoch. The epoch is recorded in the Store at each
acquisition and every leader-only change is fenced with it, so a paused old leader that still
believes it leads has all of its writes refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from yardmaster.server.backends.keys import SCHEDULER_LOCK
from yardmaster.server.backends.base import BackendUnavailable, Broker, Store
from yardmaster.server.backends.records import AgentRecord, JobRecord
from yardmaster.server.core.agent_registry import grant_of
from yardmaster.server.core.agents import AgentHub
from yardmaster.server.core.ids import id_time
from yardmaster.server.core.jobs import JobService
from yardmaster.server.core.placement import AgentSlots, choose_agent
from yardmaster.server.observability.metrics import Metrics

log = logging.getLogger("yardmaster.scheduler")

FRESH_MAX = 10_000  # job records the leader keeps from their submission to their first pass
# A queue entry is made before its job's record is written (the Broker's queue counts quotas):
# an entry without a record is dropped only once it is older than this.
UNWRITTEN_GRACE_S = 30.0
# With owners at their running-jobs quota filling the head of the queue (YM_FAIR_SHARE=false puts
# one owner's whole backlog first), a pass looks deeper, up to this many times `peek`, for the
# jobs of owners under it.
DEEP_PEEK_FACTOR = 16


@dataclass
class _CapacityView:
    """The leader's view of agent records and of the slots in use on each agent, so that a
    scheduling pass need not read them. Slots in use go up at each claim the leader makes and
    are re-read when the view is older than `view_max_age_s` or says every agent is full;
    agents are re-read when older, when an unknown agent connects, or after a registration
    change on this replica (`agents_changed`). Between reads the view can only
    over-count what is in use (jobs that ended since), so it never over-assigns; and a pass
    that finds every agent full re-reads before giving up, so a freed slot is used at once."""

    used: dict[str, int] = field(default_factory=dict)
    used_read_at: float = float("-inf")
    agents: dict[str, AgentRecord] = field(default_factory=dict)
    agents_read_at: float = float("-inf")
    agents_stale: bool = True
    # Per owner, jobs in a leased state (the running-jobs quota), kept like `used`: read with it,
    # +1 at each claim, and read again by a pass that finds an owner at the quota.
    running: Counter[str] = field(default_factory=Counter)
    running_read_at: float = float("-inf")


@dataclass(frozen=True)
class SchedulerTimings:
    lock_ttl_s: float
    renew_s: float
    tick_s: float
    reaper_s: float
    timeout_slack_s: float
    reconcile_s: float = 10.0
    peek: int = 200
    # How old the leader's view of agents and slots in use may get before a pass re-reads it.
    view_max_age_s: float = 1.0


@dataclass
class _Pass:
    """What one scheduling pass carries from chunk to chunk."""

    epoch: int
    slots: list[AgentSlots]
    started: float  # monotonic
    assigned: int = 0
    at_quota: bool = False  # some candidate waited for its owner's running jobs


@dataclass(frozen=True)
class SchedulerPolicy:
    # Per owner, jobs in a leased state (assigned, running, cancelling); 0: none. An owner at
    # it gets no further assignment: their queued jobs wait, and other owners' jobs go ahead.
    running_jobs_quota: int = 0


class Scheduler:
    def __init__(
        self,
        broker: Broker,
        store: Store,
        agents: AgentHub,
        jobs: JobService,
        metrics: Metrics,
        timings: SchedulerTimings,
        owner: str,
        policy: SchedulerPolicy = SchedulerPolicy(),
    ) -> None:
        self._broker = broker
        self._store = store
        self._agents = agents
        self._jobs = jobs
        self._metrics = metrics
        self._t = timings
        self._policy = policy
        self.owner = owner
        self.epoch: int | None = None  # set while leading
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock_task: asyncio.Task[None] | None = None
        self._view = _CapacityView()
        # Records of jobs this replica queued while leading, by id: a pass takes a candidate's
        # record from here instead of reading it. A record that went stale meanwhile (a cancel)
        # only makes its claim's compare-and-set fail.
        self._fresh: dict[str, JobRecord] = {}
        jobs.on_queued(self._offer)

    def _offer(self, jobs: Sequence[JobRecord]) -> None:
        if self.epoch is None:
            return
        fresh = self._fresh
        for job in jobs:
            fresh[job.id] = job
        while len(fresh) > FRESH_MAX:  # jobs nobody can take stay queued: forget the oldest
            del fresh[next(iter(fresh))]

    @property
    def is_leader(self) -> bool:
        return self.epoch is not None

    def wake(self) -> None:
        self._wake.set()

    def agents_changed(self) -> None:
        """An agent's registration changed: re-read agents, then schedule."""
        self._view.agents_stale = True
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")
        self._lock_task = asyncio.create_task(self._keep_lock(), name="scheduler-lock")

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        for task in (self._task, self._lock_task):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        if self.epoch is not None:
            try:
                await self._broker.release_lock(SCHEDULER_LOCK, self.owner)
            except BackendUnavailable:
                pass
            self._step_down("shutting down")

    # ---- leadership ------------------------------------------------------------------------

    async def _keep_lock(self) -> None:
        """Take and renew the leader lock, in a task of its own: a long scheduling pass under load
        must never hold up the renewal until the lock expires."""
        renewed_at = time.monotonic()
        while not self._stopping.is_set():
            was_leader = self.is_leader
            try:
                asked_at = time.monotonic()  # the lock's new TTL runs from no earlier than this
                await self._hold_lock()
                renewed_at = asked_at
                delay = self._t.renew_s
            except BackendUnavailable as exc:
                log.warning("scheduler paused", extra={"reason": str(exc)})
                # The lock expires by itself if we cannot renew it: stop acting as the leader
                # once it surely has.
                if self.epoch is not None and time.monotonic() - renewed_at > self._t.lock_ttl_s:
                    self._step_down("could not renew in time")
                delay = min(1.0, self._t.renew_s)
            except Exception:
                log.exception("scheduler lock renewal failed")
                delay = min(1.0, self._t.renew_s)
            if self.is_leader and not was_leader:
                self._wake.set()  # start scheduling now, not at the pass loop's next look
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    async def _run(self) -> None:
        next_reap = 0.0
        next_reconcile = 0.0
        led: int | None = None
        while not self._stopping.is_set():
            now = time.monotonic()
            epoch = self.epoch
            if epoch != led:
                led = epoch
                next_reap = next_reconcile = 0.0  # a new term starts with a full look
            try:
                if epoch is not None:
                    if now >= next_reap:
                        await self.reap()
                        next_reap = now + self._t.reaper_s
                    if now >= next_reconcile:
                        await self.reconcile()
                        next_reconcile = now + self._t.reconcile_s
                    await self.tick()
            except BackendUnavailable as exc:
                # No assignment is made while state is unreachable. Jobs submitted or re-queued
                # during the outage are in the Store but not in the Broker's queue (and cancels
                # may not have been delivered): reconcile as soon as state is reachable again,
                # not up to reconcile_s later.
                log.warning("scheduler paused", extra={"reason": str(exc)})
                next_reconcile = 0.0
                await self._sleep(min(1.0, self._t.renew_s))
                continue
            except Exception:
                log.exception("scheduler pass failed")
            await self._sleep(self._t.tick_s if self.epoch is not None else self._t.renew_s)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _hold_lock(self) -> None:
        ttl_ms = int(self._t.lock_ttl_s * 1000)
        if self.epoch is not None:
            if await self._broker.renew_lock(SCHEDULER_LOCK, self.owner, ttl_ms):
                return
            self._step_down("lock lost")
        epoch = await self._broker.acquire_lock(SCHEDULER_LOCK, self.owner, ttl_ms)
        if epoch is None:
            return
        # From here on, writes fenced with an older epoch fail everywhere.
        fence = await self._store.advance_fence(epoch)
        if fence > epoch:
            # The Broker forgot epochs the Store has seen (Redis lost its data): move its counter
            # past the fence and take the lock again, so our epoch is new and our writes count.
            log.warning("broker epoch behind the store's fence", extra={"epoch": epoch, "fence": fence})
            await self._broker.raise_epoch(SCHEDULER_LOCK, fence)
            await self._broker.release_lock(SCHEDULER_LOCK, self.owner)
            return
        self.epoch = epoch
        self._view = _CapacityView()  # what a former leader counted is not ours to trust
        self._fresh.clear()
        self._metrics.is_leader.set(1)
        self._metrics.epoch.set(epoch)
        log.info("became scheduler leader", extra={"epoch": epoch, "owner": self.owner})

    def _step_down(self, reason: str) -> None:
        if self.epoch is not None:
            log.warning("stepped down as scheduler leader", extra={"epoch": self.epoch, "reason": reason})
        self.epoch = None
        self._metrics.is_leader.set(0)
        self._fresh.clear()

    async def _fenced_refused(self) -> None:
        """A fenced write failed: if a newer leader exists, stop acting as one."""
        _, latest = await self._broker.lock_holder(SCHEDULER_LOCK)
        if self.epoch is not None and latest > self.epoch:
            self._step_down(f"epoch {latest} is newer than ours")

    # ---- scheduling ----------------------------------------------------------------------------

    async def _agent_slots(self, *, fresh: bool = False) -> list[AgentSlots]:
        """Connected agents that take work, with their free slots, from the leader's view (read
        from the Store only when it is stale or `fresh` is asked for)."""
        connected = await self._agents.connected()
        if not connected:
            return []
        view = self._view
        now = time.monotonic()
        if fresh or now - view.used_read_at > self._t.view_max_age_s:
            view.used = dict(await self._store.active_job_counts())
            view.used_read_at = now
            if self._policy.running_jobs_quota:
                await self._read_running(Counter())
        if view.agents_stale or now - view.agents_read_at > self._t.view_max_age_s or not connected.keys() <= view.agents.keys():
            view.agents_stale = False
            view.agents = {rec.id: rec for rec in await self._store.list_agents()}
            view.agents_read_at = now
        slots: list[AgentSlots] = []
        for order, agent_id in enumerate(sorted(connected)):
            rec = view.agents.get(agent_id)
            if rec is None or rec.revoked_at is not None or rec.draining_since is not None:
                continue
            grant = grant_of(rec)  # the registration decides, not the agent's hello
            free = grant.capacity - view.used.get(agent_id, 0)
            slots.append(AgentSlots(agent_id=agent_id, labels=frozenset(grant.labels), free=free, order=order,
                                    executor=rec.executor or "docker"))
        return slots

    async def _read_running(self, pending: Counter[str]) -> None:
        """Re-read every owner's leased jobs, plus `pending`: claims picked but not yet made."""
        view = self._view
        view.running = Counter(await self._store.active_jobs_by_owner())
        view.running.update(pending)
        view.running_read_at = time.monotonic()

    async def tick(self) -> int:
        """One scheduling pass; returns how many jobs were assigned."""
        epoch = self.epoch
        if epoch is None:
            return 0
        limit = self._t.peek
        candidates = await self._broker.peek(limit)
        more = len(candidates) >= limit  # the queue may go on past what this pass peeked
        if not candidates:
            return 0  # an idle pass costs one Broker call, not a read of every agent
        pass_started = time.monotonic()
        read_before = self._view.used_read_at
        slots = await self._agent_slots()
        if not any(s.free > 0 for s in slots) and self._view.used_read_at == read_before:
            # The view counts our claims at once but jobs that ended elsewhere only when re-read:
            # before concluding that every agent is full, look again (at most once per pass).
            slots = await self._agent_slots(fresh=True)
            if not any(s.free > 0 for s in slots):
                return 0
        this = _Pass(epoch, slots, started=pass_started)
        seen: set[str] = set()
        while True:
            start = 0
            while start < len(candidates):
                # Read the candidates in chunks sized to the free slots: a deep queue costs a pass
                # what it can assign, yet a job no agent can take never hides the ones behind it.
                free = sum(max(0, s.free) for s in slots)
                chunk = candidates[start : start + min(self._t.peek, 2 * free + 8)]
                start += len(chunk)
                seen.update(chunk)
                if not await self._assign_chunk(chunk, this):
                    return this.assigned
            if not (this.at_quota and more) or limit >= self._t.peek * DEEP_PEEK_FACTOR:
                return this.assigned
            # Every candidate was seen, some waited for their owner's quota and the queue goes on:
            # look further down it for other owners' jobs.
            limit *= 4
            page = await self._broker.peek(limit)
            more = len(page) >= limit
            candidates = [job_id for job_id in page if job_id not in seen]

    async def _assign_chunk(self, chunk: list[str], this: _Pass) -> bool:
        """Place and claim the queued jobs among `chunk`; False when the pass is over (no free slot
        left, or a newer leader exists)."""
        fresh = self._fresh
        jobs = {job_id: fresh.pop(job_id) for job_id in chunk if job_id in fresh}
        unknown = [job_id for job_id in chunk if job_id not in jobs]
        if unknown:
            jobs.update(await self._store.get_jobs(unknown))
        quota = self._policy.running_jobs_quota
        stale: list[str] = []
        picks: list[tuple[JobRecord, AgentSlots]] = []
        pending: Counter[str] = Counter()  # picked and not yet claimed, per owner
        for job_id in chunk:
            job = jobs.get(job_id)
            if job is None:
                made_at = id_time(job_id)
                if made_at is None or time.time() - made_at > UNWRITTEN_GRACE_S:
                    stale.append(job_id)  # its submit failed after the admission
                continue  # being submitted: its record is on its way to the Store
            if job.state != "queued":
                stale.append(job_id)  # cancelled, or claimed before a crash
                continue
            if quota and await self._at_quota(job.owner, quota, this, pending):
                this.at_quota = True
                fresh[job_id] = job  # it waits: keep its record for the next pass
                continue
            agent = choose_agent(job.spec.labels, this.slots, job.spec.executor)
            if agent is None:
                continue  # nobody can take it now; it must not block the jobs behind it
            agent.free -= 1
            if quota:
                self._view.running[job.owner] += 1
                pending[job.owner] += 1
            picks.append((job, agent))
            if not any(s.free > 0 for s in this.slots):
                break
        if stale:
            await self._broker.remove_many(stale)
        # The claims of a chunk are one Store transaction (and one publish round trip).
        results = await self._jobs.claim_many([(job, agent.agent_id) for job, agent in picks], this.epoch)
        for (job, agent), claimed in zip(picks, results, strict=True):
            if claimed is None:
                agent.free += 1
                if quota:
                    self._view.running[job.owner] -= 1
            else:
                self._view.used[agent.agent_id] = self._view.used.get(agent.agent_id, 0) + 1
                this.assigned += 1
        if any(claimed is None for claimed in results):
            await self._fenced_refused()
            if self.epoch is None:
                return False
        return any(s.free > 0 for s in this.slots)

    async def _at_quota(self, owner: str, quota: int, this: _Pass, pending: Counter[str]) -> bool:
        """Whether `owner` has `quota` jobs leased. Jobs of theirs may have ended since the view was
        read: the first time a pass finds someone at the quota, it reads the counts again."""
        if self._view.running[owner] < quota:
            return False
        if self._view.running_read_at < this.started:
            await self._read_running(pending)
        return self._view.running[owner] >= quota

    # ---- leases, deadlines, reconciliation -----------------------------------------------------

    async def reap(self) -> None:
        epoch = self.epoch
        if epoch is None:
            return
        now = time.time()
        for job in await self._store.jobs_with_expired_leases(now):
            if await self._jobs.expire_lease(job, epoch) is None:
                await self._fenced_refused()
        for job in await self._store.jobs_past_deadline(now - self._t.timeout_slack_s):
            if await self._jobs.time_out(job, epoch) is None:
                await self._fenced_refused()

    async def reconcile(self) -> None:
        """Put back any queued job missing from the Broker's queue (a Broker restart without
        persistence, or a crash between the Store write and the enqueue), and say every pending
        cancel again (pub/sub delivery is best effort; the agent acknowledges a cancel at most once
        per attempt and ignores one for an attempt it does not run)."""
        for job in await self._store.list_jobs(states=["cancelling"], limit=500):
            await self._jobs.send_cancel(job)
        queued: list[JobRecord] = []
        before: str | None = None
        while True:
            page = await self._store.list_jobs(states=["queued"], limit=500, before=before)
            queued += page
            if len(page) < 500:
                break
            before = page[-1].id
        # Oldest first, so that jobs the Broker lost take their fair-share turns in their order.
        queued.sort(key=lambda job: (job.enqueued_at, job.id))
        for start in range(0, len(queued), 500):
            await self._broker.enqueue_many([self._jobs.queue_entry(job) for job in queued[start : start + 500]])
