"""Jobs: submission, listing, cancellation, the leader's claims and timeouts, and what agents
report. No HTTP, no WebSockets here.

Every change of a job's state is made here: a compare-and-set on the Store record (state,
attempt and, for the agent's own messages, the agent id; for the leader's, its fencing epoch),
with the target state taken from the one transition function in protocol.jobs, and counted once
in the transition metric. A replayed, late or stale message changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from yardmaster.protocol import messages as m
from yardmaster.protocol.jobs import (
    TERMINAL_STATES,
    JobEvent,
    JobSpec,
    result_event,
    sources_of,
    transition,
)
from yardmaster.server.backends.base import BackendUnavailable, Broker, JobUpdate, QueueEntry, Store
from yardmaster.server.backends.records import JobRecord, LogEntry
from yardmaster.server.core.admission import AdmissionPolicy, AdmissionRefused, check_spec
from yardmaster.server.core.agents import AgentHub
from yardmaster.server.core.batching import Batcher, Coalescer
from yardmaster.server.core.events import EventPublisher
from yardmaster.server.core.ids import new_id
from yardmaster.server.core.quotas import QUEUED_JOBS, QuotaExceeded
from yardmaster.server.observability.metrics import Metrics

log = logging.getLogger("yardmaster.jobs")


# The states an agent's result normally arrives in (a very short job can report before its accept).
_RUNNING_STATES = ("assigned", "running")


def _result_changes(msg: m.Result) -> dict[str, object]:
    changes: dict[str, object] = {
        "exit_code": msg.exit_code,
        "error": msg.error,
        "finished_at": msg.finished_at or time.time(),
        "lease_expires_at": None,
    }
    if msg.started_at is not None:
        changes["started_at"] = msg.started_at
    return changes


def _queued_record(spec: JobSpec, owner: str, now: float) -> JobRecord:
    return JobRecord(
        id=new_id("job"), owner=owner, spec=spec, state="queued", priority=spec.priority,
        created_at=now, updated_at=now, enqueued_at=now,
    )


class JobNotFound(LookupError):
    pass


class JobAlreadyFinished(RuntimeError):
    def __init__(self, job: JobRecord) -> None:
        super().__init__(f"job {job.id} is already {job.state}")
        self.job = job


@dataclass(frozen=True)
class JobTimings:
    lease_s: float
    cancel_grace_s: float
    log_cap_bytes: int = 0
    assign_ack_s: float = 10.0  # lease of an assignment until the agent's job-accept


@dataclass(frozen=True)
class QueuePolicy:
    queued_jobs_quota: int = 0  # per owner; 0: none
    fair_share: bool = True  # round-robin across owners inside a priority band


FAIR_SHARE_OFF_GROUP = "*"  # YM_FAIR_SHARE=false: every job takes its turn in one group (FIFO)


@dataclass(frozen=True)
class LogPage:
    entries: list[LogEntry]
    next_offset: int
    # Ranges the log cap dropped: [from_offset, to_offset) has no entries any more.
    gaps: list[tuple[int, int]]
    dropped_bytes: int  # how many bytes the cap dropped from the job's output (read only if gaps)


class JobService:
    def __init__(
        self,
        store: Store,
        broker: Broker,
        events: EventPublisher,
        agents: AgentHub,
        metrics: Metrics,
        timings: JobTimings,
        wake_scheduler: Callable[[], None] = lambda: None,
        admission: AdmissionPolicy = AdmissionPolicy(),
        queue: QueuePolicy = QueuePolicy(),
    ) -> None:
        self._store = store
        self._broker = broker
        self._events = events
        self._agents = agents
        self._metrics = metrics
        self._timings = timings
        self._wake_scheduler = wake_scheduler
        self._admission = admission
        self._queue = queue
        self._queued_listeners: list[Callable[[Sequence[JobRecord]], None]] = []
        self._requeues: Coalescer[QueueEntry] = Coalescer(self._requeue_many, "requeue")
        self._admissions: Batcher[list[QueueEntry], bool] = Batcher(self._admit_many, "admit")

    async def close(self) -> None:
        await self._requeues.close()
        await self._admissions.close()

    def queue_entry(self, job: JobRecord) -> QueueEntry:
        """The job as the Broker's queue holds it."""
        group = job.owner if self._queue.fair_share else FAIR_SHARE_OFF_GROUP
        return QueueEntry(job.id, job.owner, job.priority, group)

    def on_queued(self, listener: Callable[[Sequence[JobRecord]], None]) -> None:
        """Have `listener` told of the records of jobs this replica has just queued (submitted or
        re-queued), as they are in the Store then."""
        self._queued_listeners.append(listener)

    def _queued(self, jobs: Sequence[JobRecord]) -> None:
        for listener in self._queued_listeners:
            listener(jobs)

    # ---- users -------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, owner: str) -> JobRecord:
        """Admit and queue a job. Raises AdmissionRefused naming the field the policy refuses,
        QuotaExceeded when the owner's queued-jobs quota is full."""
        check_spec(spec, self._admission)
        job = _queued_record(spec, owner, time.time())
        await self._admit(owner, [job])
        try:
            await self._store.create_job(job)
        except BaseException:
            await self._withdraw([job])
            raise
        self._metrics.transitions.labels("queued").inc()
        await self._events.job_state(job)
        self._queued([job])
        self._wake_scheduler()
        return job

    async def submit_many(self, specs: Collection[JobSpec], owner: str) -> list[JobRecord]:
        """Admit and queue a batch, all or nothing: one Broker admission, one Store transaction, one
        publish round trip. Raises AdmissionRefused naming `[index].field` of the first refused
        spec, or QuotaExceeded, and then nothing is stored or queued."""
        for i, spec in enumerate(specs):
            try:
                check_spec(spec, self._admission)
            except AdmissionRefused as exc:
                raise AdmissionRefused(f"[{i}].{exc.field}", exc.message) from None
        now = time.time()
        # new_id is monotonic, so the batch keeps its submission order in the listing and in
        # queue-score ties (equal priority, equal enqueue time).
        jobs = [_queued_record(spec, owner, now) for spec in specs]
        if not jobs:
            return []
        await self._admit(owner, jobs)
        try:
            await self._store.create_jobs(jobs)
        except BaseException:
            await self._withdraw(jobs)
            raise
        self._metrics.transitions.labels("queued").inc(len(jobs))
        await self._events.job_states(jobs)
        self._queued(jobs)
        self._wake_scheduler()
        return jobs

    async def _admit(self, owner: str, jobs: Sequence[JobRecord]) -> None:
        """Queue the jobs in the Broker, within the owner's quota, before the Store has them: the
        Broker's queue is the one count every replica shares, so the quota holds across replicas
        (a scheduler pass that meets an entry whose record is not written yet leaves it be)."""
        quota = self._queue.queued_jobs_quota
        try:
            admitted = await self._admissions.call([self.queue_entry(job) for job in jobs])
        except BackendUnavailable as exc:
            # The Store says queued once written; the leader's reconciliation enqueues them when
            # the Broker is back. Meanwhile the quota is checked against the Store, by each
            # replica on its own.
            if quota and await self._store.count_jobs(owner=owner, states=["queued"]) + len(jobs) > quota:
                admitted = False
            else:
                log.warning("jobs queued in the store, not yet in the broker", extra={"jobs": len(jobs), "reason": str(exc)})
                return
        if not admitted:
            self._metrics.quota_exceeded.labels(QUEUED_JOBS).inc()
            raise QuotaExceeded(QUEUED_JOBS, quota)

    async def _admit_many(self, batches: Sequence[list[QueueEntry]]) -> list[bool]:
        return await self._broker.admit_many(batches, self._queue.queued_jobs_quota)

    async def _withdraw(self, jobs: Sequence[JobRecord]) -> None:
        """Take back an admission whose Store write failed (best effort: a scheduler pass drops
        an entry without a record once it is old enough)."""
        try:
            await self._broker.remove_many([job.id for job in jobs])
        except BackendUnavailable:
            pass

    async def _requeue_many(self, entries: Sequence[QueueEntry]) -> None:
        try:
            await self._broker.enqueue_many(entries, front=True)
        except BackendUnavailable as exc:
            # The Store says queued: the leader's reconciliation enqueues them once the Broker is back.
            log.warning("jobs queued in the store, not yet in the broker", extra={"jobs": len(entries), "reason": str(exc)})

    async def get(self, job_id: str) -> JobRecord:
        job = await self._store.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def find(self, job_id: str) -> JobRecord | None:
        return await self._store.get_job(job_id)

    async def next_log_offset(self, job_id: str) -> int:
        """The offset the job's next stored log entry will get."""
        return await self._store.next_log_offset(job_id)

    async def list_jobs(
        self, *, owner: str | None, states: Collection[str] | None = None, limit: int = 50, before: str | None = None
    ) -> list[JobRecord]:
        """Newest first; `owner` None lists every owner's jobs (admins); `before` pages on."""
        return await self._store.list_jobs(owner=owner, states=states or None, limit=limit, before=before)

    async def cancel(self, job_id: str, reason: str = "cancelled by user") -> JobRecord:
        """Queued jobs are cancelled at once; running ones go to `cancelling` until the agent confirms."""
        for _ in range(5):  # the job may move under us; retry the compare-and-set on the new state
            job = await self.get(job_id)
            if job.state in TERMINAL_STATES:
                raise JobAlreadyFinished(job)
            if job.state == "cancelling":
                return job
            now = time.time()
            new_state = transition(job.state, JobEvent.CANCEL)
            changes: dict[str, object] = {"state": new_state, "cancel_reason": reason, "updated_at": now}
            if new_state == "cancelled":
                changes["finished_at"] = now
            updated = await self._store.update_job(
                job_id, expect_states=[job.state], expect_attempt=job.attempt, changes=changes
            )
            if updated is None:
                continue
            await self.announce(updated)
            try:
                if new_state == "cancelled":
                    await self._broker.remove(job_id)
                else:
                    await self.send_cancel(updated)
            except BackendUnavailable as exc:
                # The cancel is recorded; the scheduler drops stale queue entries and re-sends cancels.
                log.warning("cancel recorded, not yet delivered", extra={"job_id": job_id, "reason": str(exc)})
            return updated
        raise RuntimeError(f"job {job_id} kept changing state; cancel not applied")

    def _cancel_msg(self, job: JobRecord, reason: str | None = None) -> m.Cancel:
        return m.Cancel(
            job_id=job.id,
            attempt=job.attempt,
            reason=reason or job.cancel_reason or "cancelled",
            grace_s=self._timings.cancel_grace_s,
        )

    async def send_cancel(self, job: JobRecord, reason: str | None = None) -> None:
        if job.agent_id is not None:
            await self._agents.send_to_agent(job.agent_id, self._cancel_msg(job, reason))

    async def logs(self, job_id: str, from_offset: int, limit: int) -> LogPage:
        """Up to `limit` entries from `from_offset`, with the ranges the log cap dropped."""
        entries = await self._store.read_logs(job_id, from_offset, limit)
        next_offset = entries[-1].offset + 1 if entries else from_offset
        gaps: list[tuple[int, int]] = []
        expected = from_offset
        for entry in entries:
            if entry.offset > expected:
                gaps.append((expected, entry.offset))
            expected = entry.offset + 1
        dropped = await self._store.log_dropped_bytes(job_id) if gaps else 0
        return LogPage(entries=entries, next_offset=next_offset, gaps=gaps, dropped_bytes=dropped)

    # ---- the scheduler leader (every write fenced with its epoch) ------------------------------

    async def claim(self, job: JobRecord, agent_id: str, epoch: int) -> JobRecord | None:
        """Assign a queued job to `agent_id` as its next attempt and send the job-assign.
        None if the job moved meanwhile or `epoch` is no longer the newest (fencing)."""
        return (await self.claim_many([(job, agent_id)], epoch))[0]

    async def claim_many(self, claims: Sequence[tuple[JobRecord, str]], epoch: int) -> list[JobRecord | None]:
        """`claim` for each (job, agent id) of a scheduling pass, in one Store transaction, one
        publish round trip and one queue removal; the updated record or None for each."""
        if not claims:
            return []
        now = time.time()
        updates = []
        for job, agent_id in claims:
            changes = {
                "state": transition(job.state, JobEvent.ASSIGN),
                "updated_at": now,
                "attempt": job.attempt + 1,
                "agent_id": agent_id,
                "epoch": epoch,
                "assigned_at": now,
                "lease_expires_at": now + self._timings.assign_ack_s,
                "deadline": now + job.spec.timeout_s,
                "exit_code": None,
                "error": None,
            }
            updates.append(JobUpdate(job.id, (job.state,), changes, expect_attempt=job.attempt))
        results = await self._store.update_jobs(updates, fence_epoch=epoch)
        claimed = [rec for rec in results if rec is not None]
        if not claimed:
            return results
        # Announced before the job-assign goes out, so that the `assigned` event precedes
        # the `running` one that the agent's accept causes.
        await self.announce_many(claimed)
        for job, rec in zip((c[0] for c in claims), results, strict=True):
            if rec is None:
                continue
            self._metrics.dispatch_latency.observe(max(0.0, now - job.enqueued_at))
            assert rec.agent_id is not None and rec.deadline is not None
            sent = await self._agents.send_to_agent(
                rec.agent_id, m.JobAssign(job_id=rec.id, attempt=rec.attempt, spec=rec.spec, deadline=rec.deadline)
            )
            if not sent:
                log.warning("assigned agent is gone; the job returns when its lease expires", extra={"job_id": rec.id})
        await self._broker.remove_many([rec.id for rec in claimed])
        return results

    async def expire_lease(self, job: JobRecord, epoch: int) -> JobRecord | None:
        """The job's lease ran out: re-queue it (or end it as `lost`) and stop that attempt if
        its agent is still around (e.g. it never answered the job-assign)."""
        final = job.runs >= job.spec.max_attempts
        event = JobEvent.LEASE_LOST_FINAL if final else JobEvent.LEASE_LOST_RETRY
        updated = await self.requeue(job, event, fence_epoch=epoch)
        if updated is not None:
            log.info("lease expired", extra={"job_id": job.id, "attempt": job.attempt, "state": updated.state})
            await self.send_cancel(job, "lease expired")
        return updated

    async def time_out(self, job: JobRecord, epoch: int) -> JobRecord | None:
        """No result came by the deadline (plus slack): end the job as `timed-out` and stop it."""
        updated = await self._transition(
            job,
            JobEvent.TIME_OUT,
            {
                "error": f"timed out after {job.spec.timeout_s} s (enforced by the server)",
                "finished_at": time.time(),
                "lease_expires_at": None,
            },
            expect_states=sources_of(JobEvent.TIME_OUT),
            fence_epoch=epoch,
        )
        if updated is not None:
            await self.send_cancel(job, "timed out")
        return updated

    # ---- agents ------------------------------------------------------------------------------

    async def _current(self, agent_id: str, job_id: str, attempt: int) -> JobRecord | m.Error:
        """The job if (agent, attempt) is its current attempt, else the error to send back."""
        job = await self._store.get_job(job_id)
        if job is None:
            return m.Error(code=m.ERR_UNKNOWN_JOB, message="no such job", job_id=job_id, attempt=attempt)
        if job.attempt != attempt or job.agent_id != agent_id:
            return m.Error(
                code=m.ERR_STALE_ATTEMPT,
                message=f"attempt {attempt} is not the current attempt of this job on this agent",
                job_id=job_id,
                attempt=attempt,
            )
        return job

    async def _transition(
        self,
        job: JobRecord,
        event: JobEvent,
        changes: dict[str, object],
        *,
        expect_states: Collection[str] | None = None,
        fence_epoch: int | None = None,
    ) -> JobRecord | None:
        new_state = transition(job.state, event)
        changes = {"state": new_state, "updated_at": time.time(), **changes}
        updated = await self._store.update_job(
            job.id,
            expect_states=expect_states or [job.state],
            expect_attempt=job.attempt,
            fence_epoch=fence_epoch,
            changes=changes,
        )
        if updated is not None:
            await self.announce(updated)
        return updated

    async def announce(self, job: JobRecord) -> None:
        self._metrics.transitions.labels(job.state).inc()
        await self._events.job_state(job)

    async def announce_many(self, jobs: Sequence[JobRecord]) -> None:
        """`announce` each, with one publish round trip for all of them."""
        counts = Counter(job.state for job in jobs)
        for state, n in counts.items():
            self._metrics.transitions.labels(state).inc(n)
        await self._events.job_states(jobs)

    async def on_accept(self, agent_id: str, msg: m.JobAccept) -> list[m.ServerToAgent]:
        return await self.on_reports(agent_id, [msg])

    async def on_reports(self, agent_id: str, msgs: Sequence[m.JobAccept | m.Result]) -> list[m.ServerToAgent]:
        """An agent's job-accepts and results, in the order it sent them; the replies.

        The common case of each (the job is `assigned` or `running` on this agent at this
        attempt) is one compare-and-set, and those of the whole batch are one Store transaction
        and one publish round trip. Anything else is looked at afterwards, message by message in
        order. That is what handling them one by one would do: a compare-and-set that fails
        changes nothing, the accept's full path never writes, and the result's full path only
        ends a job that no later accept or result of the batch could have changed."""
        fast = [self._accept_update(agent_id, msg) if isinstance(msg, m.JobAccept) else self._result_update(agent_id, msg)
                for msg in msgs]
        tried = [u for u in fast if u is not None]
        results = iter(await self._store.update_jobs(tried) if tried else [])
        outcome = [None if u is None else next(results) for u in fast]
        changed = [rec for rec in outcome if rec is not None]
        if changed:
            await self.announce_many(changed)
        replies: list[m.ServerToAgent] = []
        for msg, rec in zip(msgs, outcome, strict=True):
            if isinstance(msg, m.JobAccept):
                if rec is None:
                    replies += await self._accept_slow(agent_id, msg)
            elif rec is None:
                replies += await self._result_slow(agent_id, msg)
            else:
                replies.append(m.ResultAck(job_id=msg.job_id, attempt=msg.attempt, accepted=True))
        return replies

    def _accept_update(self, agent_id: str, msg: m.JobAccept) -> JobUpdate:
        now = time.time()
        changes = {
            "state": transition("assigned", JobEvent.ACCEPT),
            "updated_at": now,
            "started_at": now,
            "lease_expires_at": now + self._timings.lease_s,
        }
        return JobUpdate(msg.job_id, ("assigned",), changes, expect_attempt=msg.attempt, expect_agent=agent_id,
                         increments={"runs": 1})

    async def _accept_slow(self, agent_id: str, msg: m.JobAccept) -> list[m.ServerToAgent]:
        job = await self._current(agent_id, msg.job_id, msg.attempt)
        if isinstance(job, m.Error):
            return [job]
        if job.state == "cancelling":
            # The cancel crossed the assignment: say it again now that the agent runs the job.
            return [self._cancel_msg(job)]
        return []  # a replayed accept, or the result overtook it: nothing to change

    async def on_reject(self, agent_id: str, msg: m.JobReject) -> list[m.ServerToAgent]:
        job = await self._current(agent_id, msg.job_id, msg.attempt)
        if isinstance(job, m.Error):
            return [job]
        if job.state == "assigned":
            await self.requeue(job, JobEvent.REJECT)
        elif job.state == "cancelling":
            await self._transition(job, JobEvent.CANCELLED, {"finished_at": time.time(), "lease_expires_at": None})
        return []

    async def requeue(self, job: JobRecord, event: JobEvent, fence_epoch: int | None = None) -> JobRecord | None:
        """Send the job back to the queue (keeping its FIFO position), or end it as `lost`."""
        changes: dict[str, object] = {"lease_expires_at": None, "deadline": None}
        new_state = transition(job.state, event)
        if new_state == "queued":
            changes["agent_id"] = None
        else:
            changes["finished_at"] = time.time()
            if new_state == "lost":
                changes["error"] = f"agent lost; {job.runs} of {job.spec.max_attempts} attempts used"
        updated = await self._transition(job, event, changes, fence_epoch=fence_epoch)
        if updated is not None and updated.state == "queued":
            # Concurrent requeues share a Broker round trip; it goes to the head of its band's
            # current round, as it had reached the head once already.
            await self._requeues.add([self.queue_entry(updated)])
            self._queued([updated])
            self._wake_scheduler()
        return updated

    async def on_log_chunk(self, agent_id: str, msg: m.LogChunk) -> tuple[list[m.ServerToAgent], LogEntry | None]:
        job = await self._current(agent_id, msg.job_id, msg.attempt)
        if isinstance(job, m.Error):
            return [job], None
        result = await self._store.append_log(
            msg.job_id, msg.attempt, msg.seq, msg.stream, msg.data, msg.ts, cap_bytes=self._timings.log_cap_bytes
        )
        replies: list[m.ServerToAgent] = []
        if result.entry is not None:
            self._metrics.log_bytes.inc(len(msg.data))
            await self._events.log_entry(result.entry)
        elif msg.seq > result.acked_seq + 1:
            replies.append(
                m.Error(
                    code=m.ERR_SEQ_GAP,
                    message=f"expected seq {result.acked_seq + 1}, got {msg.seq}",
                    job_id=msg.job_id,
                    attempt=msg.attempt,
                )
            )
        replies.append(m.LogAck(job_id=msg.job_id, attempt=msg.attempt, seq=result.acked_seq))
        return replies, result.entry

    async def on_result(self, agent_id: str, msg: m.Result) -> list[m.ServerToAgent]:
        return await self.on_reports(agent_id, [msg])

    async def _result_slow(self, agent_id: str, msg: m.Result) -> list[m.ServerToAgent]:
        ack = m.ResultAck(job_id=msg.job_id, attempt=msg.attempt, accepted=True)
        job = await self._current(agent_id, msg.job_id, msg.attempt)
        if isinstance(job, m.Error):
            return [job]
        if job.state in TERMINAL_STATES:
            # Accepted once already (or ended by the server): acknowledge, change nothing.
            return [ack]
        event = result_event(msg.state)
        if job.state == "cancelling" and event is JobEvent.FAIL and job.cancel_reason:
            event = JobEvent.CANCELLED  # a SIGTERM'd job exits non-zero: that is the cancel working
        updated = await self._transition(job, event, _result_changes(msg), expect_states=sources_of(event) & {job.state})
        if updated is None:
            latest = await self.get(msg.job_id)
            if latest.attempt != msg.attempt or latest.state not in TERMINAL_STATES:
                return [m.Error(code=m.ERR_STALE_ATTEMPT, job_id=msg.job_id, attempt=msg.attempt)]
        return [ack]

    def _result_update(self, agent_id: str, msg: m.Result) -> JobUpdate | None:
        """The common case: the job is `assigned` or `running` on this agent at this attempt, and
        the result moves it to the same state from either. Anything else (a cancel in flight, a
        replay, a stale attempt) takes the full path."""
        event = result_event(msg.state)
        targets = {transition(state, event) for state in _RUNNING_STATES}
        if len(targets) != 1:
            return None
        changes = {"state": targets.pop(), "updated_at": time.time(), **_result_changes(msg)}
        return JobUpdate(msg.job_id, _RUNNING_STATES, changes, expect_attempt=msg.attempt, expect_agent=agent_id)

    async def on_cancel_ack(self, agent_id: str, msg: m.CancelAck) -> list[m.ServerToAgent]:
        job = await self._current(agent_id, msg.job_id, msg.attempt)
        if isinstance(job, m.Error):
            return [] if job.code == m.ERR_STALE_ATTEMPT else [job]
        if job.state == "cancelling":
            await self._transition(job, JobEvent.CANCELLED, {"finished_at": time.time(), "lease_expires_at": None})
        return []

    async def renew_leases(self, agent_id: str, running: list[m.RunningJob]) -> list[str]:
        if not running:
            return []
        until = time.time() + self._timings.lease_s
        return await self._store.renew_leases(agent_id, [(r.job_id, r.attempt) for r in running], until)

    async def resume_plan(self, agent_id: str, running: list[m.RunningJob]) -> list[m.ResumeJob]:
        """What a (re)connecting agent keeps: its jobs whose current attempt is still its own."""
        plan: list[m.ResumeJob] = []
        for r in running:
            job = await self._store.get_job(r.job_id)
            # Leased: it runs on. Finished with an outcome: only its leftover logs still flow.
            keep = (
                job is not None
                and job.agent_id == agent_id
                and job.attempt == r.attempt
                and job.state not in {"lost", "cancelled", "queued"}
            )
            acked = await self._store.acked_seq(r.job_id, r.attempt) if keep else -1
            plan.append(m.ResumeJob(job_id=r.job_id, attempt=r.attempt, acked_seq=acked, keep=keep))
        await self.renew_leases(agent_id, [r for r, p in zip(running, plan, strict=True) if p.keep])
        return plan

    async def cancels_for(self, agent_id: str, running: list[m.RunningJob]) -> list[m.Cancel]:
        """Cancels the agent must hear again after a reconnect (the first may have been lost)."""
        out: list[m.Cancel] = []
        for r in running:
            job = await self._store.get_job(r.job_id)
            if job is not None and job.state == "cancelling" and job.agent_id == agent_id and job.attempt == r.attempt:
                out.append(self._cancel_msg(job))
        return out

