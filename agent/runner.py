"""One job attempt's life on the agent: start, stream output, cancel, time out, report.

The runner never talks to the socket: it hands messages to `emit`, which the supervisor routes
to the live connection (or drops while disconnected; the buffers keep what must be re-sent).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from yardmaster.agent.executors.base import Execution, Executor, ExecutorError, ExitInfo
from yardmaster.agent.logbuffer import DEFAULT_LIMIT_BYTES, LogBuffer
from yardmaster.protocol.jobs import FinalState, JobSpec
from yardmaster.protocol.messages import AgentToServer, CancelAck, LogChunk, Result, RunningJob, Stream

log = logging.getLogger(__name__)

Emit = Callable[[AgentToServer], None]
StopKind = Literal["cancel", "discard"]

TIMEOUT_GRACE_S = 2.0
FLUSH_INTERVAL_S = 0.05
# After a stop, how long to wait for the last output before removing the container anyway.
STOPPED_DRAIN_S = 5.0


class JobRunner:
    def __init__(
        self,
        job_id: str,
        attempt: int,
        spec: JobSpec,
        deadline: float,
        executor: Executor,
        emit: Emit,
        *,
        on_done: Callable[[JobRunner], None] | None = None,
        log_limit_bytes: int = DEFAULT_LIMIT_BYTES,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        timeout_grace_s: float = TIMEOUT_GRACE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.spec = spec
        self.deadline = deadline
        self.buffer = LogBuffer(job_id, attempt, limit_bytes=log_limit_bytes)
        self.result: Result | None = None
        self.result_acked = False
        self.started_at: float | None = None
        self._executor = executor
        self._emit = emit
        self._on_done = on_done
        self._flush_interval = flush_interval_s
        self._timeout_grace = timeout_grace_s
        self._clock = clock
        self._stop = asyncio.Event()
        self._stop_kind: StopKind | None = None
        self._cancel_reason = ""
        self._cancel_grace = 0.0
        self._cancel_requested = False
        self._room = asyncio.Event()
        self._pending = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- queries -------------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """The process is gone and its container removed (result produced, unless discarded)."""
        return self._task is not None and self._task.done()

    @property
    def discarded(self) -> bool:
        return self._stop_kind == "discard"

    @property
    def settled(self) -> bool:
        """Nothing left to run or to deliver: the supervisor may forget this runner."""
        return self.finished and (self.discarded or (self.result_acked and self.buffer.empty))

    def running_job(self) -> RunningJob:
        return RunningJob(job_id=self.job_id, attempt=self.attempt, last_seq=self.buffer.last_seq)

    def unacked_logs(self) -> list[LogChunk]:
        return [] if self.discarded else self.buffer.unacked()

    def pending_messages(self) -> list[AgentToServer]:
        """What a fresh connection must get again: unacked chunks, then the unacked result."""
        out: list[AgentToServer] = list(self.unacked_logs())
        if self.result is not None and not self.result_acked and not self.discarded:
            out.append(self.result)
        return out

    # ---- commands ------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"job-{self.job_id}-{self.attempt}")

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    def cancel(self, reason: str, grace_s: float) -> bool:
        """Ask to stop the job; CancelAck and Result follow. False if it already finished."""
        if self.finished or self.discarded:
            return False
        if not self._cancel_requested:
            self._cancel_requested = True
            self._cancel_reason = reason
            self._cancel_grace = grace_s
            self._stop_kind = "cancel"
            self._stop.set()
        return True

    def discard(self) -> None:
        """Stop at once and drop everything, reporting nothing (the attempt is not ours anymore)."""
        self._stop_kind = "discard"
        self._cancel_grace = 0.0
        self.buffer.clear()
        self._room.set()
        self._stop.set()

    def on_log_ack(self, seq: int) -> None:
        if self.buffer.ack(seq) and self.buffer.has_room():
            self._room.set()

    def on_result_ack(self) -> None:
        self.result_acked = True

    # ---- the job -------------------------------------------------------------------------------

    def _send(self, msg: AgentToServer) -> None:
        if not self.discarded:
            self._emit(msg)

    async def _sink(self, stream: Stream, data: bytes) -> None:
        while not self.discarded and not self.buffer.has_room():
            self._room.clear()
            await self._room.wait()  # backpressure: stop reading output until acks free space
        if self.discarded:
            return
        for chunk in self.buffer.add(stream, data, self._clock()):
            self._send(chunk)
        if self.buffer.pending_since is not None:
            self._pending.set()

    async def _flusher(self) -> None:
        while True:
            await self._pending.wait()
            await asyncio.sleep(self._flush_interval)
            self._pending.clear()
            for chunk in self.buffer.flush():
                self._send(chunk)

    async def _run(self) -> None:
        started = self._clock()
        self.started_at = started
        limit_at = min(self.deadline, started + self.spec.timeout_s)
        execution: Execution | None = None
        flusher = asyncio.create_task(self._flusher())
        state: FinalState = "failed"
        exit_code: int | None = None
        error: str | None = None
        try:
            execution = await self._executor.start(self.job_id, self.attempt, self.spec, self._sink)
            state, exit_code, error = await self._supervise(execution, started, limit_at)
        except ExecutorError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a broken job must still report, never kill the agent
            log.exception("job %s attempt %d failed in the agent", self.job_id, self.attempt)
            error = f"agent error: {exc}"
        finally:
            if execution is not None:
                await execution.remove()
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
        try:
            if self.discarded:
                self.buffer.clear()
                return
            for chunk in self.buffer.flush():
                self._send(chunk)
            if self._cancel_requested:
                self._send(CancelAck(job_id=self.job_id, attempt=self.attempt))
            self.result = Result(
                job_id=self.job_id, attempt=self.attempt, state=state, exit_code=exit_code, error=error,
                started_at=started, finished_at=self._clock(), last_seq=self.buffer.last_seq,
            )
            log.info("job %s attempt %d: %s (exit %s)", self.job_id, self.attempt, state, exit_code)
            self._send(self.result)
        finally:
            if self._on_done is not None:
                self._on_done(self)

    async def _supervise(
        self, execution: Execution, started: float, limit_at: float
    ) -> tuple[FinalState, int | None, str | None]:
        waiter = asyncio.create_task(execution.wait())
        stopper = asyncio.create_task(self._stop.wait())
        try:
            timeout = max(0.0, limit_at - self._clock())
            done, _ = await asyncio.wait({waiter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if waiter in done:  # the job ended on its own: its real outcome wins over a late cancel
            exit_info = waiter.result()
            await execution.drain()
            return _outcome(exit_info)
        if stopper in done:
            await execution.stop(self._cancel_grace)
            exit_code = await _exit_code(waiter)
            if not self.discarded:
                await _bounded(execution.drain(), STOPPED_DRAIN_S)
            return "cancelled", exit_code, self._cancel_reason or "cancelled"
        await execution.stop(self._timeout_grace)
        exit_code = await _exit_code(waiter)
        await _bounded(execution.drain(), STOPPED_DRAIN_S)
        return "timed-out", exit_code, f"timed out after {round(limit_at - started)} s"


def _outcome(exit_info: ExitInfo) -> tuple[FinalState, int | None, str | None]:
    if exit_info.exit_code == 0 and exit_info.error is None:
        return "succeeded", 0, None
    return "failed", exit_info.exit_code, exit_info.error


async def _exit_code(waiter: asyncio.Task[ExitInfo]) -> int | None:
    if not waiter.done():
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        return None
    if waiter.cancelled() or waiter.exception() is not None:
        return None
    return waiter.result().exit_code


async def _bounded(aw: Awaitable[None], timeout: float) -> None:
    try:
        await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        log.warning("output did not drain within %.0f s after the stop; removing anyway", timeout)
