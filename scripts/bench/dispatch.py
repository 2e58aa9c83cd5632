#!/usr/bin/env python3
"""Dispatch: submit -> job-assign -> result, Yardmaster (embedded and Redis mode) beside arq.

    .venv/bin/python scripts/bench/dispatch.py [--quick] [--only NAME ...] [--burst N] [--rates 50,200,1000]

Competitors, one after the other in one run, on one redis-server this script starts:
  ym-embedded   `yardmaster server` (SQLite + in-process broker) and a fake agent process speaking
                the real protocol (fakeagent.py: job-assign -> job-accept + result at once)
  ym-redis      the same with YM_REDIS_URL (SQLite + Redis broker)
  arq-default   arq 0.28 worker, default settings (poll_delay 0.5 s, max_jobs 10), a no-op job
  arq-tuned     the same with poll_delay 0.01 s, max_jobs 200
arq runs from its own virtual environment, .bench-venv/arq, made on first use (pip install arq).

Measured for each:
  burst      N jobs submitted from 32 concurrent connections (arq: 32 concurrent enqueue_job
             tasks), timed from the first submit to the last result-ack (arq: the last
             after_job_end, i.e. result stored); jobs/s = N / that time.
  open loop  at 50, 200 and 1,000 jobs/s: job i is due at t0 + i/rate and goes out at its due
             time whatever happened to earlier ones; latency = due time -> the agent holds the
             job-assign (arq: the job function starts). p50/p99/p99.9, and whether a backlog
             built up.
  submit     the HTTP submit path alone (no agent): submits/s with 1, 16 and 64 concurrent
             keep-alive connections; and a batch submit (a JSON list of specs) when the server
             takes one.
  fair share (Yardmaster only) the burst again, its submits spread over 4 users (8 connections
             each, so their jobs interleave in the queue), on servers with YM_FAIR_SHARE=true and
             =false in alternating order, rounds of each (quick 1, full 3); the ratio of the
             median jobs/s is fair share's cost (issue 9: under 10 %).
CPU per job is the server's utime+stime from /proc (arq: the worker's) plus redis-server's
(INFO used_cpu_*), over the measured phase. Servers run with common.BENCH_LIMITS: quotas off, rate
limits on but out of reach (their cost is in every figure).

Load generators (this process, the fake agent, arq's producer) share the 2 cores with the
system under test, as they do for every competitor. No target decides the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from common import (
    REPO,
    BenchError,
    BenchTimeout,
    Child,
    CpuMeter,
    Hist,
    HttpPool,
    Processes,
    Redis,
    Server,
    Targets,
    describe,
    header,
    http_once,
    install_deadline,
    ms,
    num,
    print_table,
    raise_nofile,
    ratio,
    run_main,
    start_server,
)

ARQ_VENV = REPO / ".bench-venv" / "arq"
ARQ_REQUIREMENT = "arq==0.28.*"
YM = ("ym-embedded", "ym-redis")
ARQ = {"arq-default": {"max_jobs": 10, "poll_delay": 0.5}, "arq-tuned": {"max_jobs": 200, "poll_delay": 0.01}}
COMPETITORS = (*YM, *ARQ)
BURST_CONCURRENCY = 32
SPEC = {"image": "bench", "timeout_s": 3600}
AB_USERS = 4  # the fair-share A/B's submitters: each its own fair-share group
AB_PASSWORD = "bench-password-0123"


# ---- results ----------------------------------------------------------------------------------


@dataclass
class Burst:
    n: int
    submit_s: float
    complete_s: float
    cpu: dict[str, float]
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.n / self.complete_s


@dataclass
class OpenLoop:
    rate: int
    sent: int
    hist: Hist
    missing: int
    lag_end: int  # due by the last due time but not assigned by then
    drain_s: float  # last assignment - last due time
    queue_depth: float | None
    late_p99: float  # how late the sender itself was (its own saturation)
    submit_hist: Hist | None
    cpu: dict[str, float]
    behind_first: float  # mean lag (jobs due, not yet assigned) / rate over each half of the run, s
    behind_second: float
    errors: int = 0

    @property
    def backlog_grew(self) -> bool:
        """A lag that climbs from the first half of the run to the second means the queue grows;
        a steady one (arq's poll delay) does not."""
        return self.missing > 0 or self.behind_second > 1.5 * self.behind_first + 0.05


@dataclass
class ShareAB:
    """The fair-share A/B of one mode: the burst of each round, with and without fair share."""

    mode: str
    fair: list[Burst] = field(default_factory=list)
    fifo: list[Burst] = field(default_factory=list)
    failure: str | None = None

    @staticmethod
    def median_rate(bursts: list[Burst]) -> float | None:
        return statistics.median(b.rate for b in bursts) if bursts else None

    @property
    def ratio(self) -> float | None:
        fair, fifo = self.median_rate(self.fair), self.median_rate(self.fifo)
        return fair / fifo if fair and fifo else None


@dataclass
class Outcome:
    burst: Burst | None = None
    batch_burst: Burst | None = None
    open: list[OpenLoop] = field(default_factory=list)
    failure: str | None = None


# ---- arq's virtual environment ------------------------------------------------------------------


def arq_python() -> str:
    python = ARQ_VENV / "bin" / "python"
    probe = [str(python), "-c", "import arq.version; print(arq.version.VERSION)"]
    if python.exists() and subprocess.run(probe, capture_output=True, timeout=60).returncode == 0:
        return str(python)
    print(f"setting up {ARQ_VENV.relative_to(REPO)} ({ARQ_REQUIREMENT}) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(ARQ_VENV)], check=True, timeout=120,
                       capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", ARQ_REQUIREMENT],
                       check=True, timeout=300, capture_output=True)
        subprocess.run(probe, check=True, timeout=60, capture_output=True)
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"could not install {ARQ_REQUIREMENT} into {ARQ_VENV}: "
                         f"{(exc.stderr or b'').decode(errors='replace')[-500:]}") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"installing {ARQ_REQUIREMENT} into {ARQ_VENV} timed out") from None
    return str(python)


