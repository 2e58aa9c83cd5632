"""Many WebSocket viewers in one helper process, on a minimal client (asyncio.Protocol, no library).

    viewers.py <json config>

config: port, path, headers {name: value}, topics (one per socket: the socket subscribes to it),
connect_concurrency, subscribe (a JSON template with "{topic}"), ready_marker (bytes in the
answer that confirms a subscription).

A library client spends tens of µs of Python per frame; on 2 cores that CPU would be taken from
the server under test. This one parses frames in data_received with a few slices, answers pings
(uvicorn and websockets ping every 20 s) and reads the send time the producer put into each log
text ("S=<step> T=<monotonic>"), so the measured delivery latency is receive time - send time.

Events: {"event": "ready", "open": n, "failed": n, "errors": [...]} once every socket is
subscribed. Commands:
    {"cmd": "report", "step": k, "expected": n, "wait": s} -> latencies of step k once n chunk
        deliveries arrived (or after `wait` s): {"event": "report", "count", "hist", "closed", ...}
    {"cmd": "status"} -> {"event": "status", "open": n, "closed": n, "close_codes": {...}}
EOF on stdin closes every socket and exits.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import sys
import time
from collections import Counter
from typing import Any, cast

from common import Control, Hist, fast_loop_run, load_config, raise_nofile

STAMP = re.compile(rb"S=(\d+) T=(\d+\.\d+)")


def mask_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame: FIN, the opcode, masked payload (clients must mask)."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    masked = (int.from_bytes(payload, "little") ^ int.from_bytes((key * (n // 4 + 1))[:n], "little")).to_bytes(n, "little")
    return head + key + masked


class Viewer(asyncio.Protocol):
    def __init__(self, owner: Viewers, request: bytes) -> None:
        self.owner = owner
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.subscribed = asyncio.get_running_loop().create_future()
        self.is_open = False
        self.close_code: int | None = None
        self.fragments: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.is_open:
            self.is_open = False
            self.owner.closed[str(self.close_code or "no close frame")] += 1
        for fut in (self.upgraded, self.subscribed):
            if not fut.done():
                fut.set_exception(ConnectionError(f"closed ({self.close_code or exc or 'no close frame'})"))

    def send_text(self, text: str) -> None:
        assert self.transport is not None
        self.transport.write(mask_frame(0x1, text.encode()))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf
        buf += data
        if not self.upgraded.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            if b" 101 " not in status + b" ":
                self.upgraded.set_exception(ConnectionError(bytes(buf[:end]).decode(errors="replace")[:200]))
                assert self.transport is not None
                self.transport.close()
                return
            del buf[: end + 4]
            self.is_open = True
            self.upgraded.set_result(None)
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                if size - pos < 4:
                    break
                n, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                if size - pos < 10:
                    break
                n, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if size - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])  # servers never mask
            pos += head + n
            self.on_frame(b0 & 0x80, b0 & 0x0F, payload, now)
        del buf[:pos]

    def on_frame(self, fin: int, opcode: int, payload: bytes, now: float) -> None:
        if opcode == 0x9:  # ping
            assert self.transport is not None
            self.transport.write(mask_frame(0xA, payload))
            return
        if opcode == 0x8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            assert self.transport is not None
            self.transport.write(mask_frame(0x8, payload[:2]))
            self.transport.close()
            return
        if opcode in (0x1, 0x2, 0x0):
            if not fin:
                self.fragments.append(payload)
                return
            if self.fragments:
                payload = b"".join(self.fragments) + payload
                self.fragments = []
            if not self.subscribed.done():
                if self.owner.ready_marker in payload:
                    self.subscribed.set_result(None)
                return
            self.owner.on_message(payload, now)


class Viewers:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.ready_marker: bytes = cfg.get("ready_marker", '"type":"subscribed"').encode()
        self.sockets: list[Viewer] = []
        self.closed: Counter[str] = Counter()
        self.per_step: dict[int, Hist] = {}
        self.frames = 0
        self.progress = asyncio.Event()

    def on_message(self, payload: bytes, now: float) -> None:
        self.frames += 1
        if b"S=" not in payload:
            return
        for match in STAMP.finditer(payload):  # one frame may carry several chunks if the server coalesces
            step = int(match.group(1))
            hist = self.per_step.get(step)
            if hist is None:
                hist = self.per_step[step] = Hist()
            hist.add(now - float(match.group(2)))
        self.progress.set()

    async def connect_one(self, topic: str) -> None:
        cfg = self.cfg
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {cfg['path']} HTTP/1.1", f"Host: 127.0.0.1:{cfg['port']}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in cfg.get("headers", {}).items()]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        loop = asyncio.get_running_loop()
        _, viewer = await loop.create_connection(lambda: Viewer(self, request), "127.0.0.1", cfg["port"])
        self.sockets.append(viewer)
        await asyncio.wait_for(viewer.upgraded, 30)
        viewer.send_text(cfg["subscribe"].replace("{topic}", topic))
        await asyncio.wait_for(viewer.subscribed, 30)

    async def connect_all(self) -> tuple[int, list[str]]:
        limit = asyncio.Semaphore(self.cfg.get("connect_concurrency", 100))
        errors: list[str] = []

        async def one(topic: str) -> None:
            async with limit:
                try:
                    await self.connect_one(topic)
                except (OSError, TimeoutError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")

        tasks = [asyncio.create_task(one(t)) for t in self.cfg["topics"]]
        _, pending = await asyncio.wait(tasks, timeout=self.cfg.get("connect_timeout", 120))
        for t in pending:
            t.cancel()
        if pending:
            errors.append(f"{len(pending)} not connected and subscribed within the time limit")
        return len(errors) - (1 if pending else 0) + len(pending), errors[:5]

    async def report(self, step: int, expected: int, wait: float) -> dict[str, Any]:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            hist = self.per_step.get(step)
            if hist is not None and hist.n >= expected:
                break
            self.progress.clear()
            try:
                await asyncio.wait_for(self.progress.wait(), min(0.2, max(0.01, deadline - time.monotonic())))
            except TimeoutError:
                pass
        hist = self.per_step.pop(step, Hist())
        return {"step": step, "count": hist.n, "hist": hist.to_json(), **self.status()}

    def status(self) -> dict[str, Any]:
        return {"open": sum(1 for v in self.sockets if v.is_open), "closed": sum(self.closed.values()),
                "close_codes": dict(self.closed), "frames": self.frames}


async def main(cfg: dict[str, Any]) -> None:
    raise_nofile()
    control = await Control().open()
    viewers = Viewers(cfg)
    failed, errors = await viewers.connect_all()
    control.emit("ready", failed=failed, errors=errors, **viewers.status())
    while (cmd := await control.command()) is not None:
        if cmd["cmd"] == "report":
            control.emit("report", **await viewers.report(cmd["step"], cmd["expected"], cmd["wait"]))
        elif cmd["cmd"] == "status":
            control.emit("status", **viewers.status())
        else:
            control.emit("error", message=f"unknown command {cmd['cmd']!r}")
    for v in viewers.sockets:
        if v.transport is not None:
            v.transport.close()


if __name__ == "__main__":
    fast_loop_run(main(load_config(sys.argv[1])))
