"""The agent's protocol reactions, driven with decoded messages and an in-memory executor."""

from __future__ import annotations

import asyncio
import time

import pytest

from yardmaster.agent.executors.base import Execution, Executor, ExecutorError, ExitInfo, OutputSink
from yardmaster.agent.supervisor import AgentConfig, Supervisor
from yardmaster.protocol import messages as m
from yardmaster.protocol.jobs import JobSpec


class FakeExecution(Execution):
    def __init__(self, sink: OutputSink) -> None:
        self.sink = sink
        self.exit: asyncio.Future[ExitInfo] = asyncio.get_running_loop().create_future()
        self.stopped_with: float | None = None
        self.removed = False

    async def wait(self) -> ExitInfo:
        return await asyncio.shield(self.exit)

    async def drain(self) -> None:
        pass

    async def stop(self, grace_s: float) -> None:
        self.stopped_with = grace_s
        if not self.exit.done():
            self.exit.set_result(ExitInfo(137))

    async def remove(self) -> None:
        self.removed = True

    def finish(self, code: int) -> None:
        self.exit.set_result(ExitInfo(code))


class FakeExecutor(Executor):
    name = "fake"

    def __init__(self) -> None:
        self.runs: dict[tuple[str, int], FakeExecution] = {}

    async def start(self, job_id: str, attempt: int, spec: JobSpec, sink: OutputSink) -> Execution:
        if spec.image == "missing":
            raise ExecutorError("image-not-found: missing")
        execution = FakeExecution(sink)
        self.runs[(job_id, attempt)] = execution
        return execution


SPEC = JobSpec(image="img", command=["run"])


def assign(job: str, attempt: int = 1, spec: JobSpec = SPEC) -> m.JobAssign:
    return m.JobAssign(job_id=job, attempt=attempt, spec=spec, deadline=time.time() + 3600)


def welcome(*resume: m.ResumeJob) -> m.Welcome:
    return m.Welcome(session_id="s", agent_id="a", heartbeat_interval_s=5, lease_s=30, resume=list(resume))


class Harness:
    def __init__(self, capacity: int = 2, log_limit: int = 8 << 20) -> None:
        self.executor = FakeExecutor()
        self.sup = Supervisor(AgentConfig(name="ag", version="0.1.0", labels=["l"], capacity=capacity,
                                          log_limit_bytes=log_limit, flush_interval_s=0.005), self.executor)
        self.sent: list[m.AgentToServer] = []

    def connect(self, *resume: m.ResumeJob) -> list[m.AgentToServer]:
        replies = self.sup.handle(welcome(*resume))
        self.sup.attach(self.sent.append)
        return replies

    async def started(self, job: str, attempt: int = 1) -> FakeExecution:
        for _ in range(200):
            if (job, attempt) in self.executor.runs:
                return self.executor.runs[(job, attempt)]
            await asyncio.sleep(0.001)
        raise AssertionError(f"{job}/{attempt} never started")

    def take(self) -> list[m.AgentToServer]:
        out, self.sent[:] = list(self.sent), []
        return out


async def settle() -> None:
    await asyncio.sleep(0.03)


async def test_assign_accepts_and_is_idempotent() -> None:
    h = Harness()
    h.connect()
    assert h.sup.handle(assign("j1")) == [m.JobAccept(job_id="j1", attempt=1)]
    await h.started("j1")
    assert h.sup.handle(assign("j1")) == [m.JobAccept(job_id="j1", attempt=1)]
    assert list(h.executor.runs) == [("j1", 1)]
    assert h.sup.heartbeat() == m.Heartbeat(running=[m.RunningJob(job_id="j1", attempt=1, last_seq=-1)])


async def test_assign_rejected_when_full_or_draining() -> None:
    h = Harness(capacity=1)
    h.connect()
    h.sup.handle(assign("j1"))
    [reject] = h.sup.handle(assign("j2"))
    assert isinstance(reject, m.JobReject) and reject.reason == "no free slot"
    h.sup.handle(m.Drain())
    [reject] = h.sup.handle(assign("j3"))
    assert isinstance(reject, m.JobReject) and reject.reason == "draining"
    assert ("j2", 1) not in h.executor.runs and ("j3", 1) not in h.executor.runs


async def test_logs_result_and_acks() -> None:
    h = Harness()
    h.connect()
    h.sup.handle(assign("j1"))
    run = await h.started("j1")
    await run.sink("stdout", b"hello\n")
    await run.sink("stderr", b"oops\n")
    await settle()
    run.finish(0)
    await settle()
    sent = h.take()
    chunks = [x for x in sent if isinstance(x, m.LogChunk)]
    assert [(c.seq, c.stream, c.data) for c in chunks] == [(0, "stdout", b"hello\n"), (1, "stderr", b"oops\n")]
    result = sent[-1]
    assert isinstance(result, m.Result)
    assert (result.state, result.exit_code, result.last_seq) == ("succeeded", 0, 1)
    assert run.removed
    h.sup.handle(m.LogAck(job_id="j1", attempt=1, seq=1))
    assert "j1" in h.sup.runners  # result not acked yet
    h.sup.handle(m.ResultAck(job_id="j1", attempt=1))
    assert h.sup.runners == {}


