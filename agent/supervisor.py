"""The agent's protocol logic, without I/O: reacts to decoded server messages.

`handle()` returns the messages to send at once; runners send the rest later (logs, results)
through the `emit` callback given to `attach()`. The connection owns the socket; this class owns
the job table. Tests drive it with a fake executor and a list as the outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from yardmaster.agent.executors.base import Executor
from yardmaster.agent.logbuffer import DEFAULT_LIMIT_BYTES
from yardmaster.agent.runner import JobRunner
from yardmaster.protocol import messages as m

log = logging.getLogger(__name__)

Emit = Callable[[m.AgentToServer], None]


@dataclass
class AgentConfig:
    name: str
    version: str
    labels: list[str] = field(default_factory=list)
    capacity: int = 2
    log_limit_bytes: int = DEFAULT_LIMIT_BYTES
    flush_interval_s: float = 0.05


class Supervisor:
    def __init__(self, config: AgentConfig, executor: Executor, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.executor = executor
        self.runners: dict[str, JobRunner] = {}  # by job id: one attempt of a job at a time
        self.draining = False
        self.drained = asyncio.Event()  # set once draining and every job is delivered
        self.heartbeat_interval_s = 10.0
        self.capacity = config.capacity  # job slots: what the server granted, once welcomed
        self._dying: set[JobRunner] = set()  # discarded runners still stopping their process
        self._emit: Emit | None = None
        self._clock = clock

    # ---- connection lifecycle ------------------------------------------------------------------

    def attach(self, emit: Emit) -> None:
        """A connection is live (welcome received): runners may send through it."""
        self._emit = emit

    def detach(self) -> None:
        self._emit = None

    def _send(self, msg: m.AgentToServer) -> None:
        if self._emit is not None:
            self._emit(msg)

    def hello(self) -> m.Hello:
        return m.Hello(
            name=self.config.name,
            version=self.config.version,
            labels=list(self.config.labels),
            capacity=self.config.capacity,
            executor=self.executor.name,
            executor_info=self.executor.info(),
            running=self._running(),
        )

    def heartbeat(self) -> m.Heartbeat:
        return m.Heartbeat(running=self._running())

    def _running(self) -> list[m.RunningJob]:
        return [r.running_job() for r in self.runners.values() if not r.discarded]

    @property
    def free_slots(self) -> int:
        # A job holds its slot until the server acknowledged all of it: the `running` list of a
        # hello or heartbeat may then never be longer than the capacity (the server checks).
        return max(0, self.capacity - len(self._running()))

    # ---- messages ------------------------------------------------------------------------------

    def handle(self, msg: m.ServerToAgent) -> list[m.AgentToServer]:
        match msg:
            case m.Welcome():
                return self._on_welcome(msg)
            case m.JobAssign():
                return self._on_assign(msg)
            case m.LogAck():
                runner = self._runner(msg.job_id, msg.attempt)
                if runner is not None:
                    runner.on_log_ack(msg.seq)
                    self._forget_if_settled(runner)
                return []
            case m.ResultAck():
                runner = self._runner(msg.job_id, msg.attempt)
                if runner is not None:
                    runner.on_result_ack()
                    self._forget_if_settled(runner)
                return []
            case m.Cancel():
                return self._on_cancel(msg)
            case m.Drain():
                log.info("server asked to drain%s", f": {msg.reason}" if msg.reason else "")
                self.draining = True
                self._check_drained()
                return []
            case m.Error():
                return self._on_error(msg)
        return []

    def _runner(self, job_id: str | None, attempt: int | None) -> JobRunner | None:
        runner = self.runners.get(job_id or "")
        if runner is None or runner.attempt != attempt:
            return None
        return runner

    def _on_welcome(self, welcome: m.Welcome) -> list[m.AgentToServer]:
        self.heartbeat_interval_s = welcome.heartbeat_interval_s
        self._apply_grant(welcome)
        out: list[m.AgentToServer] = []
        mentioned: set[str] = set()
        for resume in welcome.resume:
            runner = self._runner(resume.job_id, resume.attempt)
            if runner is None:
                continue
            mentioned.add(resume.job_id)
            if not resume.keep:
                log.info("server dropped job %s attempt %d: stopping it", runner.job_id, runner.attempt)
                self._discard(runner)
                continue
            runner.on_log_ack(resume.acked_seq)
            out.extend(runner.pending_messages())
            self._forget_if_settled(runner)
        # Jobs the server did not mention: send what we hold; it answers stale-attempt if unwanted.
        for job_id, runner in list(self.runners.items()):
            if job_id not in mentioned:
                out.extend(runner.pending_messages())
        return out

    def _apply_grant(self, welcome: m.Welcome) -> None:
        """The server's registration decides labels and capacity; say what it did not grant."""
        if welcome.labels is not None:
            missing = sorted(set(self.config.labels) - set(welcome.labels))
            if missing:
                log.warning("the server did not grant the labels %s (granted: %s)",
                            ", ".join(missing), ", ".join(welcome.labels) or "none")
        if welcome.capacity is None:
            self.capacity = self.config.capacity  # a server that predates grants
            return
        if welcome.capacity < self.config.capacity:
            log.warning("the server granted a capacity of %d of the %d asked for", welcome.capacity,
                        self.config.capacity)
        self.capacity = min(welcome.capacity, self.config.capacity)

    def _on_assign(self, assign: m.JobAssign) -> list[m.AgentToServer]:
        existing = self.runners.get(assign.job_id)
        if existing is not None:
            if existing.attempt == assign.attempt:
                return [m.JobAccept(job_id=assign.job_id, attempt=assign.attempt)]
            if existing.attempt > assign.attempt:
                return [m.JobReject(job_id=assign.job_id, attempt=assign.attempt, reason="a newer attempt runs here")]
            log.info("job %s: attempt %d supersedes %d here", assign.job_id, assign.attempt, existing.attempt)
            self._discard(existing)
        if self.draining:
            return [m.JobReject(job_id=assign.job_id, attempt=assign.attempt, reason="draining")]
        if self.free_slots <= 0:
            return [m.JobReject(job_id=assign.job_id, attempt=assign.attempt, reason="no free slot")]
        runner = JobRunner(
            assign.job_id, assign.attempt, assign.spec, assign.deadline, self.executor, self._send,
            on_done=self._on_runner_done, log_limit_bytes=self.config.log_limit_bytes,
            flush_interval_s=self.config.flush_interval_s, clock=self._clock,
        )
        self.runners[assign.job_id] = runner
        runner.start()
        return [m.JobAccept(job_id=assign.job_id, attempt=assign.attempt)]

    def _on_cancel(self, cancel: m.Cancel) -> list[m.AgentToServer]:
        runner = self._runner(cancel.job_id, cancel.attempt)
        if runner is not None and runner.cancel(cancel.reason, cancel.grace_s):
            return []  # the runner sends cancel-ack and the result once the container is gone
        return [m.CancelAck(job_id=cancel.job_id, attempt=cancel.attempt)]

    def _on_error(self, error: m.Error) -> list[m.AgentToServer]:
        runner = self._runner(error.job_id, error.attempt)
        if error.code == m.ERR_STALE_ATTEMPT and runner is not None:
            log.info("job %s attempt %d is stale: stopping it", runner.job_id, runner.attempt)
            self._discard(runner)
            return []
        if error.code == m.ERR_SEQ_GAP and runner is not None:
            return list(runner.unacked_logs())
        log.warning("server error %s%s: %s", error.code,
                    f" (job {error.job_id} attempt {error.attempt})" if error.job_id else "", error.message)
        return []

    # ---- runner bookkeeping --------------------------------------------------------------------

    def _discard(self, runner: JobRunner) -> None:
        runner.discard()
        if self.runners.get(runner.job_id) is runner:
            del self.runners[runner.job_id]
        if not runner.finished:
            self._dying.add(runner)
        self._check_drained()

    def _on_runner_done(self, runner: JobRunner) -> None:
        self._dying.discard(runner)
        self._forget_if_settled(runner)
        self._check_drained()

    def _forget_if_settled(self, runner: JobRunner) -> None:
        if runner.settled and self.runners.get(runner.job_id) is runner:
            del self.runners[runner.job_id]
        self._check_drained()

    def _check_drained(self) -> None:
        if self.draining and not self.runners and not self._dying:
            self.drained.set()

    async def shutdown(self) -> None:
        """Stop every job and remove its container; report nothing (the agent is going away)."""
        runners = list(self.runners.values()) + list(self._dying)
        for runner in runners:
            runner.discard()
        self.runners.clear()
        await asyncio.gather(*(r.wait() for r in runners), return_exceptions=True)
        self._dying.clear()
