"""A fake agent speaking the real agent protocol (MessagePack on /ws/agent), run as a helper process.

    fakeagent.py <json config>      config: url, token, name, capacity, mode ("dispatch" | "stream")

dispatch: every `job-assign` is answered at once with `job-accept` and a `succeeded` result. The
time each assignment arrived is kept per job, keyed by the job command's last word (the
benchmark puts an index there), with the time of each `result-ack`.
    commands: {"cmd": "count"} -> {"event": "count", "assigned": n, "done": n (result-acks), "last_done": t}
              {"cmd": "report"} -> {"event": "report", "assigns": {key: t}, "done": n, "last_done": t}
              {"cmd": "reset"}

stream: the first `job-assign` is accepted and kept running ({"event": "running", "job_id": ...});
then each {"cmd": "stream", "rate": chunks/s (0: as fast as the window allows), "duration": s,
"size": bytes, "window": max unacked chunks, "step": n} sends log-chunks with contiguous seq
and answers {"event": "streamed", ...} once every chunk is acked. Chunk text starts with
"S=<step> T=<monotonic time> " so viewers can measure delivery latency; paced chunks carry
their due time (rate x duration chunks, chunk i due at start + i/rate), so a producer that is
held back counts as latency rather than as a lower rate.
    {"cmd": "finish"} sends the result.

Times are time.monotonic(): CLOCK_MONOTONIC is one clock for every process on the machine.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from common import Control, fast_loop_run, load_config
from yardmaster.protocol import messages as m
from yardmaster.protocol.codec import SUBPROTOCOL_MSGPACK, agent_client_codec

CODEC = agent_client_codec(SUBPROTOCOL_MSGPACK, 16 << 20)


class Agent:
    def __init__(self, cfg: dict[str, Any], control: Control) -> None:
        self.cfg = cfg
        self.control = control
        self.ws: ClientConnection | None = None
        self.assigns: dict[str, float] = {}
        self.acked = 0
        self.last_ack = 0.0
        # stream mode
        self.job: m.JobAssign | None = None
        self.running = asyncio.Event()
        self.next_seq = 0
        self.acked_seq = -1
        self.ack_changed = asyncio.Event()
        self.last_ack_at = 0.0

    async def send(self, msg: m.AgentToServer) -> None:
        assert self.ws is not None
        await self.ws.send(CODEC.encode(msg))

    async def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.cfg['token']}"}
        async with connect(self.cfg["url"] + "/ws/agent", additional_headers=headers, subprotocols=[SUBPROTOCOL_MSGPACK],
                           max_size=16 << 20, compression=None, ping_interval=None, open_timeout=20) as ws:
            self.ws = ws
            await self.send(m.Hello(name=self.cfg["name"], version="bench", capacity=self.cfg["capacity"],
                                    labels=self.cfg.get("labels", [])))
            welcome = CODEC.decode(await asyncio.wait_for(ws.recv(), 20))
            if not isinstance(welcome, m.Welcome):
                raise RuntimeError(f"expected welcome, got {m.tag_of(welcome)}")
            self.control.emit("ready", agent_id=welcome.agent_id)
            tasks = [asyncio.create_task(self.receive()), asyncio.create_task(self.heartbeat(welcome.heartbeat_interval_s)),
                     asyncio.create_task(self.commands())]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            for t in done:
                t.result()

    async def heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            running = []
            if self.job is not None and self.running.is_set():
                running = [m.RunningJob(job_id=self.job.job_id, attempt=self.job.attempt, last_seq=self.next_seq - 1)]
            await self.send(m.Heartbeat(running=running))

    async def receive(self) -> None:
        assert self.ws is not None
        stream_mode = self.cfg["mode"] == "stream"
        async for frame in self.ws:
            now = time.monotonic()
            msg = CODEC.decode(frame)
            if isinstance(msg, m.LogAck):
                if msg.seq > self.acked_seq:
                    self.acked_seq = msg.seq
                    self.last_ack_at = now
                    self.ack_changed.set()
            elif isinstance(msg, m.JobAssign):
                if stream_mode:
                    await self.on_stream_assign(msg)
                    continue
                cmd = msg.spec.command
                self.assigns[cmd[-1] if isinstance(cmd, list) else cmd] = now
                await self.send(m.JobAccept(job_id=msg.job_id, attempt=msg.attempt))
                t = time.time()
                await self.send(m.Result(job_id=msg.job_id, attempt=msg.attempt, state="succeeded", exit_code=0,
                                         started_at=t, finished_at=t))
            elif isinstance(msg, m.ResultAck):
                self.acked += 1
                self.last_ack = now
            elif isinstance(msg, m.Error):
                print(f"server error: {msg.code} {msg.message}", file=sys.stderr)
            elif isinstance(msg, m.Cancel):
                await self.send(m.CancelAck(job_id=msg.job_id, attempt=msg.attempt))

    async def on_stream_assign(self, msg: m.JobAssign) -> None:
        if self.job is not None:
            await self.send(m.JobReject(job_id=msg.job_id, attempt=msg.attempt, reason="busy"))
            return
        self.job = msg
        await self.send(m.JobAccept(job_id=msg.job_id, attempt=msg.attempt))
        self.running.set()
        self.control.emit("running", job_id=msg.job_id)

    async def commands(self) -> None:
        while (cmd := await self.control.command()) is not None:
            kind = cmd["cmd"]
            if kind == "count":
                self.control.emit("count", assigned=len(self.assigns), done=self.acked, last_done=self.last_ack)
            elif kind == "report":
                self.control.emit("report", assigns=self.assigns, done=self.acked, last_done=self.last_ack)
            elif kind == "reset":
                self.assigns, self.acked, self.last_ack = {}, 0, 0.0
                self.control.emit("reset")
            elif kind == "stream":
                self.control.emit("streamed", **await self.stream(cmd))
            elif kind == "finish":
                assert self.job is not None
                await self.send(m.Result(job_id=self.job.job_id, attempt=self.job.attempt, state="succeeded",
                                         exit_code=0, last_seq=self.next_seq - 1))
                self.control.emit("finished")
            else:
                self.control.emit("error", message=f"unknown command {kind!r}")

    async def stream(self, cmd: dict[str, Any]) -> dict[str, Any]:
        await asyncio.wait_for(self.running.wait(), 30)
        assert self.job is not None
        rate, duration, size, window, step = cmd["rate"], cmd["duration"], cmd["size"], cmd["window"], cmd.get("step", 0)
        job_id, attempt = self.job.job_id, self.job.attempt
        filler = b"x" * size
        first_seq = self.next_seq
        start = time.monotonic()
        # Paced: exactly rate x duration chunks, chunk i due at start + i/rate and stamped with
        # that due time, so a producer held back (by the window) shows up as latency, not as a
        # lower rate. Unpaced (rate 0): as many as the window allows for `duration` seconds.
        total = int(rate * duration) if rate else None
        end = start + duration + (30 if rate else 0)
        sent_bytes = 0
        waited_for_window = 0
        i = 0
        while total is None or i < total:
            now = time.monotonic()
            if now >= end:
                break
            t = now
            if rate:
                t = start + i / rate
                if t > now:
                    await asyncio.sleep(t - now)
            while self.next_seq - 1 - self.acked_seq >= window:
                waited_for_window += 1
                self.ack_changed.clear()
                await asyncio.wait_for(self.ack_changed.wait(), 30)
            if not rate:
                t = time.monotonic()
            head = b"S=%d T=%.6f " % (step, t)
            data = (head + filler)[: max(size, len(head) + 1)]
            await self.send(m.LogChunk(job_id=job_id, attempt=attempt, seq=self.next_seq, stream="stdout", data=data, ts=time.time()))
            self.next_seq += 1
            sent_bytes += len(data)
            i += 1
        last_send = time.monotonic()
        deadline = last_send + 60
        while self.acked_seq < self.next_seq - 1 and time.monotonic() < deadline:
            self.ack_changed.clear()
            try:
                await asyncio.wait_for(self.ack_changed.wait(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
        return {"sent": self.next_seq - first_seq, "bytes": sent_bytes, "t_first": start, "t_last_send": last_send,
                "t_last_ack": self.last_ack_at, "all_acked": self.acked_seq >= self.next_seq - 1,
                "window_waits": waited_for_window}


async def main(cfg: dict[str, Any]) -> None:
    control = await Control().open()
    try:
        await Agent(cfg, control).run()
    except Exception as exc:  # noqa: BLE001 - reported to the benchmark, which prints it
        control.emit("error", message=f"fake agent: {type(exc).__name__}: {exc}")
        raise


if __name__ == "__main__":
    fast_loop_run(main(load_config(sys.argv[1])))