async def test_failed_start_reports_failed_result() -> None:
    h = Harness()
    h.connect()
    assert h.sup.handle(assign("j1", spec=JobSpec(image="missing", command="x"))) == [m.JobAccept(job_id="j1", attempt=1)]
    await settle()
    [result] = h.take()
    assert isinstance(result, m.Result)
    assert (result.state, result.error, result.last_seq) == ("failed", "image-not-found: missing", -1)


async def test_nonzero_exit_fails() -> None:
    h = Harness()
    h.connect()
    h.sup.handle(assign("j1"))
    (await h.started("j1")).finish(3)
    await settle()
    [result] = h.take()
    assert isinstance(result, m.Result) and result.state == "failed" and result.exit_code == 3


async def test_reconnect_resends_unacked_chunks_and_result() -> None:
    h = Harness()
    h.connect()
    h.sup.handle(assign("j1"))
    run = await h.started("j1")
    h.sup.detach()  # connection lost: output keeps being buffered
    for i in range(4):
        await run.sink("stdout", f"line{i}\n".encode())
        await settle()
    run.finish(0)
    await settle()
    assert h.take() == []
    hello = h.sup.hello()
    assert hello.running == [m.RunningJob(job_id="j1", attempt=1, last_seq=3)]
    replies = h.connect(m.ResumeJob(job_id="j1", attempt=1, acked_seq=1, keep=True))
    assert [x.seq for x in replies if isinstance(x, m.LogChunk)] == [2, 3]
    assert isinstance(replies[-1], m.Result) and replies[-1].last_seq == 3


async def test_resume_keep_false_stops_and_drops_silently() -> None:
    h = Harness()
    h.connect()
    h.sup.handle(assign("j1"))
    run = await h.started("j1")
    await run.sink("stdout", b"x")
    h.sup.detach()
    replies = h.connect(m.ResumeJob(job_id="j1", attempt=1, keep=False))
    await settle()
    assert replies == []
    assert h.take() == []
    assert run.stopped_with == 0.0 and run.removed
    assert h.sup.runners == {} and h.sup.hello().running == []


async def test_cancel_running_job_acks_after_stop_then_reports_cancelled() -> None:
    h = Harness()
    h.connect()
    h.sup.handle(assign("j1"))
    run = await h.started("j1")
    assert h.sup.handle(m.Cancel(job_id="j1", attempt=1, reason="user", grace_s=3.0)) == []
    await settle()
    sent = h.take()
    assert [type(x) for x in sent] == [m.CancelAck, m.Result]
    assert isinstance(sent[1], m.Result) and sent[1].state == "cancelled"
    assert run.stopped_with == 3.0 and run.removed


async def test_cancel_of_unknown_job_or_attempt_just_acks() -> None:
    h = Harness()
    h.connect()
    h.sup.handle(assign("j1", attempt=2))
    await h.started("j1", 2)
    assert h.sup.handle(m.Cancel(job_id="nope", attempt=1)) == [m.CancelAck(job_id="nope", attempt=1)]
    assert h.sup.handle(m.Cancel(job_id="j1", attempt=1)) == [m.CancelAck(job_id="j1", attempt=1)]
    assert h.executor.runs[("j1", 2)].stopped_with is None


async def test_newer_attempt_supersedes_older() -> None:
    h = Harness()
    h.connect()
    h.sup.handle(assign("j1", 1))
    old = await h.started("j1", 1)
    assert h.sup.handle(assign("j1", 2)) == [m.JobAccept(job_id="j1", attempt=2)]
    await h.started("j1", 2)
    await settle()
    assert old.stopped_with == 0.0 and old.removed
    assert not any(isinstance(x, m.Result) and x.attempt == 1 for x in h.take())
    [reject] = h.sup.handle(assign("j1", 1))
    assert isinstance(reject, m.JobReject)


async def test_stale_attempt_error_stops_and_drops() -> None:
    h = Harness()
    h.connect()
    h.sup.handle(assign("j1"))
    run = await h.started("j1")
    await run.sink("stdout", b"data")
    await settle()
    h.take()
    assert h.sup.handle(m.Error(code=m.ERR_STALE_ATTEMPT, job_id="j1", attempt=1)) == []
    await settle()
    assert run.removed and h.take() == [] and h.sup.runners == {}


