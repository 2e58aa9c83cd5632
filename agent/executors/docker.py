"""Run jobs in hardened Docker containers through the Engine API (aiodocker). Never pulls."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from typing import Any

import aiodocker
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError
from aiodocker.stream import Stream as DockerStream

from yardmaster.agent.executors.base import Execution, Executor, ExecutorError, ExecutorUnavailable, ExitInfo, OutputSink
from yardmaster.protocol.jobs import JobSpec

log = logging.getLogger(__name__)

LABEL_JOB = "yardmaster.job"
LABEL_ATTEMPT = "yardmaster.attempt"
LABEL_AGENT = "yardmaster.agent"
TMPFS_OPTIONS = "rw,nosuid,nodev,size=64m"
MIB = 1024 * 1024
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")
_KILL_WAIT_S = 15.0  # after SIGKILL, how long the engine may take to report the exit


def container_name(job_id: str, attempt: int) -> str:
    return f"ym-{_NAME_UNSAFE.sub('_', job_id)[:200]}-{attempt}"


def container_config(job_id: str, attempt: int, spec: JobSpec, agent_name: str) -> dict[str, Any]:
    """The Engine API create body: hardened defaults, only loosened where the spec says so."""
    res = spec.resources
    config: dict[str, Any] = {
        "Image": spec.image,
        "Cmd": spec.argv(),
        "Env": [f"{k}={v}" for k, v in spec.env.items()],
        "User": spec.user,
        "Tty": False,
        "OpenStdin": False,
        "AttachStdout": True,
        "AttachStderr": True,
        "NetworkDisabled": False,  # network is "none" through NetworkMode; see HostConfig
        "Labels": {LABEL_JOB: job_id, LABEL_ATTEMPT: str(attempt), LABEL_AGENT: agent_name},
        "HostConfig": {
            "ReadonlyRootfs": spec.read_only_rootfs,
            "Tmpfs": {"/tmp": TMPFS_OPTIONS},
            "NetworkMode": "none",
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "Memory": res.memory_mb * MIB,
            "MemorySwap": res.memory_mb * MIB,
            "NanoCpus": int(res.cpus * 1e9),
            "PidsLimit": res.pids,
            "AutoRemove": False,  # we remove it ourselves, after reading its exit state
            # The agent streams the output from the attach stream; the engine keeps no copy on disk.
            "LogConfig": {"Type": "none", "Config": {}},
            "Privileged": False,
        },
    }
    if spec.workdir:
        config["WorkingDir"] = spec.workdir
    return config


async def _ignore_gone(coro: Any) -> None:
    """Run an engine call whose failure because the container is gone or stopped is fine."""
    try:
        await coro
    except DockerError as exc:
        if exc.status not in (404, 409):
            raise


class DockerExecution(Execution):
    def __init__(self, container: DockerContainer, stream: DockerStream, sink: OutputSink, memory_mb: int) -> None:
        self._container = container
        self._stream = stream
        self._sink = sink
        self._memory_mb = memory_mb
        self._reader = asyncio.create_task(self._read())
        self._waiter: asyncio.Task[ExitInfo] | None = None
        self._removed = False

    async def _read(self) -> None:
        while True:
            msg = await self._stream.read_out()
            if msg is None:
                return
            await self._sink("stderr" if msg.stream == 2 else "stdout", msg.data)

    async def _wait(self) -> ExitInfo:
        status = await self._container.wait()
        code = int(status.get("StatusCode", -1))
        info = await self._container.show()
        state = info.get("State", {})
        if state.get("OOMKilled"):
            return ExitInfo(code, f"out of memory: killed after exceeding the memory limit of {self._memory_mb} MiB")
        return ExitInfo(code)

    def _wait_task(self) -> asyncio.Task[ExitInfo]:
        if self._waiter is None:
            self._waiter = asyncio.create_task(self._wait())
        return self._waiter

    async def wait(self) -> ExitInfo:
        return await asyncio.shield(self._wait_task())

    async def drain(self) -> None:
        await asyncio.shield(self._reader)

    async def stop(self, grace_s: float) -> None:
        waiter = self._wait_task()
        if waiter.done():
            return
        await _ignore_gone(self._container.kill(signal="SIGTERM"))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=max(grace_s, 0.0))
            return
        except TimeoutError:
            pass
        await _ignore_gone(self._container.kill(signal="SIGKILL"))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout=_KILL_WAIT_S)
        except TimeoutError:
            log.warning("container %s did not report its exit after SIGKILL", self._container.id[:12])

    async def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        for task in (self._reader, self._waiter):
            if task is not None and not task.done():
                task.cancel()
        try:
            await self._stream.close()
        except Exception:  # noqa: BLE001 - closing a broken stream must not stop the removal
            pass
        try:
            await _ignore_gone(self._container.delete(force=True))
        except Exception as exc:  # noqa: BLE001
            log.error("could not remove container %s: %s", self._container.id[:12], exc)
        for task in (self._reader, self._waiter):
            if task is not None:
                try:
                    await task
                except BaseException:  # noqa: BLE001 - results no longer matter
                    pass


class DockerExecutor(Executor):
    name = "docker"

    def __init__(self, agent_name: str, docker_host: str | None = None) -> None:
        self._agent_name = agent_name
        self._host = docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        self._docker: aiodocker.Docker | None = None
        self._info: dict[str, str] = {}

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            raise RuntimeError("DockerExecutor.open() was not called")
        return self._docker

    async def open(self) -> None:
        self._docker = aiodocker.Docker(url=self._host)
        try:
            version = await self._docker.version()
        except Exception as exc:  # noqa: BLE001 - any failure here means "unreachable"
            await self.close()
            raise ExecutorUnavailable(f"Docker engine unreachable at {self._host}: {exc}") from None
        self._info = {
            "docker_version": str(version.get("Version", "")),
            "api_version": str(version.get("ApiVersion", "")),
            "os": str(version.get("Os", "")),
            "arch": str(version.get("Arch", "")),
        }
        await self.remove_leftovers()

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None

    def info(self) -> dict[str, str]:
        return dict(self._info)

    async def remove_leftovers(self) -> int:
        """Remove containers a previous (crashed) run of this agent left behind."""
        containers = await self.docker.containers.list(
            all=True, filters={"label": [f"{LABEL_AGENT}={self._agent_name}"]}
        )
        for container in containers:
            log.warning("removing leftover container %s", container.id[:12])
            await _ignore_gone(container.delete(force=True))
        return len(containers)

    async def start(self, job_id: str, attempt: int, spec: JobSpec, sink: OutputSink) -> Execution:
        config = container_config(job_id, attempt, spec, self._agent_name)
        name = container_name(job_id, attempt)
        # A container of the same name can only be ours, from an earlier try of this attempt.
        await _ignore_gone(self.docker.containers.container(name).delete(force=True))
        try:
            container = await self.docker.containers.create(config, name=name)
        except DockerError as exc:
            if exc.status == 404 or "No such image" in str(exc.message):
                raise ExecutorError(f"image-not-found: {spec.image}") from None
            raise ExecutorError(f"could not create the container: {exc.message}") from None
        stream = container.attach(stdout=True, stderr=True, logs=False)
        try:
            await stream.__aenter__()  # attach before start, so no output is lost
            await container.start()
        except Exception as exc:  # noqa: BLE001 - any start failure is the job's failure
            try:
                await stream.close()
            finally:
                await _ignore_gone(container.delete(force=True))
            message = exc.message if isinstance(exc, DockerError) else str(exc)
            raise ExecutorError(f"could not start the container: {message}") from None
        return DockerExecution(container, stream, sink, spec.resources.memory_mb)
