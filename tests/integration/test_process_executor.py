"""The process executor (unsandboxed, opt-in) with real subprocesses."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from yardmaster.agent.executors.base import ExecutorError, ExitInfo
from yardmaster.agent.executors.process import ProcessExecutor
from yardmaster.agent.runner import JobRunner
from yardmaster.protocol.jobs import JobSpec
from yardmaster.protocol.messages import AgentToServer, CancelAck, LogChunk, Result, Stream
from tests.support.executors import Output, run_job, text


async def run(job: JobSpec, timeout: float = 30) -> tuple[ExitInfo, Output]:
    return await run_job(ProcessExecutor(), job, timeout)


async def test_streams_separated_and_in_order() -> None:
    info, out = await run(JobSpec(image="-", command="for i in 1 2 3; do echo out$i; echo err$i >&2; done"))
    assert info.exit_code == 0
    assert text(out, "stdout") == "out1\nout2\nout3\n"
    assert text(out, "stderr") == "err1\nerr2\nerr3\n"


async def test_exit_code_and_env_and_fresh_workdir() -> None:
    info, out = await run(JobSpec(image="-", command='echo "$FOO|${HOME:-nohome}"; pwd; exit 3', env={"FOO": "bar"}))
    assert info.exit_code == 3
    first, cwd = text(out, "stdout").splitlines()
    assert first == "bar|nohome"  # only PATH and the spec's env are passed on
    assert Path(cwd).name.startswith("ym-job-")
    assert not Path(cwd).exists()  # the temp dir is removed with the job


async def test_missing_program_cannot_start() -> None:
    async def sink(stream: Stream, data: bytes) -> None:
        pass

    with pytest.raises(ExecutorError, match="could not start the process"):
        await ProcessExecutor().start("job", 1, JobSpec(image="-", command=["/nonexistent/prog"]), sink)


async def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"

    async def sink(stream: Stream, data: bytes) -> None:
        pass

    job = JobSpec(image="-", command=f"trap '' TERM; sleep 600 & echo $! > {pidfile}; wait")
    execution = await ProcessExecutor().start("job", 1, job, sink)
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.05)
    child = int(pidfile.read_text())
    t0 = time.monotonic()
    await execution.stop(grace_s=0.5)
    await execution.remove()
    assert time.monotonic() - t0 < 10
    await asyncio.sleep(0.2)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for init to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_runner_cancel_and_timeout() -> None:
    sent: list[AgentToServer] = []
    cancelled = JobRunner(f"j-{uuid.uuid4().hex[:6]}", 2, JobSpec(image="-", command="echo hi; sleep 600"),
                          time.time() + 60, ProcessExecutor(), sent.append)
    cancelled.start()
    for _ in range(100):
        if any(isinstance(m, LogChunk) for m in sent):
            break
        await asyncio.sleep(0.05)
    assert cancelled.cancel("stop it", 1.0)
    await asyncio.wait_for(cancelled.wait(), 20)
    assert [type(m) for m in sent] == [LogChunk, CancelAck, Result]
    assert isinstance(sent[-1], Result) and sent[-1].state == "cancelled" and sent[-1].last_seq == 0

    sent2: list[AgentToServer] = []
    # The assign's deadline is earlier than timeout_s here: the earlier one wins.
    timed = JobRunner("j-t", 1, JobSpec(image="-", command=["sleep", "600"], timeout_s=600), time.time() + 1,
                      ProcessExecutor(), sent2.append, timeout_grace_s=0.5)
    timed.start()
    await asyncio.wait_for(timed.wait(), 20)
    assert isinstance(sent2[-1], Result)
    assert sent2[-1].state == "timed-out"
    assert sent2[-1].error == "timed out after 1 s"


async def test_large_output_is_chunked_and_complete() -> None:
    sent: list[AgentToServer] = []
    runner = JobRunner("big", 1, JobSpec(image="-", command="head -c 1000000 /dev/zero | tr '\\0' a"),
                       time.time() + 60, ProcessExecutor(), sent.append)
    runner.start()
    await asyncio.wait_for(runner.wait(), 20)
    chunks = [m for m in sent if isinstance(m, LogChunk)]
    assert b"".join(c.data for c in chunks) == b"a" * 1_000_000
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert all(len(c.data) <= 64 * 1024 for c in chunks)
    assert len(chunks) < 100  # coalesced, not one frame per read
    assert isinstance(sent[-1], Result) and sent[-1].state == "succeeded" and sent[-1].last_seq == chunks[-1].seq
