"""The scheduler: one leader at a time assigns queued jobs, reaps lost leases, enforces deadlines.

Leadership is the Broker's lock with a fencing epoch. The epoch is recorded in the Store at each
acquisition and every leader-only change is fenced with it, so a paused old leader that still
believes it leads has all of its writes refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from yardmaster.protocol import messages as m
from yardmaster.protocol.jobs import JobEvent, sources_of
from yardmaster.server.backends.keys import SCHEDULER_LOCK
from yardmaster.server.backends.base import BackendUnavailable, Broker, Store
from yardmaster.server.backends.records import JobRecord
from yardmaster.server.core.agents import AgentHub
from yardmaster.server.core.jobs import JobService
from yardmaster.server.core.placement import AgentSlots, choose_agent
from yardmaster.server.observability.metrics import Metrics

log = logging.getLogger("yardmaster.scheduler")


@dataclass(frozen=True)
class SchedulerTimings:
    lock_ttl_s: float
    renew_s: float
    tick_s: float
    reaper_s: float
    assign_ack_s: float
    timeout_slack_s: float
    cancel_grace_s: float
    reconcile_s: float = 10.0
    peek: int = 200


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
    ) -> None:
        self._broker = broker
        self._store = store
        self._agents = agents
        self._jobs = jobs
        self._metrics = metrics
        self._t = timings
        self.owner = owner
        self.epoch: int | None = None  # set while leading
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return self.epoch is not None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self.epoch is not None:
            try:
                await self._broker.release_lock(SCHEDULER_LOCK, self.owner)
            except BackendUnavailable:
                pass
            self._step_down("shutting down")

    # ---- leadership ------------------------------------------------------------------------

    async def _run(self) -> None:
        next_renew = 0.0
        next_reap = 0.0
        next_reconcile = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            try:
                if now >= next_renew:
                    await self._hold_lock()
                    next_renew = now + self._t.renew_s
                if self.epoch is not None:
                    if now >= next_reap:
                        await self.reap()
                        next_reap = now + self._t.reaper_s
                    if now >= next_reconcile:
                        await self.reconcile()
                        next_reconcile = now + self._t.reconcile_s
                    await self.tick()
            except BackendUnavailable as exc:
                # No assignment is made while state is unreachable; leadership is re-checked
                # on the next pass (the lock expires by itself if we cannot renew it).
                log.warning("scheduler paused", extra={"reason": str(exc)})
                if self.epoch is not None and time.monotonic() - now > self._t.lock_ttl_s:
                    self._step_down("could not renew in time")
                next_renew = 0.0
                # Jobs submitted or re-queued during the outage are in the Store but not in the
                # Broker's queue (and cancels may not have been delivered): reconcile as soon as
                # state is reachable again, not up to reconcile_s later.
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
        self._metrics.is_leader.set(1)
        self._metrics.epoch.set(epoch)
        log.info("became scheduler leader", extra={"epoch": epoch, "owner": self.owner})

    def _step_down(self, reason: str) -> None:
        if self.epoch is not None:
            log.warning("stepped down as scheduler leader", extra={"epoch": self.epoch, "reason": reason})
        self.epoch = None
        self._metrics.is_leader.set(0)

    async def _fenced_refused(self) -> None:
        """A fenced write failed: if a newer leader exists, stop acting as one."""
        _, latest = await self._broker.lock_holder(SCHEDULER_LOCK)
        if self.epoch is not None and latest > self.epoch:
            self._step_down(f"epoch {latest} is newer than ours")

    # ---- scheduling ----------------------------------------------------------------------------

    async def _agent_slots(self) -> list[AgentSlots]:
        connected = await self._agents.connected()
        if not connected:
            return []
        counts = await self._store.active_job_counts()
        slots: list[AgentSlots] = []
        for order, agent_id in enumerate(sorted(connected)):
            rec = await self._store.get_agent(agent_id)
            if rec is None or rec.revoked_at is not None or rec.draining_since is not None:
                continue
            free = rec.capacity - counts.get(agent_id, 0)
            slots.append(AgentSlots(agent_id=agent_id, labels=frozenset(rec.labels), free=free, order=order))
        return slots

    async def tick(self) -> int:
        """One scheduling pass; returns how many jobs were assigned."""
        epoch = self.epoch
        if epoch is None:
            return 0
        candidates = await self._broker.peek(self._t.peek)
        if not candidates:
            return 0  # an idle pass costs one Broker call, not a read of every agent
        slots = await self._agent_slots()
        if not any(s.free > 0 for s in slots):
            return 0
        assigned = 0
        for job_id in candidates:
            job = await self._store.get_job(job_id)
            if job is None or job.state != "queued":
                await self._broker.remove(job_id)  # stale entry: cancelled, or claimed before a crash
                continue
            agent = choose_agent(job.spec.labels, slots)
            if agent is None:
                continue  # nobody can take it now; it must not block the jobs behind it
            if await self._assign(job, agent.agent_id, epoch):
                agent.free -= 1
                assigned += 1
                if not any(s.free > 0 for s in slots):
                    break
            elif self.epoch is None:
                break
        return assigned

    async def _assign(self, job: JobRecord, agent_id: str, epoch: int) -> bool:
        now = time.time()
        attempt = job.attempt + 1
        deadline = now + job.spec.timeout_s
        updated = await self._store.update_job(
            job.id,
            expect_states=["queued"],
            expect_attempt=job.attempt,
            fence_epoch=epoch,
            changes={
                "state": "assigned",
                "attempt": attempt,
                "agent_id": agent_id,
                "epoch": epoch,
                "assigned_at": now,
                "updated_at": now,
                "lease_expires_at": now + self._t.assign_ack_s,
                "deadline": deadline,
                "exit_code": None,
                "error": None,
            },
        )
        if updated is None:
            await self._fenced_refused()
            return False
        await self._broker.remove(job.id)
        self._metrics.transitions.labels("assigned").inc()
        self._metrics.dispatch_latency.observe(max(0.0, now - job.enqueued_at))
        await self._jobs.announce(updated)
        sent = await self._agents.send_to_agent(
            agent_id, m.JobAssign(job_id=job.id, attempt=attempt, spec=job.spec, deadline=deadline)
        )
        if not sent:
            log.warning("assigned agent is gone; the job returns when its lease expires", extra={"job_id": job.id})
        return True

    # ---- leases, deadlines, reconciliation -----------------------------------------------------

    async def reap(self) -> None:
        epoch = self.epoch
        if epoch is None:
            return
        now = time.time()
        for job in await self._store.jobs_with_expired_leases(now):
            final = job.runs >= job.spec.max_attempts
            event = JobEvent.LEASE_LOST_FINAL if final else JobEvent.LEASE_LOST_RETRY
            updated = await self._jobs.requeue(job, event, fence_epoch=epoch)
            if updated is None:
                await self._fenced_refused()
                continue
            log.info("lease expired", extra={"job_id": job.id, "attempt": job.attempt, "state": updated.state})
            if job.agent_id is not None:
                # If the agent is still around (e.g. it never answered the job-assign), stop that attempt.
                await self._agents.send_to_agent(
                    job.agent_id,
                    m.Cancel(job_id=job.id, attempt=job.attempt, reason="lease expired", grace_s=self._t.cancel_grace_s),
                )
        for job in await self._store.jobs_past_deadline(now - self._t.timeout_slack_s):
            updated = await self._store.update_job(
                job.id,
                expect_states=sources_of(JobEvent.TIME_OUT),
                expect_attempt=job.attempt,
                fence_epoch=epoch,
                changes={
                    "state": "timed-out",
                    "error": f"timed out after {job.spec.timeout_s} s (enforced by the server)",
                    "finished_at": now,
                    "updated_at": now,
                    "lease_expires_at": None,
                },
            )
            if updated is None:
                await self._fenced_refused()
                continue
            await self._jobs.announce(updated)
            if job.agent_id is not None:
                await self._agents.send_to_agent(
                    job.agent_id, m.Cancel(job_id=job.id, attempt=job.attempt, reason="timed out", grace_s=2.0)
                )

    async def reconcile(self) -> None:
        """Put back any queued job missing from the Broker's queue (a Broker restart without
        persistence, or a crash between the Store write and the enqueue), and say every pending
        cancel again (pub/sub delivery is best effort; the agent acknowledges a cancel at most once
        per attempt and ignores one for an attempt it does not run)."""
        for job in await self._store.list_jobs(states=["cancelling"], limit=500):
            await self._jobs.send_cancel(job)
        before: str | None = None
        while True:
            page = await self._store.list_jobs(states=["queued"], limit=500, before=before)
            for job in page:
                await self._broker.enqueue(job.id, job.priority, job.enqueued_at)
            if len(page) < 500:
                return
            before = page[-1].id