# ---- shared measuring steps (the fake agent and arq's worker answer the same commands) -------------


async def wait_done(worker: Child, key: str, target: int, timeout: float) -> dict[str, Any]:
    """Poll the agent/worker until `key` (assigned or done) reaches target."""
    deadline = time.monotonic() + timeout
    while True:
        count = await worker.arequest(30, "count", cmd="count")
        if count[key] >= target:
            return count
        if time.monotonic() > deadline:
            raise BenchError(f"{worker.name}: only {count[key]} of {target} jobs {key} after {timeout:.0f} s")
        await asyncio.sleep(0.05)


def summarize_open(rate: int, sched: dict[str, float], assigns: dict[str, float], t_end: float,
                   queue_depth: float | None, late_p99: float, submit_hist: Hist | None, cpu: dict[str, float],
                   errors: int) -> OpenLoop:
    hist = Hist()
    got = {k: assigns[k] for k in sched if k in assigns}
    for key, t in got.items():
        hist.add(t - sched[key])
    dues, done = sorted(sched.values()), sorted(got.values())
    t0 = dues[0]

    def lag(t: float) -> int:
        return bisect.bisect_right(dues, t) - bisect.bisect_right(done, t)

    def behind(a: float, b: float) -> float:
        return statistics.fmean(lag(a + (b - a) * (k + 0.5) / 200) for k in range(200)) / rate

    mid = (t0 + t_end) / 2
    last = max(done, default=t_end)
    return OpenLoop(rate, len(sched), hist, len(sched) - hist.n, lag(t_end), max(0.0, last - t_end), queue_depth,
                    late_p99, submit_hist, cpu, behind(t0, mid), behind(mid, t_end), errors)


# ---- Yardmaster ---------------------------------------------------------------------------------


def spec_body(key: str) -> bytes:
    return json.dumps({**SPEC, "command": ["true", key]}).encode()


async def submit_n(pool: HttpPool, tag: str, n: int, concurrency: int) -> int:
    """n single submits from `concurrency` connections; returns the number refused."""
    keys = iter(range(n))
    errors = 0

    async def sender() -> None:
        nonlocal errors
        for i in keys:
            status, _ = await pool.request("POST", "/api/v1/jobs", spec_body(f"{tag}-{i}"))
            errors += status != 201

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return errors


