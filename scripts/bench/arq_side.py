"""arq's side of the dispatch benchmark, run by the arq virtual environment's Python (arq 0.28).

    arq_side.py <json config>    config: role ("worker" | "producer"), port (redis), and for the
                                 worker max_jobs and poll_delay

worker: an arq Worker with one no-op job, `noop(ctx, key, t_submit)`, which notes when it
    started (time.monotonic(), one clock for every process on the machine); `after_job_end`
    (called once the result is stored) counts finished jobs.
    commands: the fake agent's (fakeagent.py): count, report (job starts stand in for assignments,
    `after_job_end` calls for result-acks), reset
producer: enqueues with `ArqRedis.enqueue_job`.
    {"cmd": "burst", "n", "concurrency", "tag"} -> {"event": "burst", "t0", "t_end"}
        (n jobs from `concurrency` concurrent tasks, as fast as they go)
    {"cmd": "open", "rate", "duration", "tag"} -> {"event": "open", "sched": {key: t}, "late_p99",
        "t_end", "queue_depth"} (job i is due at t0 + i/rate; each one goes out at its due time
        whatever happened to the others)
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker

from common import Control, load_config

STARTS: dict[str, float] = {}
ENDED = {"n": 0, "last": 0.0}


async def noop(ctx: dict[str, Any], key: str, t_submit: float) -> None:
    STARTS[key] = time.monotonic()


async def after_job_end(ctx: dict[str, Any]) -> None:
    ENDED["n"] += 1
    ENDED["last"] = time.monotonic()


async def worker(cfg: dict[str, Any], control: Control) -> None:
    w = Worker(functions=[noop], redis_settings=RedisSettings(port=cfg["port"]), max_jobs=cfg["max_jobs"],
               poll_delay=cfg["poll_delay"], after_job_end=after_job_end, handle_signals=False)
    task = asyncio.create_task(w.async_run())
    try:
        while w._pool is None and not task.done():  # ready once connected
            await asyncio.sleep(0.01)
        control.emit("ready")
        while (cmd := await control.command()) is not None:
            if cmd["cmd"] == "count":
                control.emit("count", assigned=len(STARTS), done=ENDED["n"], last_done=ENDED["last"])
            elif cmd["cmd"] == "report":
                control.emit("report", assigns=STARTS, done=ENDED["n"], last_done=ENDED["last"])
            elif cmd["cmd"] == "reset":
                STARTS.clear()
                ENDED.update(n=0, last=0.0)
                control.emit("reset")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await w.close()


async def producer(cfg: dict[str, Any], control: Control) -> None:
    pool = await create_pool(RedisSettings(port=cfg["port"]))
    control.emit("ready")
    while (cmd := await control.command()) is not None:
        tag = cmd["tag"]
        if cmd["cmd"] == "burst":
            n, conc = cmd["n"], cmd["concurrency"]
            counter = iter(range(n))

            async def one_sender() -> None:
                for i in counter:
                    await pool.enqueue_job("noop", f"{tag}-{i}", time.monotonic())

            t0 = time.monotonic()
            await asyncio.gather(*(one_sender() for _ in range(conc)))
            control.emit("burst", t0=t0, t_end=time.monotonic())
        elif cmd["cmd"] == "open":
            rate, duration = cmd["rate"], cmd["duration"]
            total = int(rate * duration)
            sched: dict[str, float] = {}
            late: list[float] = []
            tasks = []

            async def send(key: str, due: float) -> None:
                late.append(time.monotonic() - due)
                await pool.enqueue_job("noop", key, due)

            t0 = time.monotonic() + 0.05
            for i in range(total):
                due = t0 + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                key = f"{tag}-{i}"
                sched[key] = due
                tasks.append(asyncio.create_task(send(key, due)))
            t_end = t0 + (total - 1) / rate
            depth = await pool.zcard("arq:queue")
            await asyncio.gather(*tasks)
            late.sort()
            control.emit("open", sched=sched, t_end=t_end, queue_depth=depth,
                         late_p99=late[int(0.99 * (len(late) - 1))] if late else 0.0)
    await pool.aclose()


async def main(cfg: dict[str, Any]) -> None:
    control = await Control().open()
    await (worker if cfg["role"] == "worker" else producer)(cfg, control)


if __name__ == "__main__":
    asyncio.run(main(load_config(sys.argv[1])))