async def test_seq_gap_resends_from_start_of_buffer() -> None:
    h = Harness()
    h.connect()
    h.sup.handle(assign("j1"))
    run = await h.started("j1")
    for part in (b"a", b"b", b"c"):
        await run.sink("stdout", part)
        await settle()
    h.sup.handle(m.LogAck(job_id="j1", attempt=1, seq=0))
    replies = h.sup.handle(m.Error(code=m.ERR_SEQ_GAP, job_id="j1", attempt=1))
    assert [(x.seq, x.data) for x in replies if isinstance(x, m.LogChunk)] == [(1, b"b"), (2, b"c")]


async def test_drain_waits_for_running_jobs_to_be_delivered() -> None:
    h = Harness()
    h.connect()
    h.sup.handle(assign("j1"))
    run = await h.started("j1")
    h.sup.handle(m.Drain(reason="maintenance"))
    assert not h.sup.drained.is_set()
    run.finish(0)
    await settle()
    assert not h.sup.drained.is_set()  # result not acked yet
    h.sup.handle(m.ResultAck(job_id="j1", attempt=1))
    assert h.sup.drained.is_set()


async def test_backpressure_blocks_output_until_acked() -> None:
    h = Harness(log_limit=64 * 1024)
    h.connect()
    h.sup.handle(assign("j1"))
    run = await h.started("j1")
    await run.sink("stdout", b"x" * 64 * 1024)  # fills the buffer
    blocked = asyncio.create_task(run.sink("stdout", b"y"))
    await settle()
    assert not blocked.done()
    last = max(x.seq for x in h.sent if isinstance(x, m.LogChunk))
    h.sup.handle(m.LogAck(job_id="j1", attempt=1, seq=last))
    await asyncio.wait_for(blocked, 1)
    await settle()
    assert h.sent[-1] == m.LogChunk(job_id="j1", attempt=1, seq=last + 1, stream="stdout", data=b"y",
                                    ts=h.sent[-1].ts)  # type: ignore[union-attr]


async def test_shutdown_stops_everything_silently() -> None:
    h = Harness()
    h.connect()
    h.sup.handle(assign("j1"))
    h.sup.handle(assign("j2"))
    runs = [await h.started("j1"), await h.started("j2")]
    await h.sup.shutdown()
    assert all(r.removed and r.stopped_with == 0.0 for r in runs)
    assert h.take() == [] and h.sup.runners == {}


def test_hello_describes_the_agent() -> None:
    sup = Supervisor(AgentConfig(name="ag", version="0.1.0", labels=["gpu"], capacity=3), FakeExecutor())
    hello = sup.hello()
    assert (hello.name, hello.version, hello.labels, hello.capacity, hello.executor, hello.running) == (
        "ag", "0.1.0", ["gpu"], 3, "fake", [])


@pytest.mark.parametrize("code", [m.ERR_MALFORMED, m.ERR_INTERNAL])
def test_other_errors_are_only_logged(code: str) -> None:
    sup = Supervisor(AgentConfig(name="ag", version="0.1.0"), FakeExecutor())
    assert sup.handle(m.Error(code=code, message="x")) == []


async def test_welcome_grant_sets_the_slot_count_and_what_was_not_granted_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = Harness(capacity=2)  # asks for labels ["l"] and 2 slots
    granted = m.Welcome(session_id="s", agent_id="a", heartbeat_interval_s=5, lease_s=30, labels=["a"], capacity=1)
    with caplog.at_level("WARNING", logger="yardmaster.agent.supervisor"):
        h.sup.handle(granted)
    h.sup.attach(h.sent.append)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "the server did not grant the labels l (granted: a)" in warnings
    assert "the server granted a capacity of 1 of the 2 asked for" in warnings
    assert h.sup.handle(assign("j1")) == [m.JobAccept(job_id="j1", attempt=1)]
    [reject] = h.sup.handle(assign("j2"))
    assert isinstance(reject, m.JobReject) and reject.reason == "no free slot"
    assert h.sup.hello().capacity == 2  # it keeps asking for what it is configured with


async def test_a_welcome_without_a_grant_keeps_the_configured_capacity(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness(capacity=2)
    with caplog.at_level("WARNING", logger="yardmaster.agent.supervisor"):
        h.connect()  # a server that predates grants: labels and capacity None
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    h.sup.handle(assign("j1"))
    assert h.sup.handle(assign("j2")) == [m.JobAccept(job_id="j2", attempt=1)]


async def test_a_finished_job_holds_its_slot_until_the_server_acknowledged_it() -> None:
    h = Harness(capacity=1)
    h.connect()
    h.sup.handle(assign("j1"))
    (await h.started("j1")).finish(0)
    await settle()
    [reject] = h.sup.handle(assign("j2"))  # j1's result is not acknowledged yet: still listed
    assert isinstance(reject, m.JobReject) and reject.reason == "no free slot"
    assert len(h.sup.heartbeat().running) == 1
    h.sup.handle(m.ResultAck(job_id="j1", attempt=1))
    assert h.sup.handle(assign("j3")) == [m.JobAccept(job_id="j3", attempt=1)]