async def submit_batches(pool: HttpPool, tag: str, n: int, batch: int, concurrency: int) -> int:
    starts = iter(range(0, n, batch))
    errors = 0

    async def sender() -> None:
        nonlocal errors
        for s in starts:
            body = json.dumps([{**SPEC, "command": ["true", f"{tag}-{i}"]} for i in range(s, min(n, s + batch))]).encode()
            status, _ = await pool.request("POST", "/api/v1/jobs", body, timeout=120)
            errors += 0 if status < 300 else min(batch, n - s)

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return errors


async def batch_supported(server: Server, pool: HttpPool) -> bool:
    body = json.dumps([{**SPEC, "command": ["true", "probe-0"]}, {**SPEC, "command": ["true", "probe-1"]}]).encode()
    status, data = await pool.request("POST", "/api/v1/jobs", body)
    if status in (400, 422):
        return False
    if status >= 300:
        raise BenchError(f"batch submit probe: HTTP {status}: {data[:200]!r}")
    return True


def ym_cpu(server: Server, redis: Redis | None) -> CpuMeter:
    meter = CpuMeter.of_pids(server=server.pid)
    if redis is not None:
        meter.add("redis", redis.cpu_seconds)
    return meter


async def ym_dispatch(procs: Processes, mode: str, redis: Redis, args: argparse.Namespace) -> Outcome:
    use_redis = redis if mode == "ym-redis" else None
    redis.flush()
    server = start_server(procs, mode, use_redis)
    out = Outcome()
    token = server.agent_token("bench-agent", capacity=1024)
    agent = procs.helper(f"{mode}-agent", "fakeagent.py", {
        "url": f"ws://127.0.0.1:{server.port}", "token": token, "name": "bench-agent", "capacity": 1024, "mode": "dispatch"})
    agent.expect(30, "ready")
    pool = HttpPool(server.port, server.admin_key)
    try:
        await submit_n(pool, "warm", 100, 8)
        await wait_done(agent, "done", 100, 30)
        await agent.arequest(10, "reset", cmd="reset")

        meter = ym_cpu(server, use_redis).start()
        t0 = time.monotonic()
        errors = await submit_n(pool, "burst", args.burst, BURST_CONCURRENCY)
        t_sub = time.monotonic()
        done = await wait_done(agent, "done", args.burst - errors, 60 + args.burst / 50)
        out.burst = Burst(args.burst, t_sub - t0, done["last_done"] - t0, meter.stop(), errors)
        await agent.arequest(10, "reset", cmd="reset")

        if await batch_supported(server, pool):
            await wait_done(agent, "done", 2, 30)
            await agent.arequest(10, "reset", cmd="reset")
            meter.start()
            t0 = time.monotonic()
            errors = await submit_batches(pool, "bburst", args.burst, 1000, 2)
            t_sub = time.monotonic()
            done = await wait_done(agent, "done", args.burst - errors, 60 + args.burst / 50)
            out.batch_burst = Burst(args.burst, t_sub - t0, done["last_done"] - t0, meter.stop(), errors)
            await agent.arequest(10, "reset", cmd="reset")

        for rate in args.rates:
            await asyncio.sleep(0.3)
            out.open.append(await ym_open_loop(server, use_redis, agent, pool, rate, args.duration))
            await agent.arequest(10, "reset", cmd="reset")
    finally:
        pool.close()
        procs.stop(agent)
        procs.stop(server.child)
    return out


