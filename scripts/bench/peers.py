"""The peers the benchmarks compare Yardmaster with, run as a helper process.

    peers.py <json config>     config: kind, port

kind "websockets": a minimal `websockets` server; a socket that sends
    {"type": "subscribe", "topic": T} is answered {"type": "subscribed", "topic": T} and joins T.
    The in-process producer hands each frame to `websockets.broadcast` for the topic's sockets.
kind "uvicorn": the same as a bare ASGI app under uvicorn with `ws="websockets-sansio"` and the
    server's other WebSocket settings (no deflate, 20 s pings); the producer awaits
    `send(websocket.send)` for each subscriber in a loop.
kind "ingest-sqlite": a bare ASGI app under the same uvicorn settings that takes an agent's
    hello, assigns it one job, and for each log-chunk with the next seq does one INSERT and
    COMMIT into SQLite (WAL, synchronous=NORMAL, like the server's store) and answers log-ack:
    the least work that still persists the output.

Frames are the server's own `log` message (msgspec JSON of protocol.messages.Log), with the text
"S=<step> T=<monotonic due time> xxx..." the viewers measure. Both servers run on uvloop
(uvicorn picks it; the websockets server is given it), like the Yardmaster server.

Events: {"event": "ready"}. Commands: {"cmd": "stream", "topic", "rate", "duration", "size",
"step"} -> {"event": "streamed", "sent": n}.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from common import Control, fast_loop_run, load_config, raise_nofile
from yardmaster.protocol import messages as m
from yardmaster.protocol.codec import SUBPROTOCOL_MSGPACK, agent_server_codec
from yardmaster.protocol.jobs import JobSpec

ENCODE = msgspec.json.Encoder().encode
Probe = msgspec.json.Decoder(dict[str, Any]).decode
JOB_ID = "job_peer0000000000000000"

Broadcast = Callable[[str, str], Awaitable[None]]


def uvicorn_server(app: Any, port: int) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, ws="websockets-sansio", ws_max_size=1 << 20, ws_per_message_deflate=False,
        ws_ping_interval=20.0, ws_ping_timeout=20.0, lifespan="off", log_config=None, access_log=False,
        server_header=False, log_level="warning",
    )
    return uvicorn.Server(config)


async def produce(broadcast: Broadcast, cmd: dict[str, Any]) -> int:
    """rate x duration frames, frame i due at start + i/rate and stamped with that due time (as
    the fake agent does): a producer that falls behind shows up as latency."""
    rate, duration, size, step, topic = cmd["rate"], cmd["duration"], cmd["size"], cmd["step"], cmd["topic"]
    filler = "x" * size
    start = time.monotonic()
    end = start + duration + 30
    total = int(rate * duration)
    for i in range(total):
        now = time.monotonic()
        if now >= end:
            return i
        due = start + i / rate
        if due > now:
            await asyncio.sleep(due - now)
        head = "S=%d T=%.6f " % (step, due)
        frame = ENCODE(m.Log(job_id=JOB_ID, attempt=1, offset=i, stream="stdout", text=(head + filler)[:size])).decode()
        await broadcast(topic, frame)
    return total


def subscribed_frame(topic: str) -> str:
    return ENCODE(m.Subscribed(topic=topic)).decode()


async def serve_websockets(port: int, control: Control) -> None:
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    topics: dict[str, set[ServerConnection]] = defaultdict(set)

    async def handler(ws: ServerConnection) -> None:
        joined: list[str] = []
        try:
            async for raw in ws:
                msg = Probe(raw)
                if msg.get("type") == "subscribe":
                    topics[msg["topic"]].add(ws)
                    joined.append(msg["topic"])
                    await ws.send(subscribed_frame(msg["topic"]))
        finally:
            for t in joined:
                topics[t].discard(ws)

    async def fan_out(topic: str, frame: str) -> None:
        broadcast(topics[topic], frame)

    async with serve(handler, "127.0.0.1", port, compression=None, max_size=1 << 20, ping_interval=20.0,
                     ping_timeout=20.0, backlog=4096):
        await commands(control, fan_out)


async def serve_uvicorn(port: int, control: Control) -> None:
    topics: dict[str, dict[int, Callable[[dict[str, Any]], Awaitable[None]]]] = defaultdict(dict)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        joined: list[str] = []
        try:
            while True:
                event = await receive()
                if event["type"] == "websocket.connect":
                    await send({"type": "websocket.accept"})
                elif event["type"] == "websocket.receive":
                    msg = Probe(event.get("text") or event.get("bytes") or b"{}")
                    if msg.get("type") == "subscribe":
                        topics[msg["topic"]][id(send)] = send
                        joined.append(msg["topic"])
                        await send({"type": "websocket.send", "text": subscribed_frame(msg["topic"])})
                else:
                    return
        finally:
            for t in joined:
                topics[t].pop(id(send), None)

    async def fan_out(topic: str, frame: str) -> None:
        event = {"type": "websocket.send", "text": frame}
        for send in list(topics[topic].values()):
            try:
                await send(event)
            except Exception:  # noqa: BLE001 - a socket that went away meanwhile
                pass

    await run_uvicorn(app, port, control, fan_out)


async def serve_ingest_sqlite(port: int, control: Control) -> None:
    db = sqlite3.connect(tempfile.mkdtemp(prefix="ym-bench-peer-") + "/peer.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute('CREATE TABLE logs (job_id TEXT, "offset" INTEGER, seq INTEGER, data BLOB, PRIMARY KEY (job_id, "offset"))')

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        codec = agent_server_codec(SUBPROTOCOL_MSGPACK)
        acked = -1
        while True:
            event = await receive()
            if event["type"] == "websocket.connect":
                await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL_MSGPACK})
                continue
            if event["type"] != "websocket.receive":
                return
            msg = codec.decode(event["bytes"])
            reply: list[m.ServerToAgent] = []
            if isinstance(msg, m.LogChunk):
                if msg.seq == acked + 1:
                    db.execute("BEGIN")
                    db.execute('INSERT INTO logs VALUES (?, ?, ?, ?)', (msg.job_id, msg.seq, msg.seq, msg.data))
                    db.execute("COMMIT")
                    acked = msg.seq
                reply.append(m.LogAck(job_id=msg.job_id, attempt=msg.attempt, seq=acked))
            elif isinstance(msg, m.Hello):
                reply.append(m.Welcome(session_id="ses_peer", agent_id="agt_peer", heartbeat_interval_s=10.0, lease_s=30.0))
                reply.append(m.JobAssign(job_id=JOB_ID, attempt=1, spec=JobSpec(image="bench", command=["true"]),
                                         deadline=time.time() + 3600))
            elif isinstance(msg, m.Result):
                reply.append(m.ResultAck(job_id=msg.job_id, attempt=msg.attempt))
            for r in reply:
                await send({"type": "websocket.send", "bytes": codec.encode(r)})

    async def no_fan_out(topic: str, frame: str) -> None:
        raise RuntimeError("the ingest peer has no viewers")

    await run_uvicorn(app, port, control, no_fan_out)


async def run_uvicorn(app: Any, port: int, control: Control, fan_out: Broadcast) -> None:
    server = uvicorn_server(app, port)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped at start")
        await asyncio.sleep(0.02)
    try:
        await commands(control, fan_out)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def commands(control: Control, fan_out: Broadcast) -> None:
    control.emit("ready")
    while (cmd := await control.command()) is not None:
        if cmd["cmd"] == "stream":
            control.emit("streamed", sent=await produce(fan_out, cmd))
        else:
            control.emit("error", message=f"unknown command {cmd['cmd']!r}")


async def main(cfg: dict[str, Any]) -> None:
    raise_nofile()
    control = await Control().open()
    serve = {"websockets": serve_websockets, "uvicorn": serve_uvicorn, "ingest-sqlite": serve_ingest_sqlite}[cfg["kind"]]
    await serve(cfg["port"], control)


if __name__ == "__main__":
    fast_loop_run(main(load_config(sys.argv[1])))
