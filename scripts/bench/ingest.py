#!/usr/bin/env python3
"""Ingest: one agent streaming output as fast as it can into a persisting server; MB/s, CPU per MB.

    .venv/bin/python scripts/bench/ingest.py [--quick] [--seconds 10] [--window 16] [--only NAME]

A fake agent process (fakeagent.py) holds one running job and sends 64 KiB log-chunks with
contiguous seq, never more than --window unacked (it waits for log-acks, as the real agent's
bounded buffer makes it), for --seconds. MB/s = bytes acked / (last log-ack - first send),
MB = 10^6 bytes. CPU per MB: the server's utime+stime from /proc (plus redis-server's in Redis
mode) over the same time.

Competitors, each a fresh server:
  yardmaster          `yardmaster server`, embedded (SQLite), default settings (the 16 MiB per-job
                      log cap keeps head and tail, deleting older entries as output arrives)
  yardmaster-nocap    the same with YM_LOG_CAP_BYTES=0 (every chunk kept)
  yardmaster-redis    the same as the first with YM_REDIS_URL (chunks also published on Redis)
  bare-sqlite         peers.py: a bare uvicorn websockets-sansio app that decodes each chunk and
                      does one INSERT + COMMIT into SQLite (WAL, synchronous=NORMAL) before
                      the log-ack: the least work that still persists every chunk
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from common import (
    BenchError,
    BenchTimeout,
    Child,
    CpuMeter,
    Processes,
    Redis,
    Targets,
    describe,
    free_port,
    header,
    install_deadline,
    print_table,
    ratio,
    run_main,
    start_server,
)

COMPETITORS = ("yardmaster", "yardmaster-nocap", "yardmaster-redis", "bare-sqlite")
CHUNK = 64 * 1024


@dataclass
class Result:
    name: str
    chunks: int
    bytes: int
    seconds: float
    cpu: dict[str, float]
    window_waits: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds

    def cpu_ms_per_mb(self, part: str) -> float | None:
        return self.cpu[part] * 1000 / (self.bytes / 1e6) if part in self.cpu else None


def run_competitor(procs: Processes, name: str, args: argparse.Namespace) -> Result:
    redis: Redis | None = None
    if name == "bare-sqlite":
        port = free_port()
        peer = procs.helper("peer-ingest-sqlite", "peers.py", {"kind": "ingest-sqlite", "port": port})
        peer.expect(30, "ready")
        pid, url, token = peer.pid, f"ws://127.0.0.1:{port}", "peer"
    else:
        if name == "yardmaster-redis":
            redis = Redis(procs)
        env = {"YM_LOG_CAP_BYTES": "0"} if name == "yardmaster-nocap" else {}
        server = start_server(procs, name, redis, env)
        token = server.agent_token("bench-agent", capacity=1)
        pid, url = server.pid, f"ws://127.0.0.1:{server.port}"
        server.api("POST", "/api/v1/jobs", {"image": "bench", "command": ["true", "ingest"], "timeout_s": 3600})
    agent: Child = procs.helper(f"{name}-agent", "fakeagent.py", {"url": url, "token": token, "name": "bench-agent",
                                                                 "capacity": 1, "mode": "stream"})
    agent.expect(30, "ready")
    agent.expect(30, "running")
    stream = {"cmd": "stream", "rate": 0, "size": CHUNK, "window": args.window}
    agent.request(60, "streamed", duration=0.5, step=0, **stream)  # warm-up
    meter = CpuMeter.of_pids(server=pid)
    if redis is not None:
        meter.add("redis", redis.cpu_seconds)
    meter.start()
    res = agent.request(args.seconds + 90, "streamed", duration=args.seconds, step=1, **stream)
    cpu = meter.stop()
    if not res["all_acked"]:
        raise BenchError(f"{res['sent']} chunks sent but not all acked within 60 s of the last one")
    return Result(name, res["sent"], res["bytes"], res["t_last_ack"] - res["t_first"], cpu, res["window_waits"])


def report(results: list[Result], failures: list[str], args: argparse.Namespace) -> None:
    peer = next((r for r in results if r.name == "bare-sqlite"), None)
    rows = []
    for r in results:
        srv, red = r.cpu_ms_per_mb("server"), r.cpu_ms_per_mb("redis")
        rows.append([r.name, f"{r.chunks:,}", f"{r.bytes / 1e6:,.0f}", f"{r.seconds:.1f}", f"{r.mb_per_s:.1f}",
                     f"{srv:.1f}" if srv is not None else "-", f"{red:.1f}" if red is not None else "-",
                     ratio(r.mb_per_s, peer.mb_per_s if peer else None)])
    for f in failures:
        rows.append([f"FAILED: {f[:90]}", *[""] * 7])
    print_table(f"ingest: 64 KiB log-chunks, at most {args.window} unacked, {args.seconds:g} s, one agent and one job",
                ["competitor", "chunks", "MB", "s", "MB/s", "CPU ms/MB", "redis ms/MB", "vs bare-sqlite"], rows,
                "CPU ms/MB: the server process's utime+stime per MB acked (bare-sqlite: the peer's); MB = 10^6 bytes.")
    t = Targets()
    ym = next((r for r in results if r.name == "yardmaster"), None)
    t.at_least("ingest, yardmaster (embedded, defaults), MB/s", ym.mb_per_s if ym else None, 50)
    t.print()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 s per competitor")
    p.add_argument("--only", action="append", choices=COMPETITORS, help="run only these competitors (repeatable)")
    p.add_argument("--seconds", type=float, help="streaming time per competitor (default 10; quick 3)")
    p.add_argument("--window", type=int, default=16, help="most unacked chunks (default 16 = 1 MiB)")
    p.add_argument("--timeout", type=float, help="limit for the whole run, s (default 600; quick 180)")
    p.add_argument("--keep", action="store_true", help="keep the logs of every process")
    args = p.parse_args()
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    args.timeout = args.timeout or (180 if args.quick else 600)
    if not (0.5 <= args.seconds <= 300 and 1 <= args.window <= 1024):
        p.error("need seconds 0.5..300, window 1..1024")
    return args


def main() -> int:
    args = parse_args()
    header("ingest", args.quick)
    install_deadline(args.timeout)
    results: list[Result] = []
    failures: list[str] = []
    try:
        for name in (c for c in COMPETITORS if not args.only or c in args.only):
            with Processes(args.keep) as procs:
                try:
                    r = run_competitor(procs, name, args)
                except (BenchError, OSError, EOFError, TimeoutError) as exc:
                    print(f"{name} FAILED: {describe(exc)}", flush=True)
                    failures.append(f"{name}: {describe(exc)}")
                    if isinstance(exc, BenchTimeout):
                        raise
                    continue
            results.append(r)
            print(f"   {name:<17} {r.mb_per_s:7.1f} MB/s  {r.cpu_ms_per_mb('server'):6.1f} CPU ms/MB", flush=True)
    except BenchTimeout:
        pass
    report(results, failures, args)
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main)
