"""The executor interface: how the runner starts, watches and stops one job's process."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from yardmaster.protocol.jobs import JobSpec
from yardmaster.protocol.messages import Stream

# Called for every piece of output; may block (backpressure) until the log buffer has room.
OutputSink = Callable[[Stream, bytes], Awaitable[None]]


class ExecutorError(Exception):
    """A job could not be started; the message is the Result error (e.g. `image-not-found: x`)."""


class ExecutorUnavailable(Exception):
    """The executor cannot work at all (e.g. the Docker engine is unreachable)."""


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int | None
    error: str | None = None  # set when the exit had a cause worth naming (out of memory, ...)


class Execution(abc.ABC):
    """One started job process or container."""

    @abc.abstractmethod
    async def wait(self) -> ExitInfo:
        """Wait until the process exits (its output may still be in flight: see `drain`)."""

    @abc.abstractmethod
    async def drain(self) -> None:
        """Wait until all output has been handed to the sink."""

    @abc.abstractmethod
    async def stop(self, grace_s: float) -> None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL. Returns once the process is gone."""

    @abc.abstractmethod
    async def remove(self) -> None:
        """Release everything (container, temp dirs, readers). Idempotent, never raises."""


class Executor(abc.ABC):
    name: str = "base"

    async def open(self) -> None:
        """Connect and check that the executor works; raise ExecutorUnavailable if not."""

    async def close(self) -> None:
        """Release the executor's own resources."""

    def info(self) -> dict[str, str]:
        """Describes the executor for `hello.executor_info`."""
        return {}

    @abc.abstractmethod
    async def start(self, job_id: str, attempt: int, spec: JobSpec, sink: OutputSink) -> Execution:
        """Start the job with its output connected to `sink`. Raises ExecutorError."""
