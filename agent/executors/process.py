"""Run jobs as local subprocesses. UNSANDBOXED: opt-in, for trusted jobs and development only."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import logging

from yardmaster.agent.executors.base import Execution, Executor, ExecutorError, ExitInfo, OutputSink
from yardmaster.protocol.jobs import JobSpec
from yardmaster.protocol.messages import Stream

log = logging.getLogger(__name__)

_READ_SIZE = 32 * 1024
_KILL_WAIT_S = 10.0
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


class ProcessExecution(Execution):
    def __init__(self, proc: asyncio.subprocess.Process, sink: OutputSink, tmpdir: str | None) -> None:
        self._proc = proc
        self._sink = sink
        self._tmpdir = tmpdir
        assert proc.stdout is not None and proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(proc.stdout, "stdout")),
            asyncio.create_task(self._read(proc.stderr, "stderr")),
        ]
        self._removed = False

    async def _read(self, pipe: asyncio.StreamReader, stream: Stream) -> None:
        while True:
            data = await pipe.read(_READ_SIZE)
            if not data:
                return
            await self._sink(stream, data)

    async def wait(self) -> ExitInfo:
        code = await self._proc.wait()
        # A negative code is "killed by signal N": report it the way shells and Docker do.
        return ExitInfo(128 - code if code < 0 else code)

    async def drain(self) -> None:
        await asyncio.gather(*(asyncio.shield(r) for r in self._readers))

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self._proc.pid, sig)  # the process leads its own group (start_new_session)
        except ProcessLookupError:
            pass

    async def stop(self, grace_s: float) -> None:
        if self._proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), timeout=max(grace_s, 0.0))
            except TimeoutError:
                pass
        # Children of the job may outlive its main process: the whole group goes.
        self._signal_group(signal.SIGKILL)
        try:
            await asyncio.wait_for(self._proc.wait(), timeout=_KILL_WAIT_S)
        except TimeoutError:
            log.warning("process %d did not exit after SIGKILL", self._proc.pid)

    async def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        self._signal_group(signal.SIGKILL)
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self._proc.returncode is None:
            try:
                await asyncio.wait_for(self._proc.wait(), timeout=_KILL_WAIT_S)
            except TimeoutError:
                pass
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


class ProcessExecutor(Executor):
    name = "process"

    def info(self) -> dict[str, str]:
        return {"sandbox": "none"}

    async def start(self, job_id: str, attempt: int, spec: JobSpec, sink: OutputSink) -> Execution:
        env = {"PATH": os.environ.get("PATH", DEFAULT_PATH), **spec.env}
        tmpdir = None
        cwd = spec.workdir
        if cwd is None:
            tmpdir = cwd = tempfile.mkdtemp(prefix="ym-job-")
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.argv(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
            raise ExecutorError(f"could not start the process: {exc}") from None
        return ProcessExecution(proc, sink, tmpdir)
