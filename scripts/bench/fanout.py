#!/usr/bin/env python3
"""Fan-out: one job's live log to 1,000 viewers; the highest chunk rate delivered with p99 <= 100 ms.

    .venv/bin/python scripts/bench/fanout.py [--quick] [--viewers 1000] [--rates 1,2,5,...] [--only NAME]

Competitors, one after the other in one run, each fed by a producer at a stepped rate:
  yardmaster       `yardmaster server` (embedded); a fake agent process (fakeagent.py) streams
                   log-chunks of one running job over /ws/agent; the server stores each chunk and
                   sends it to every subscriber of job:<id> as one `log` frame
  ws-broadcast     a minimal `websockets` server (peers.py); its in-process producer calls
                   `websockets.broadcast` with the same `log` frame for the topic's sockets
  uvicorn-sansio   a bare ASGI app under uvicorn `ws="websockets-sansio"` (peers.py); its
                   in-process producer awaits `send` for each subscriber in a loop
The viewers are real sockets in other processes (viewers.py, a minimal client), each subscribed
to the one topic; they answer pings and measure delivery latency = receive time - due time,
from the due time the producer writes into each chunk's text (chunk i of a step is due at
start + i/rate, so a producer held back by the server counts as latency, not as a lower rate).

Chunk rate = log chunks per second the producer sends for the one job; frames/s = chunk rate x
viewers (each chunk is one frame per viewer). Each step runs --step-seconds at one rate; a step
passes when the p99 of every delivery (a frame that never arrives counts as infinitely late) is
<= 100 ms and no viewer was dropped. Rates go up until a step fails, then --refine bisection
steps narrow the limit; the result is the highest passing rate. Chunks are 100 bytes of text,
like a line or two of build output.

CPU µs/frame is the server process's (for Yardmaster also storing the chunk and serving the
agent) utime+stime per frame delivered. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Any

from common import (
    BenchError,
    BenchTimeout,
    Child,
    CpuMeter,
    Hist,
    Processes,
    Targets,
    describe,
    free_port,
    header,
    install_deadline,
    ms,
    num,
    print_table,
    raise_nofile,
    ratio,
    run_main,
    server_env_for_sockets,
    start_server,
)

COMPETITORS = ("yardmaster", "ws-broadcast", "uvicorn-sansio")
P99_LIMIT_S = 0.100
SUBSCRIBE = '{"type":"subscribe","topic":"{topic}"}'


@dataclass
class Step:
    rate: int
    sent: int
    hist: Hist
    expected: int
    closed: int
    cpu_s: float

    @property
    def p99(self) -> float:
        return self.hist.quantile(0.99, self.expected)

    @property
    def passed(self) -> bool:
        return self.p99 <= P99_LIMIT_S and self.closed == 0


@dataclass
class Outcome:
    steps: list[Step] = field(default_factory=list)
    failure: str | None = None

    @property
    def best(self) -> int | None:
        passing = [s.rate for s in self.steps if s.passed]
        return max(passing) if passing else None


@dataclass
class System:
    """What a competitor looks like to the stepping loop: a producer, where viewers connect, whose CPU."""

    producer: Child
    port: int
    pid: int
    topic: str
    headers: dict[str, str]
    stream_args: dict[str, Any]


def start_yardmaster(procs: Processes, args: argparse.Namespace) -> System:
    server = start_server(procs, "yardmaster", env=server_env_for_sockets(args.viewers))
    token = server.agent_token("bench-agent", capacity=1)
    agent = procs.helper("yardmaster-agent", "fakeagent.py", {
        "url": f"ws://127.0.0.1:{server.port}", "token": token, "name": "bench-agent", "capacity": 1, "mode": "stream"})
    agent.expect(30, "ready")
    job = server.api("POST", "/api/v1/jobs", {"image": "bench", "command": ["true", "fanout"], "timeout_s": 604800})
    running = agent.expect(30, "running")
    if running["job_id"] != job["id"]:
        raise BenchError("the agent was given another job than the one submitted")
    return System(agent, server.port, server.pid, f"job:{job['id']}", {"Authorization": f"Bearer {server.admin_key}"},
                  {"window": 1000})


def start_peer(procs: Processes, kind: str) -> System:
    port = free_port()
    peer = procs.helper(f"peer-{kind}", "peers.py", {"kind": kind, "port": port})
    peer.expect(30, "ready")
    return System(peer, port, peer.pid, "job:bench", {}, {"topic": "job:bench"})


def start_viewers(procs: Processes, system: System, args: argparse.Namespace, name: str) -> list[tuple[Child, int]]:
    per = [args.viewers // args.viewer_procs + (i < args.viewers % args.viewer_procs) for i in range(args.viewer_procs)]
    out = []
    for i, n in enumerate(per):
        child = procs.helper(f"{name}-viewers{i}", "viewers.py", {
            "port": system.port, "path": "/ws/client", "headers": system.headers, "topics": [system.topic] * n,
            "subscribe": SUBSCRIBE, "connect_concurrency": 100})
        out.append((child, n))
    for child, n in out:
        ready = child.expect(120, "ready")
        if ready["failed"]:
            raise BenchError(f"{ready['failed']} of {n} viewers could not subscribe: {ready['errors']}")
    return out


def run_competitor(procs: Processes, name: str, args: argparse.Namespace) -> Outcome:
    system = start_yardmaster(procs, args) if name == "yardmaster" else start_peer(
        procs, "websockets" if name == "ws-broadcast" else "uvicorn")
    viewers = start_viewers(procs, system, args, name)
    out = Outcome()

    def run(step_no: int, rate: int) -> Step:
        s = measure_step(system, viewers, name, step_no, rate, args)
        out.steps.append(s)
        return s

    try:
        step_no = 0
        passed, failed = 0, None
        for rate in args.rates:
            step_no += 1
            if not run(step_no, rate).passed:
                failed = rate
                break
            passed = rate
        # Bisect between the last passing and the first failing rate.
        for _ in range(args.refine if failed else 0):
            mid = round(math.sqrt(max(passed, 1) * failed)) if passed else failed // 2
            if mid <= passed or mid >= failed:
                break
            step_no += 1
            if run(step_no, mid).passed:
                passed = mid
            else:
                failed = mid
    finally:
        for child, _ in viewers:
            procs.stop(child)
        procs.stop(system.producer)
    out.steps.sort(key=lambda s: s.rate)
    return out


def measure_step(system: System, viewers: list[tuple[Child, int]], name: str, step: int, rate: int,
                 args: argparse.Namespace) -> Step:
    meter = CpuMeter.of_pids(server=system.pid).start()
    streamed = system.producer.request(args.step_seconds + 90, "streamed", cmd="stream", rate=rate,
                                       duration=args.step_seconds, size=args.size, step=step, **system.stream_args)
    sent = streamed["sent"]
    due = int(rate * args.step_seconds)  # what the producer should have sent; the rest counts as lost
    for child, n in viewers:
        child.send(cmd="report", step=step, expected=due * n, wait=args.drain_seconds)
    hist, closed = Hist(), 0
    for child, _ in viewers:
        rep = child.expect(args.drain_seconds + 30, "report")
        hist.merge(Hist.from_json(rep["hist"]))
        closed += rep["closed"]
    cpu = meter.stop()["server"]
    s = Step(rate, sent, hist, due * args.viewers, closed, cpu)
    print(f"   {name:<15} {rate:>5} chunks/s ({rate * args.viewers:>7,} frames/s): p50 {ms(hist.quantile(0.5, s.expected))} "
          f"p99 {ms(s.p99)} ms, {hist.n:,}/{s.expected:,} delivered, {closed} dropped -> "
          f"{'pass' if s.passed else 'FAIL'}", flush=True)
    return s


def report(outcomes: dict[str, Outcome], args: argparse.Namespace) -> None:
    rows = []
    for name, o in outcomes.items():
        if o.failure:
            rows.append([name, "FAILED: " + o.failure.splitlines()[0][:80], *[""] * 8])
        for s in o.steps:
            frames = s.hist.n
            rows.append([name, num(s.rate), num(s.rate * args.viewers), f"{frames / max(s.expected, 1) * 100:.1f}%",
                         ms(s.hist.quantile(0.5, s.expected)), ms(s.p99), ms(s.hist.quantile(0.999, s.expected)),
                         str(s.closed), f"{s.cpu_s / max(frames, 1) * 1e6:.1f}", "pass" if s.passed else "FAIL"])
    print_table(f"fan-out steps: {args.viewers:,} viewers of one job, {args.step_seconds:g} s per step, {args.size}-byte chunks; "
                "delivery latency ms",
                ["competitor", "chunks/s", "frames/s", "delivered", "p50", "p99", "p99.9", "dropped", "CPU µs/frame", ""],
                rows, "a frame never delivered counts as infinitely late; dropped: viewer sockets closed by the server "
                      "(e.g. 4008 too slow)")
    base = outcomes.get("ws-broadcast")
    base_best = base.best if base else None
    rows = []
    for name, o in outcomes.items():
        best = o.best
        top = min((s.rate for s in o.steps if not s.passed and s.rate > (best or 0)), default=None)
        rows.append([name, num(best) if best else "none", num(best * args.viewers) if best else "-",
                     f"failed at {num(top)}" if top else ("all steps passed" if o.steps else "-"),
                     ratio(best, base_best)])
    print_table("fan-out result: highest chunk rate with delivery p99 <= 100 ms",
                ["competitor", "chunks/s", "frames/s", "next step", "vs ws-broadcast"], rows,
                "the true limit lies between the best rate and the next step.")
    t = Targets()
    ym = outcomes.get("yardmaster")
    t.at_least("fan-out rate / websockets.broadcast's", (ym.best or 0) / base_best if ym and base_best else None, 0.7, "x")
    t.print()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="coarser steps, shorter steps (about a minute)")
    p.add_argument("--only", action="append", choices=COMPETITORS, help="run only these competitors (repeatable)")
    p.add_argument("--viewers", type=int, default=1000, help="viewer sockets (default 1000)")
    p.add_argument("--viewer-procs", type=int, default=2, help="processes holding the viewers (default 2)")
    p.add_argument("--rates", help="chunk rates to step through (default 1,2,5,10,20,40,60,100,150,200; "
                                   "quick 2,10,30,100,200)")
    p.add_argument("--refine", type=int, help="bisection steps between the last pass and the first failure "
                                              "(default 3; quick 2)")
    p.add_argument("--step-seconds", type=float, help="seconds per step (default 5; quick 1.5)")
    p.add_argument("--size", type=int, default=100, help="bytes of text per chunk (default 100)")
    p.add_argument("--timeout", type=float, help="limit for the whole run, s (default 900; quick 240)")
    p.add_argument("--keep", action="store_true", help="keep the logs of every process")
    args = p.parse_args()
    q = args.quick
    default_rates = "2,10,30,100,200" if q else "1,2,5,10,20,40,60,100,150,200"
    args.rates = sorted({int(r) for r in (args.rates or default_rates).split(",")})
    args.step_seconds = args.step_seconds or (1.5 if q else 5.0)
    args.refine = 2 if q and args.refine is None else (3 if args.refine is None else args.refine)
    args.drain_seconds = 5.0
    args.timeout = args.timeout or (240 if q else 900)
    if not (1 <= args.viewers <= 20_000 and 1 <= args.viewer_procs <= 16 and 40 <= args.size <= 60_000
            and all(1 <= r <= 10_000 for r in args.rates) and 0.5 <= args.step_seconds <= 60):
        p.error("need viewers 1..20000, viewer-procs 1..16, size 40..60000, rates 1..10000, step-seconds 0.5..60")
    return args


def main() -> int:
    args = parse_args()
    header("fanout", args.quick)
    install_deadline(args.timeout)
    raise_nofile()
    outcomes: dict[str, Outcome] = {}
    failed = 0
    for name in (c for c in COMPETITORS if not args.only or c in args.only):
        print(f"-- {name}", flush=True)
        with Processes(args.keep) as procs:
            try:
                outcomes[name] = run_competitor(procs, name, args)
            except (BenchError, OSError, EOFError, TimeoutError) as exc:
                print(f"{name} FAILED: {describe(exc)}", flush=True)
                outcomes[name] = Outcome(failure=describe(exc))
                failed += 1
                if isinstance(exc, BenchTimeout):
                    break
    report(outcomes, args)
    if failed:
        print(f"\n{failed} competitor(s) failed to run; see FAILED above.")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
