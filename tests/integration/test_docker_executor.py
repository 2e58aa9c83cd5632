"""The Docker executor against a real engine (private dockerd or DOCKER_HOST); no server."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from aiodocker.exceptions import DockerError

from yardmaster.agent.executors.base import ExecutorError, ExitInfo
from yardmaster.agent.executors.docker import LABEL_AGENT, DockerExecutor, container_name
from yardmaster.agent.runner import JobRunner
from yardmaster.protocol.jobs import JobSpec, Resources
from yardmaster.protocol.messages import AgentToServer, CancelAck, LogChunk, Result, Stream
from tests.support.docker_engine import DockerEngine
from tests.support.executors import Output, run_job, text

pytestmark = pytest.mark.docker


@pytest.fixture
async def executor(docker_engine: DockerEngine) -> AsyncIterator[DockerExecutor]:
    ex = DockerExecutor(f"test-{uuid.uuid4().hex[:8]}", docker_host=docker_engine.host)
    await ex.open()
    try:
        yield ex
    finally:
        await ex.close()


def spec(command: str | list[str], image: str, **kw: object) -> JobSpec:
    return JobSpec(image=image, command=command, **kw)  # type: ignore[arg-type]


async def run(executor: DockerExecutor, job: JobSpec, timeout: float = 60) -> tuple[ExitInfo, Output]:
    return await run_job(executor, job, timeout)


def our_containers(engine: DockerEngine, executor: DockerExecutor) -> list[dict[str, object]]:
    return engine.containers(f"{LABEL_AGENT}={executor._agent_name}")


async def test_stdout_and_stderr_arrive_separated_and_in_order(executor: DockerExecutor, docker_engine: DockerEngine) -> None:
    script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; done"
    info, out = await run(executor, spec(script, docker_engine.image))
    assert info.exit_code == 0
    assert text(out, "stdout") == "".join(f"out{i}\n" for i in range(1, 6))
    assert text(out, "stderr") == "".join(f"err{i}\n" for i in range(1, 6))
    assert our_containers(docker_engine, executor) == []


async def test_exit_codes(executor: DockerExecutor, docker_engine: DockerEngine) -> None:
    ok, _ = await run(executor, spec(["/bin/true"], docker_engine.image))
    bad, _ = await run(executor, spec("exit 7", docker_engine.image))
    assert ok.exit_code == 0 and ok.error is None
    assert bad.exit_code == 7


async def test_env_and_workdir(executor: DockerExecutor, docker_engine: DockerEngine) -> None:
    info, out = await run(executor, spec('echo "$GREETING" && pwd', docker_engine.image, env={"GREETING": "hi there"},
                                         workdir="/tmp"))
    assert info.exit_code == 0
    assert text(out, "stdout") == "hi there\n/tmp\n"


async def test_missing_image_is_image_not_found(executor: DockerExecutor) -> None:
    async def sink(stream: Stream, data: bytes) -> None:
        pass

    with pytest.raises(ExecutorError, match="^image-not-found: yardmaster-test/nope:1$"):
        await executor.start("job-x", 1, spec("true", "yardmaster-test/nope:1"), sink)


async def test_stop_kills_sleep_within_grace_and_removes_container(executor: DockerExecutor,
                                                                   docker_engine: DockerEngine) -> None:
    async def sink(stream: Stream, data: bytes) -> None:
        pass

    execution = await executor.start("job-sleep", 1, spec(["sleep", "600"], docker_engine.image), sink)
    assert len(our_containers(docker_engine, executor)) == 1
    t0 = time.monotonic()
    await execution.stop(grace_s=1.0)
    info = await asyncio.wait_for(execution.wait(), 5)
    await execution.remove()
    assert time.monotonic() - t0 < 10
    assert info.exit_code == 137  # sleep as PID 1 ignores SIGTERM: SIGKILL after the grace period
    assert our_containers(docker_engine, executor) == []


def collect_runner(executor: DockerExecutor, job: JobSpec, deadline: float | None = None) -> tuple[JobRunner, list[AgentToServer]]:
    sent: list[AgentToServer] = []
    runner = JobRunner(f"job-{uuid.uuid4().hex[:8]}", 1, job, deadline or time.time() + 3600, executor, sent.append,
                       timeout_grace_s=1.0)
    return runner, sent


async def test_runner_cancel_reports_cancel_ack_then_result(executor: DockerExecutor, docker_engine: DockerEngine) -> None:
    runner, sent = collect_runner(executor, spec("echo started; exec sleep 600", docker_engine.image))
    runner.start()
    for _ in range(100):
        if any(isinstance(m, LogChunk) for m in sent):
            break
        await asyncio.sleep(0.1)
    assert runner.cancel("user asked", grace_s=1.0)
    await asyncio.wait_for(runner.wait(), 30)
    kinds = [type(m) for m in sent]
    assert kinds[-2:] == [CancelAck, Result]
    result = sent[-1]
    assert isinstance(result, Result) and result.state == "cancelled"
    assert b"".join(m.data for m in sent if isinstance(m, LogChunk)) == b"started\n"
    assert result.last_seq == max(m.seq for m in sent if isinstance(m, LogChunk))
    assert our_containers(docker_engine, executor) == []


async def test_runner_timeout(executor: DockerExecutor, docker_engine: DockerEngine) -> None:
    runner, sent = collect_runner(executor, spec(["sleep", "600"], docker_engine.image, timeout_s=1))
    t0 = time.monotonic()
    runner.start()
    await asyncio.wait_for(runner.wait(), 30)
    assert time.monotonic() - t0 < 20
    result = sent[-1]
    assert isinstance(result, Result)
    assert result.state == "timed-out"
    assert result.error == "timed out after 1 s"
    assert our_containers(docker_engine, executor) == []


async def test_runner_missing_image_fails(executor: DockerExecutor) -> None:
    runner, sent = collect_runner(executor, spec("true", "yardmaster-test/absent:latest"))
    runner.start()
    await asyncio.wait_for(runner.wait(), 30)
    assert sent == [runner.result]
    assert runner.result is not None and runner.result.state == "failed"
    assert runner.result.error == "image-not-found: yardmaster-test/absent:latest"


async def test_root_filesystem_is_read_only(executor: DockerExecutor, docker_engine: DockerEngine) -> None:
    info, out = await run(executor, spec("touch /x; echo rc=$?; touch /tmp/ok && echo tmp-ok", docker_engine.image))
    assert "rc=1" in text(out, "stdout")
    assert "Read-only file system" in text(out, "stderr")
    assert "tmp-ok" in text(out, "stdout")


async def test_runs_as_nobody_without_capabilities(executor: DockerExecutor, docker_engine: DockerEngine) -> None:
    info, out = await run(executor, spec("id -u; grep -E '^Cap(Eff|Prm):' /proc/self/status", docker_engine.image))
    lines = text(out, "stdout").split("\n")
    assert info.exit_code == 0
    assert lines[0] == "65534"
    assert "CapEff:\t0000000000000000" in lines
    assert "CapPrm:\t0000000000000000" in lines


async def test_no_network_but_loopback(executor: DockerExecutor, docker_engine: DockerEngine) -> None:
    info, out = await run(executor, spec("cat /proc/net/dev", docker_engine.image))
    assert info.exit_code == 0
    interfaces = [line.split(":")[0].strip() for line in text(out, "stdout").splitlines() if ":" in line]
    assert interfaces == ["lo"]


async def test_memory_hog_is_killed_as_out_of_memory(executor: DockerExecutor, docker_engine: DockerEngine) -> None:
    # tmpfs pages count against the container's memory cgroup and cannot be swapped out.
    hog = spec("head -c 60m /dev/zero > /tmp/fill; echo survived", docker_engine.image,
               resources=Resources(memory_mb=16))
    info, out = await run(executor, hog)
    assert "survived" not in text(out, "stdout")
    assert info.exit_code == 137
    assert info.error == "out of memory: killed after exceeding the memory limit of 16 MiB"


async def test_pids_limit(executor: DockerExecutor, docker_engine: DockerEngine) -> None:
    info, out = await run(executor, spec("for i in $(seq 1 40); do sleep 5 & done; wait; echo done", docker_engine.image,
                                         resources=Resources(pids=8)))
    assert "can't fork" in text(out, "stderr") or "Resource temporarily unavailable" in text(out, "stderr")


async def test_leftover_containers_are_removed_at_open(executor: DockerExecutor, docker_engine: DockerEngine) -> None:
    async def sink(stream: Stream, data: bytes) -> None:
        pass

    execution = await executor.start("job-leftover", 1, spec(["sleep", "600"], docker_engine.image), sink)
    assert len(our_containers(docker_engine, executor)) == 1
    # A new agent process with the same name (after a crash) cleans up at start.
    again = DockerExecutor(executor._agent_name, docker_host=docker_engine.host)
    await again.open()
    await again.close()
    assert our_containers(docker_engine, executor) == []
    await execution.remove()  # already gone: must not raise


async def test_the_engine_keeps_no_copy_of_the_output(executor: DockerExecutor, docker_engine: DockerEngine) -> None:
    streamed = bytearray()
    arrived = asyncio.Event()

    async def sink(stream: Stream, data: bytes) -> None:
        streamed.extend(data)
        if b"only-on-the-stream" in streamed:
            arrived.set()

    execution = await executor.start("job-nolog", 1, spec("echo only-on-the-stream; exec sleep 600", docker_engine.image), sink)
    try:
        await asyncio.wait_for(arrived.wait(), 30)  # the agent still gets the output, from the attach stream
        container = executor.docker.containers.container(container_name("job-nolog", 1))
        assert (await container.show())["HostConfig"]["LogConfig"]["Type"] == "none"
        with pytest.raises(DockerError) as refused:  # nothing kept on the host's disk to read back
            await container.log(stdout=True, stderr=True)
        assert "does not support reading" in str(refused.value.message)
    finally:
        await execution.stop(grace_s=0)
        await execution.remove()
