"""Driving an agent executor directly in tests: run one job to its end and collect its output."""

from __future__ import annotations

import asyncio
import uuid

from yardmaster.agent.executors.base import Executor, ExitInfo
from yardmaster.protocol.jobs import JobSpec
from yardmaster.protocol.messages import Stream

Output = list[tuple[Stream, bytes]]


async def run_job(executor: Executor, job: JobSpec, timeout: float = 60) -> tuple[ExitInfo, Output]:
    out: Output = []

    async def sink(stream: Stream, data: bytes) -> None:
        out.append((stream, data))

    execution = await executor.start(f"job-{uuid.uuid4().hex[:8]}", 1, job, sink)
    try:
        info = await asyncio.wait_for(execution.wait(), timeout)
        await asyncio.wait_for(execution.drain(), timeout)
    finally:
        await execution.remove()
    return info, out


def text(out: Output, stream: Stream) -> str:
    return b"".join(d for s, d in out if s == stream).decode()