async def ym_open_loop(server: Server, redis: Redis | None, agent: Child, pool: HttpPool, rate: int,
                       duration: float) -> OpenLoop:
    total = max(1, int(rate * duration))
    sched: dict[str, float] = {}
    late = Hist()
    submit_hist = Hist()
    errors = 0

    async def send(key: str, due: float) -> None:
        nonlocal errors
        start = time.monotonic()
        late.add(start - due)
        status, _ = await pool.request("POST", "/api/v1/jobs", spec_body(key))
        submit_hist.add(time.monotonic() - start)
        errors += status != 201

    meter = ym_cpu(server, redis).start()
    tasks = []
    t0 = time.monotonic() + 0.05
    for i in range(total):
        due = t0 + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        key = f"r{rate}-{i}"
        sched[key] = due
        tasks.append(asyncio.create_task(send(key, due)))
    t_end = t0 + (total - 1) / rate
    depth = await asyncio.to_thread(server.metric, "yardmaster_queue_depth")
    await asyncio.gather(*tasks)
    try:
        await wait_done(agent, "assigned", total - errors, 30 + total / 50)
    except BenchError:
        pass  # reported as missing
    cpu = meter.stop()
    report = await agent.arequest(30, "report", cmd="report")
    return summarize_open(rate, sched, report["assigns"], t_end, depth, late.quantile(0.99), submit_hist, cpu, errors)


async def ym_submit_path(procs: Processes, mode: str, redis: Redis, args: argparse.Namespace) -> list[list[str]]:
    """Submits/s on a server without agents (the jobs stay queued), a fresh server per level."""
    use_redis = redis if mode == "ym-redis" else None
    rows: list[list[str]] = []
    for conc in args.submit_concurrency:
        redis.flush()
        server = start_server(procs, f"{mode}-submit-c{conc}", use_redis)
        pool = HttpPool(server.port, server.admin_key, limit=conc)
        try:
            await submit_n(pool, "warm", 50, min(conc, 8))
            lat = Hist()
            count = errors = 0
            meter = ym_cpu(server, use_redis).start()
            t0 = time.monotonic()
            end = t0 + args.submit_seconds

            async def sender() -> None:
                nonlocal count, errors
                while time.monotonic() < end:
                    start = time.monotonic()
                    status, _ = await pool.request("POST", "/api/v1/jobs", spec_body(f"s-{count}"))
                    lat.add(time.monotonic() - start)
                    count += 1
                    errors += status != 201

            await asyncio.gather(*(sender() for _ in range(conc)))
            elapsed = time.monotonic() - t0
            cpu = meter.stop()
            rows.append([mode, f"single, {conc} conn", num(count / elapsed), ms(lat.quantile(0.5)), ms(lat.quantile(0.99)),
                         f"{sum(cpu.values()) / max(count, 1) * 1000:.2f}", str(errors)])
            if conc == args.submit_concurrency[-1]:
                rows.append(await ym_batch_row(mode, server, use_redis, pool, args))
        finally:
            pool.close()
            procs.stop(server.child)
    return rows


async def ym_batch_row(mode: str, server: Server, redis: Redis | None, pool: HttpPool, args: argparse.Namespace) -> list[str]:
    if not await batch_supported(server, pool):
        print("batch submit: not supported by this server", flush=True)
        return [mode, "batch of 1,000", "not supported", "", "", "", ""]
    lat = Hist()
    count = errors = 0
    meter = ym_cpu(server, redis).start()
    t0 = time.monotonic()
    end = t0 + args.submit_seconds

    async def sender() -> None:
        nonlocal count, errors
        while time.monotonic() < end:
            start = time.monotonic()
            body = json.dumps([{**SPEC, "command": ["true", f"b-{count}-{i}"]} for i in range(1000)]).encode()
            status, _ = await pool.request("POST", "/api/v1/jobs", body, timeout=120)
            lat.add(time.monotonic() - start)
            count += 1000
            errors += 0 if status < 300 else 1000

    await asyncio.gather(*(sender() for _ in range(2)))
    elapsed = time.monotonic() - t0
    cpu = meter.stop()
    return [mode, "batch of 1,000, 2 conn", num(count / elapsed), ms(lat.quantile(0.5)), ms(lat.quantile(0.99)),
            f"{sum(cpu.values()) / max(count, 1) * 1000:.3f}", str(errors)]


# ---- fair share A/B ------------------------------------------------------------------------------


