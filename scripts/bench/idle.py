#!/usr/bin/env python3
"""Idle sockets: server memory per idle, subscribed client socket, Yardmaster beside two peers.

    .venv/bin/python scripts/bench/idle.py [--quick] [--sockets 2000,10000] [--only NAME]

Competitors, each a fresh server per measurement:
  yardmaster       `yardmaster server` (embedded); sockets on /ws/client (API key), each
                   subscribed to a job:<id> topic of a queued job
  ws-server        a minimal `websockets` server keeping a set of sockets per topic (peers.py)
  uvicorn-sansio   a bare ASGI app under uvicorn `ws="websockets-sansio"` doing the same (peers.py)
Layouts: one-job (every socket on one job) and mixed (half on one job, half each on a job of
its own: N/2 distinct topics; for Yardmaster N/2 queued jobs).

Per socket = (server RSS with the sockets open and subscribed - RSS before) / sockets, RSS from
/proc/<pid>/statm, the median of three readings 0.3 s apart after 3 s of quiet (quick: 1.5 s). The sockets are
held by viewers.py processes (a minimal asyncio client, up to --per-proc sockets each), which
answer the servers' pings. This process and its children raise their
open-file limit; the servers inherit it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass

from common import (
    BenchError,
    BenchTimeout,
    Child,
    HttpPool,
    Processes,
    Targets,
    describe,
    free_port,
    header,
    install_deadline,
    num,
    print_table,
    raise_nofile,
    ratio,
    rss_bytes,
    run_main,
    server_env_for_sockets,
    start_server,
)

COMPETITORS = ("yardmaster", "ws-server", "uvicorn-sansio")
LAYOUTS = ("one-job", "mixed")
SUBSCRIBE = '{"type":"subscribe","topic":"{topic}"}'


@dataclass
class Measure:
    name: str
    sockets: int
    layout: str
    rss_before: int
    rss_after: int
    connect_s: float

    @property
    def per_socket(self) -> float:
        return (self.rss_after - self.rss_before) / self.sockets


def settled_rss(pid: int, quiet_s: float) -> int:
    time.sleep(quiet_s)
    samples = []
    for _ in range(3):
        samples.append(rss_bytes(pid))
        time.sleep(0.3)
    return int(statistics.median(samples))


async def submit_jobs(port: int, key: str, n: int) -> list[str]:
    pool = HttpPool(port, key, limit=16)
    ids: list[str] = []
    body = json.dumps({"image": "bench", "command": ["true", "idle"], "timeout_s": 3600}).encode()

    async def sender(count: int) -> None:
        for _ in range(count):
            status, data = await pool.request("POST", "/api/v1/jobs", body)
            if status != 201:
                raise BenchError(f"submit: HTTP {status}: {data[:200]!r}")
            ids.append(json.loads(data)["id"])

    try:
        await asyncio.gather(*(sender(n // 16 + (i < n % 16)) for i in range(16)))
    finally:
        pool.close()
    return ids


def topics_for(layout: str, n: int, job_ids: list[str]) -> list[str]:
    if layout == "one-job":
        return [f"job:{job_ids[0]}"] * n
    half = n // 2
    return [f"job:{job_ids[0]}"] * (n - half) + [f"job:{j}" for j in job_ids[1 : half + 1]]


def measure(procs: Processes, name: str, n: int, layout: str, args: argparse.Namespace) -> Measure:
    distinct = 1 + (n // 2 if layout == "mixed" else 0)
    headers: dict[str, str] = {}
    if name == "yardmaster":
        server = start_server(procs, f"yardmaster-{n}-{layout}", env=server_env_for_sockets(n))
        job_ids = asyncio.run(submit_jobs(server.port, server.admin_key, distinct))
        port, pid = server.port, server.pid
        headers = {"Authorization": f"Bearer {server.admin_key}"}
    else:
        port = free_port()
        peer = procs.helper(f"{name}-{n}-{layout}", "peers.py", {"kind": "websockets" if name == "ws-server" else "uvicorn",
                                                                  "port": port})
        peer.expect(30, "ready")
        pid = peer.pid
        job_ids = [f"bench{i}" for i in range(distinct)]
    before = settled_rss(pid, args.quiet)
    topics = topics_for(layout, n, job_ids)
    per_proc = args.per_proc
    viewers: list[Child] = []
    t0 = time.monotonic()
    for i in range(0, n, per_proc):
        viewers.append(procs.helper(f"{name}-{n}-{layout}-viewers{i // per_proc}", "viewers.py", {
            "port": port, "path": "/ws/client", "headers": headers, "topics": topics[i : i + per_proc],
            "subscribe": SUBSCRIBE, "connect_concurrency": 50, "connect_timeout": 240}))
    for v in viewers:
        ready = v.expect(300, "ready")
        if ready["failed"]:
            raise BenchError(f"{ready['failed']} sockets could not connect and subscribe: {ready['errors']}")
    connect_s = time.monotonic() - t0
    after = settled_rss(pid, args.quiet)
    for v in viewers:
        status = v.request(30, "status", cmd="status")
        if status["closed"]:
            raise BenchError(f"{status['closed']} sockets were closed while idle: {status['close_codes']}")
    return Measure(name, n, layout, before, after, connect_s)


def report(results: list[Measure], failures: list[str]) -> None:
    def peer(m: Measure, name: str) -> Measure | None:
        return next((r for r in results if r.name == name and r.sockets == m.sockets and r.layout == m.layout), None)

    rows = []
    for m in results:
        uv, ws = peer(m, "uvicorn-sansio"), peer(m, "ws-server")
        rows.append([m.name, num(m.sockets), m.layout, f"{m.rss_before / 2**20:.1f}", f"{m.rss_after / 2**20:.1f}",
                     f"{m.per_socket / 1024:.1f}", f"{m.connect_s:.1f}",
                     ratio(m.per_socket, uv.per_socket if uv else None), ratio(m.per_socket, ws.per_socket if ws else None)])
    for f in failures:
        rows.append([f"FAILED: {f[:90]}", *[""] * 8])
    print_table("idle subscribed sockets: server RSS (MiB) before and after, per socket (KiB)",
                ["competitor", "sockets", "layout", "RSS before", "RSS after", "KiB/socket", "connect s",
                 "vs uvicorn-sansio", "vs ws-server"], rows,
                "KiB/socket: (RSS after - RSS before) / sockets; connect s: time to open and subscribe them all.")
    t = Targets()
    for m in results:
        uv = peer(m, "uvicorn-sansio")
        if m.name == "yardmaster" and uv:
            t.at_most(f"idle socket, {m.sockets:,} {m.layout}: yardmaster / uvicorn-sansio", m.per_socket / uv.per_socket,
                      1.1, "x")
    t.print()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2,000 sockets only (about a minute)")
    p.add_argument("--only", action="append", choices=COMPETITORS, help="run only these competitors (repeatable)")
    p.add_argument("--sockets", help="socket counts (default 2000,10000; quick 2000)")
    p.add_argument("--layouts", help="one-job, mixed or both (default both)")
    p.add_argument("--per-proc", type=int, default=5000, help="sockets per viewer process (default 5000)")
    p.add_argument("--timeout", type=float, help="limit for the whole run, s (default 1200; quick 240)")
    p.add_argument("--keep", action="store_true", help="keep the logs of every process")
    args = p.parse_args()
    args.sockets = [int(x) for x in (args.sockets or ("2000" if args.quick else "2000,10000")).split(",")]
    args.layouts = LAYOUTS if args.layouts in (None, "both") else tuple(args.layouts.split(","))
    args.timeout = args.timeout or (240 if args.quick else 1200)
    args.quiet = 1.5 if args.quick else 3.0
    if not (all(10 <= n <= 30_000 for n in args.sockets) and set(args.layouts) <= set(LAYOUTS) and 100 <= args.per_proc <= 20_000):
        p.error("need sockets 10..30000, layouts one-job/mixed, per-proc 100..20000")
    return args


def main() -> int:
    args = parse_args()
    header("idle", args.quick)
    install_deadline(args.timeout)
    nofile = raise_nofile()
    if nofile < max(args.sockets) + 1000:
        raise BenchError(f"the open-file limit is {nofile}; {max(args.sockets) + 1000} are needed (run as root or raise the hard limit)")
    results: list[Measure] = []
    failures: list[str] = []
    names = [c for c in COMPETITORS if not args.only or c in args.only]
    try:
        for n in args.sockets:
            for layout in args.layouts:
                for name in names:
                    with Processes(args.keep) as procs:
                        try:
                            m = measure(procs, name, n, layout, args)
                        except (BenchError, OSError, EOFError, TimeoutError) as exc:
                            print(f"{name} {n} {layout} FAILED: {describe(exc)}", flush=True)
                            failures.append(f"{name} {n} {layout}: {describe(exc)}")
                            if isinstance(exc, BenchTimeout):
                                raise
                            continue
                    results.append(m)
                    print(f"   {name:<15} {n:>6,} {layout:<8} {m.per_socket / 1024:6.1f} KiB/socket "
                          f"(RSS {m.rss_before / 2**20:.0f} -> {m.rss_after / 2**20:.0f} MiB, connected in {m.connect_s:.1f} s)",
                          flush=True)
    except BenchTimeout:
        pass
    report(results, failures)
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main)