def user_keys(server: Server, n: int) -> list[str]:
    """API keys of `n` new users (each signs in once and makes its own key)."""
    keys = []
    for i in range(n):
        name = f"bench-user-{i}"
        server.api("POST", "/api/v1/users", {"username": name, "password": AB_PASSWORD})
        status, data = http_once(server.port, "POST", "/api/v1/auth/login", None, {"username": name, "password": AB_PASSWORD})
        if status != 200:
            raise BenchError(f"sign-in of {name}: HTTP {status}: {data[:200]!r}")
        token = json.loads(data)["access_token"]
        status, data = http_once(server.port, "POST", "/api/v1/keys", token, {"name": "bench"})
        if status != 201:
            raise BenchError(f"key of {name}: HTTP {status}: {data[:200]!r}")
        keys.append(json.loads(data)["key"])
    return keys


async def share_burst(procs: Processes, mode: str, redis: Redis, fair: bool, round_no: int, args: argparse.Namespace) -> Burst:
    """One burst of `args.burst` jobs from AB_USERS users at once, on a fresh server."""
    use_redis = redis if mode == "ym-redis" else None
    redis.flush()
    variant = "fair" if fair else "fifo"
    server = start_server(procs, f"{mode}-{variant}-{round_no}", use_redis, env={"YM_FAIR_SHARE": str(fair).lower()})
    token = server.agent_token("bench-agent", capacity=1024)
    agent = procs.helper(f"{mode}-{variant}-{round_no}-agent", "fakeagent.py", {
        "url": f"ws://127.0.0.1:{server.port}", "token": token, "name": "bench-agent", "capacity": 1024, "mode": "dispatch"})
    pools: list[HttpPool] = []
    try:
        agent.expect(30, "ready")
        pools = [HttpPool(server.port, key) for key in user_keys(server, AB_USERS)]
        per_user = max(1, args.burst // AB_USERS)
        await asyncio.gather(*(submit_n(pool, f"warm{u}", 25, 2) for u, pool in enumerate(pools)))
        await wait_done(agent, "done", 25 * AB_USERS, 30)
        await agent.arequest(10, "reset", cmd="reset")
        meter = ym_cpu(server, use_redis).start()
        t0 = time.monotonic()
        errors = sum(await asyncio.gather(*(submit_n(pool, f"burst{u}", per_user, BURST_CONCURRENCY // AB_USERS)
                                            for u, pool in enumerate(pools))))
        t_sub = time.monotonic()
        n = per_user * AB_USERS
        done = await wait_done(agent, "done", n - errors, 60 + n / 50)
        return Burst(n, t_sub - t0, done["last_done"] - t0, meter.stop(), errors)
    finally:
        for pool in pools:
            pool.close()
        procs.stop(agent)
        procs.stop(server.child)


async def fair_share_ab(procs: Processes, mode: str, redis: Redis, args: argparse.Namespace) -> ShareAB:
    ab = ShareAB(mode)
    for round_no in range(args.ab_rounds):
        # Alternating which goes first, so that a machine warming up or slowing down favours neither.
        for fair in (True, False) if round_no % 2 == 0 else (False, True):
            burst = await share_burst(procs, mode, redis, fair, round_no, args)
            (ab.fair if fair else ab.fifo).append(burst)
    return ab


# ---- arq ----------------------------------------------------------------------------------------


async def arq_dispatch(procs: Processes, name: str, redis: Redis, python: str, args: argparse.Namespace) -> Outcome:
    redis.flush()
    out = Outcome()
    worker = procs.helper(f"{name}-worker", "arq_side.py", {"role": "worker", "port": redis.port, **ARQ[name]}, python=python)
    worker.expect(30, "ready")
    producer = procs.helper(f"{name}-producer", "arq_side.py", {"role": "producer", "port": redis.port}, python=python)
    producer.expect(30, "ready")
    try:
        await producer.arequest(60, "burst", cmd="burst", n=100, concurrency=8, tag="warm")
        await wait_done(worker, "done", 100, 30)
        await worker.arequest(10, "reset", cmd="reset")

        meter = CpuMeter.of_pids(server=worker.pid).add("redis", redis.cpu_seconds).start()
        res = await producer.arequest(60 + args.burst / 50, "burst", cmd="burst", n=args.burst,
                                      concurrency=BURST_CONCURRENCY, tag="burst")
        done = await wait_done(worker, "done", args.burst, 60 + args.burst / 50)
        out.burst = Burst(args.burst, res["t_end"] - res["t0"], done["last_done"] - res["t0"], meter.stop())
        await worker.arequest(10, "reset", cmd="reset")

        for rate in args.rates:
            await asyncio.sleep(0.3)
            total = max(1, int(rate * args.duration))
            meter.start()
            res = await producer.arequest(60 + args.duration * 2, "open", cmd="open", rate=rate, duration=args.duration,
                                          tag=f"r{rate}")
            try:
                await wait_done(worker, "assigned", total, 30 + total / 50)
            except BenchError:
                pass  # reported as missing
            cpu = meter.stop()
            report = await worker.arequest(30, "report", cmd="report")
            out.open.append(summarize_open(rate, res["sched"], report["assigns"], res["t_end"], res["queue_depth"],
                                           res["late_p99"], None, cpu, 0))
            await wait_done(worker, "done", total, 30)
            await worker.arequest(10, "reset", cmd="reset")
    finally:
        procs.stop(producer)
        procs.stop(worker)
    return out


# ---- report -------------------------------------------------------------------------------------


def cpu_ms(cpu: dict[str, float], jobs: int) -> tuple[str, str]:
    per = 1000 / max(jobs, 1)
    return f"{cpu.get('server', 0) * per:.2f}", (f"{cpu['redis'] * per:.2f}" if "redis" in cpu else "-")


def report_share(shares: list[ShareAB], args: argparse.Namespace, t: Targets) -> None:
    rows = []
    for ab in shares:
        if ab.failure:
            rows.append([ab.mode, "FAILED: " + ab.failure.splitlines()[0][:70], "", "", "", ""])
        for variant, bursts in (("fair share", ab.fair), ("FIFO", ab.fifo)):
            if not bursts:
                continue
            cpu = statistics.median(sum(b.cpu.values()) * 1000 / max(b.n, 1) for b in bursts)
            rows.append([ab.mode, variant, " ".join(num(b.rate) for b in bursts), num(ab.median_rate(bursts)),
                         f"{cpu:.2f}", str(sum(b.errors for b in bursts))])
        rows.append([ab.mode, "fair share / FIFO", "", f"{ab.ratio:.3f}" if ab.ratio else "n/a", "", ""])
        t.at_least(f"{ab.mode} burst with fair share / FIFO (issue 9)", ab.ratio, 0.9, "x")
    print_table(f"fair share A/B: burst of {args.burst:,} jobs from {AB_USERS} users x {BURST_CONCURRENCY // AB_USERS} "
                f"connections, YM_FAIR_SHARE=true vs false, {args.ab_rounds} round(s) each",
                ["mode", "queue", "jobs/s per round", "median jobs/s", "CPU ms/job", "refused"], rows,
                "CPU ms/job: server + redis-server (Redis mode), median over the rounds. Goal (issue 9): fair share "
                "costs under 10 % of throughput (ratio >= 0.90).")


def report(outcomes: dict[str, Outcome], submit_rows: list[list[str]], args: argparse.Namespace,
           shares: list[ShareAB] | None = None) -> None:
    def burst_rate(name: str) -> float | None:
        o = outcomes.get(name)
        return o.burst.rate if o and o.burst else None

    rows = []
    for name, o in outcomes.items():
        for label, b in ((name, o.burst), (f"{name} (batch submit)", o.batch_burst)):
            if b is None:
                if o.failure and label == name:
                    rows.append([name, "FAILED: " + o.failure.splitlines()[0][:70], *[""] * 7])
                continue
            server_ms, redis_ms = cpu_ms(b.cpu, b.n)
            rows.append([label, num(b.n), num(b.n / b.submit_s), f"{b.complete_s:.2f}", num(b.rate), server_ms, redis_ms,
                         ratio(b.rate, burst_rate("arq-tuned")), ratio(b.rate, burst_rate("arq-default"))])
    print_table(f"burst: {args.burst:,} jobs from {BURST_CONCURRENCY} concurrent submitters, first submit -> last result stored",
                ["competitor", "jobs", "submit/s", "done in s", "jobs/s", "CPU ms/job", "redis ms/job", "vs arq-tuned",
                 "vs arq-default"], rows,
                "CPU ms/job: the server's (arq: the worker's) utime+stime per job; redis ms/job: redis-server's.")

    rows = []
    for name, o in outcomes.items():
        for r in o.open:
            server_ms, redis_ms = cpu_ms(r.cpu, r.sent)
            sub = r.submit_hist
            rows.append([name, num(r.rate), num(r.sent), ms(r.hist.quantile(0.5, r.sent)), ms(r.hist.quantile(0.99, r.sent)),
                         ms(r.hist.quantile(0.999, r.sent)), ms(r.hist.quantile(1.0, r.sent)),
                         ms(sub.quantile(0.99)) if sub else "-", ms(r.late_p99), str(r.lag_end), f"{r.drain_s:.2f}",
                         num(r.queue_depth) if r.queue_depth is not None else "n/a",
                         f"{r.behind_first:.2f}/{r.behind_second:.2f}", "YES" if r.backlog_grew else "no",
                         server_ms, redis_ms, str(r.errors)])
    print_table(f"open loop: {args.duration:g} s at each rate; latency from a job's due time to its job-assign at the agent "
                "(arq: the job starts), ms",
                ["competitor", "jobs/s", "jobs", "p50", "p99", "p99.9", "max", "HTTP p99", "sender late", "lag at end",
                 "drain s", "queue at end", "behind s 1st/2nd half", "backlog", "CPU ms/job", "redis ms/job", "refused"], rows,
                "lag at end: jobs due by the last due time but not yet assigned then; drain s: last assignment - last due "
                "time;\nqueue at end: the queue depth then (yardmaster_queue_depth; arq: ZCARD arq:queue); behind s: the mean lag "
                "over each half of the run / rate;\nbacklog YES when the lag climbs (2nd half > 1.5 x 1st half + 50 ms) or "
                "a job never arrived; sender late: p99 of how late the sender itself sent "
                "(a busy sender inflates every latency);\nrefused: submits answered with an error (those jobs count as never "
                "arrived).")

    print_table(f"submit path: POST /api/v1/jobs, no agent connected, {args.submit_seconds:g} s per row, fresh server per row",
                ["mode", "how", "jobs/s", "HTTP p50 ms", "HTTP p99 ms", "CPU ms/job", "errors"], submit_rows,
                "CPU ms/job: server + redis-server (Redis mode).")

    t = Targets()
    for name, goal in (("ym-embedded", 1.5), ("ym-redis", 1.2)):
        a, b = burst_rate(name), burst_rate("arq-tuned")
        t.at_least(f"burst {name} / arq-tuned", a / b if a and b else None, goal, "x")
        o = outcomes.get(name)
        if o and o.batch_burst and b:
            t.at_least(f"burst {name} (batch submit) / arq-tuned", o.batch_burst.rate / b, goal, "x")
    single = [float(r[2].replace(",", "")) for r in submit_rows if r[1].startswith("single") and r[2][0].isdigit()]
    t.at_least("single submit (best row), jobs/s", max(single) if single else None, 2000)
    for name in YM:
        o = outcomes.get(name)
        r200 = next((r for r in o.open if r.rate == 200), None) if o else None
        r1000 = next((r for r in o.open if r.rate == 1000), None) if o else None
        if r200:
            t.at_most(f"{name} open loop 200/s p50, ms", r200.hist.quantile(0.5, r200.sent) * 1000, 2)
            t.at_most(f"{name} open loop 200/s p99, ms", r200.hist.quantile(0.99, r200.sent) * 1000, 10)
        if r1000:
            t.check(f"{name} open loop 1,000/s: no backlog", not r1000.backlog_grew,
                    f"behind {r1000.behind_first:.2f} s -> {r1000.behind_second:.2f} s, lag at end {r1000.lag_end}, "
                    f"queue at end {num(r1000.queue_depth) if r1000.queue_depth is not None else 'n/a'}")
    if shares:
        report_share(shares, args, t)
    t.print()


# ---- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller run (under a minute once arq is installed)")
    p.add_argument("--only", action="append", choices=COMPETITORS, help="run only these competitors (repeatable)")
    p.add_argument("--burst", type=int, help="jobs in the burst (default 5000; quick 1000)")
    p.add_argument("--rates", help="open-loop rates, jobs/s (default 50,200,1000)")
    p.add_argument("--duration", type=float, help="seconds at each open-loop rate (default 10; quick 1.5)")
    p.add_argument("--no-submit-path", action="store_true", help="skip the submit-path rows")
    p.add_argument("--no-fair-share", action="store_true", help="skip the fair-share A/B")
    p.add_argument("--ab-rounds", type=int, help="rounds of the fair-share A/B (default 3; quick 1)")
    p.add_argument("--timeout", type=float, help="limit for the whole run, s (default 900; quick 240)")
    p.add_argument("--keep", action="store_true", help="keep the logs of every process")
    args = p.parse_args()
    q = args.quick
    args.burst = args.burst or (1000 if q else 5000)
    args.rates = [int(r) for r in (args.rates or "50,200,1000").split(",")]
    args.duration = args.duration or (1.5 if q else 10.0)
    args.submit_concurrency = [16] if q else [1, 16, 64]
    args.submit_seconds = 1.5 if q else 5.0
    args.timeout = args.timeout or (240 if q else 900)
    args.ab_rounds = args.ab_rounds or (1 if q else 3)
    if not (1 <= args.burst <= 100_000 and all(1 <= r <= 10_000 for r in args.rates) and 0.5 <= args.duration <= 120
            and 1 <= args.ab_rounds <= 20):
        p.error("need burst 1..100000, rates 1..10000, duration 0.5..120 s, ab-rounds 1..20")
    return args


def main() -> int:
    args = parse_args()
    header("dispatch", args.quick)
    install_deadline(args.timeout)
    raise_nofile()
    names = [c for c in COMPETITORS if not args.only or c in args.only]
    outcomes: dict[str, Outcome] = {}
    submit_rows: list[list[str]] = []
    shares: list[ShareAB] = []
    failed = 0
    timed_out = False
    python: str | None = None
    with Processes(args.keep) as procs:
        redis = Redis(procs)
        for name in names:
            print(f"-- {name}", flush=True)
            try:
                if name in ARQ:
                    python = python or arq_python()
                    outcomes[name] = asyncio.run(arq_dispatch(procs, name, redis, python, args))
                else:
                    outcomes[name] = asyncio.run(ym_dispatch(procs, name, redis, args))
            except (BenchError, OSError, EOFError, TimeoutError) as exc:
                print(f"{name} FAILED: {describe(exc)}", flush=True)
                outcomes[name] = Outcome(failure=describe(exc))
                failed += 1
                if isinstance(exc, BenchTimeout):
                    timed_out = True
                    break
        if not args.no_submit_path and not timed_out:
            for name in (n for n in names if n in YM):
                print(f"-- {name} submit path", flush=True)
                try:
                    submit_rows += asyncio.run(ym_submit_path(procs, name, redis, args))
                except (BenchError, OSError, EOFError, TimeoutError) as exc:
                    print(f"{name} submit path FAILED: {describe(exc)}", flush=True)
                    submit_rows.append([name, "FAILED", "", "", "", "", ""])
                    failed += 1
        if not args.no_fair_share and not timed_out:
            for name in (n for n in names if n in YM):
                print(f"-- {name} fair share A/B", flush=True)
                try:
                    shares.append(asyncio.run(fair_share_ab(procs, name, redis, args)))
                except (BenchError, OSError, EOFError, TimeoutError) as exc:
                    print(f"{name} fair share A/B FAILED: {describe(exc)}", flush=True)
                    shares.append(ShareAB(name, failure=describe(exc)))
                    failed += 1
                    if isinstance(exc, BenchTimeout):
                        break
    report(outcomes, submit_rows, args, shares)
    if failed:
        print(f"\n{failed} part(s) failed to run; see FAILED above.")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
