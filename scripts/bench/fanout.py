#!/usr/bin/env python3
"""Live log fan-out on the client channel, uvicorn WebSocket implementations side by side.

Each run starts a fresh server (embedded state in a temp dir) under one competitor's uvicorn
WebSocket settings, a real agent (`python -m yardmaster.agent --executor process`) and a separate
subscriber process holding S client sockets subscribed to `job:<id>` from offset 0. The job
prints N lines of ~100 bytes as fast as it can. We measure the wall time from the first log
frame to the moment every subscriber holds every line, the log frames delivered per second, and
the server process's CPU time (utime+stime from /proc) per frame it delivered.

Competitors run alternately in one invocation and the table reports medians and ratios
against websockets-sansio (the product's choice, DESIGN §10).

    .venv/bin/python scripts/bench/fanout.py [--quick] [--lines N] [--subscribers S] [--repeats R]

Loopback only; every run is bounded in time; only processes this script starts are stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CLK_TCK = os.sysconf("SC_CLK_TCK")
TERMINAL = {"succeeded", "failed", "cancelled", "timed-out", "lost"}
BASELINE = "websockets-sansio"


@dataclass(frozen=True)
class Competitor:
    name: str
    ws: str
    deflate: bool


ALL_COMPETITORS = [
    Competitor("websockets-sansio", "websockets-sansio", False),
    Competitor("websockets", "websockets", False),
    Competitor("wsproto", "wsproto", False),
    Competitor("sansio+deflate", "websockets-sansio", True),
]

# The server, exactly as `yardmaster server` builds it, with only the WebSocket implementation
# and permessage-deflate overridden (argv[1], argv[2]).
LAUNCHER = """
import sys, uvicorn
from yardmaster.server.settings import load_settings
from yardmaster.server.serve import uvicorn_config
from yardmaster.server.observability.logging import configure_logging
settings = load_settings()
configure_logging(settings.log_level)
config = uvicorn_config(settings)
config.ws = sys.argv[1]
config.ws_per_message_deflate = sys.argv[2] == "1"
uvicorn.Server(config).run()
"""

# Lines are 100 bytes: an 8-digit counter, a space, 90 x's and a newline.
# burst: one job writes N lines as fast as it can (the agent cuts them into chunks of up to 64 KiB).
BURST_JOB = "import sys\nw=sys.stdout.write\nfor i in range({n}): w('%08d %s\\n' % (i, 'x' * 90))\n"
# trickle: each job writes 5 lines every 5 ms and flushes, like a chatty build; the agent's 50 ms
# flush timer makes each frame ~50 ms of output (~5 KiB), so the cost per frame dominates.
TRICKLE_JOB = (
    "import sys, time\nw=sys.stdout.write\n"
    "for i in range(0, {n}, 5):\n"
    "    w(''.join('%08d %s\\n' % (j, 'x' * 90) for j in range(i, min(i + 5, {n}))))\n"
    "    sys.stdout.flush(); time.sleep(0.005)\n"
)


@dataclass(frozen=True)
class Workload:
    name: str
    jobs: int
    lines: int  # per job
    subscribers: int

    @property
    def code(self) -> str:
        return (BURST_JOB if self.name == "burst" else TRICKLE_JOB).format(n=self.lines)

    def describe(self) -> str:
        if self.name == "burst":
            return f"burst: 1 job writes {self.lines} lines of 100 B at full speed; {self.subscribers} subscribers"
        return (f"trickle: {self.jobs} jobs each write {self.lines} lines of 100 B, 5 every 5 ms; "
                f"{self.subscribers} subscribers, each socket subscribed to every job")


class BenchError(Exception):
    """An expected failure, reported as one line without a traceback."""


# ---- subscriber worker (a separate process, so its CPU does not land on the server) ----------


def worker_main(cfg: dict[str, Any]) -> int:
    return asyncio.run(_worker(cfg))


async def _worker(cfg: dict[str, Any]) -> int:
    import msgspec
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    class Frame(msgspec.Struct):
        type: str
        job_id: str = ""
        text: str = ""
        offset: int = -1
        state: str = ""

    decode = msgspec.json.Decoder(Frame).decode
    job_ids: list[str] = cfg["job_ids"]
    lines_wanted: int = cfg["lines"] * len(job_ids)
    n: int = cfg["subscribers"]
    deadline = time.monotonic() + cfg["timeout"]
    first_log: list[float] = []
    done_at: list[float | None] = [None] * n
    stats = [{"frames": 0, "logs": 0, "lines": 0, "terminal": {}, "gaps": 0, "close": None} for _ in range(n)]
    subscribed = [asyncio.Event() for _ in range(n)]
    extensions: list[str] = []
    all_done = asyncio.Event()
    remaining = [n]

    async def one(i: int) -> None:
        st = stats[i]
        next_offset = dict.fromkeys(job_ids, 0)
        initial = set(job_ids)  # subscriptions still waiting for their initial job-state
        terminal: dict[str, str] = st["terminal"]
        try:
            async with connect(
                cfg["url"] + "/ws/client",
                additional_headers={"Authorization": f"Bearer {cfg['key']}"},
                max_size=None,
                open_timeout=20,
                ping_interval=None,
            ) as ws:
                if i == 0:
                    extensions.append(ws.response.headers.get("Sec-WebSocket-Extensions", ""))
                for job_id in job_ids:
                    await ws.send(json.dumps({"type": "subscribe", "topic": f"job:{job_id}", "from_offset": 0}))
                async for raw in ws:
                    msg = decode(raw)
                    if initial:
                        # Ready once every subscription's initial job-state has arrived.
                        if msg.type == "job-state":
                            initial.discard(msg.job_id)
                            if not initial:
                                subscribed[i].set()
                        continue
                    st["frames"] += 1
                    if msg.type == "log":
                        if not first_log:
                            first_log.append(time.monotonic())
                        st["logs"] += 1
                        if msg.offset != next_offset[msg.job_id]:
                            st["gaps"] += 1
                        next_offset[msg.job_id] = msg.offset + 1
                        st["lines"] += msg.text.count("\n")
                        if st["lines"] >= lines_wanted and done_at[i] is None:
                            done_at[i] = time.monotonic()
                    elif msg.type == "job-state" and msg.state in TERMINAL:
                        terminal[msg.job_id] = msg.state
                    if done_at[i] is not None and len(terminal) == len(job_ids):
                        break
        except ConnectionClosed as exc:
            st["close"] = f"{exc.rcvd.code if exc.rcvd else 'no close frame'}"
        except (TimeoutError, OSError) as exc:
            st["close"] = f"{type(exc).__name__}: {exc}"
        finally:
            subscribed[i].set()
            remaining[0] -= 1
            if remaining[0] == 0:
                all_done.set()

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in subscribed)), max(1.0, deadline - time.monotonic()))
    except TimeoutError:
        pass
    print(json.dumps({"ready": True, "extensions": extensions[0] if extensions else None}), flush=True)
    try:
        await asyncio.wait_for(all_done.wait(), max(1.0, deadline - time.monotonic()))
        timed_out = False
    except TimeoutError:
        timed_out = True
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    finished = [d for d in done_at if d is not None]
    result = {
        "timed_out": timed_out,
        "first_log": first_log[0] if first_log else None,
        "last_done": max(finished) if len(finished) == n else None,
        "stats": stats,
    }
    print(json.dumps(result), flush=True)
    return 0


# ---- orchestration ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields_ = f.read().rsplit(")", 1)[1].split()
    # After the ")" that ends comm: fields_[0] is state (field 3); utime is field 14, stime 15.
    return (int(fields_[11]) + int(fields_[12])) / CLK_TCK


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def tail(path: Path, n: int = 5) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class RunResult:
    competitor: str
    bytes_out: int
    wall_s: float
    log_frames: int
    frames: int
    server_cpu_s: float
    extensions: str

    @property
    def frames_per_s(self) -> float:
        return self.log_frames / self.wall_s

    @property
    def us_per_frame(self) -> float:
        return self.server_cpu_s / self.frames * 1e6

    @property
    def kib_per_frame(self) -> float:
        return self.bytes_out / max(self.log_frames, 1) / 1024


@dataclass
class Tally:
    runs: list[RunResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def run_once(comp: Competitor, wl: Workload, args: argparse.Namespace, workdir: Path) -> RunResult:
    from yardmaster.server.security.tokens import new_token
    from tests.support.cluster import (
        FAST_SETTINGS,
        HttpError,
        free_port,
        http,
        wait_until,
    )

    run_dir = Path(tempfile.mkdtemp(prefix=f"{comp.name}-", dir=workdir))
    port = free_port()
    admin_key = new_token("api-key")
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        **FAST_SETTINGS,
        "YM_HOST": "127.0.0.1",
        "YM_PORT": str(port),
        "YM_DATA_DIR": str(run_dir / "data"),
        "YM_ADMIN_KEY": admin_key,
        "YM_LOG_LEVEL": "warning",
    }
    server = agent = worker = None
    server_log = run_dir / "server.log"
    agent_log = run_dir / "agent.log"
    try:
        with open(server_log, "ab") as out:
            server = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, comp.ws, "1" if comp.deflate else "0"],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

        def ready() -> bool:
            if server.poll() is not None:
                text = server_log.read_text(errors="replace")
                if "address already in use" in text.lower():
                    raise BenchError(f"port {port} is already in use")
                raise BenchError(f"server exited with code {server.returncode}:\n{tail(server_log)}")
            try:
                http("GET", f"{url}/healthz")
                return True
            except (OSError, HttpError):
                return False

        try:
            wait_until(ready, 30, what="server")
        except AssertionError:
            raise BenchError(f"server did not answer on port {port} within 30 s:\n{tail(server_log)}") from None

        agent_info = http("POST", f"{url}/api/v1/agents", admin_key,
                          {"name": "bench", "labels": ["bench"], "capacity": wl.jobs})
        # Queued until the agent (the only holder of label "bench") connects: subscribers are in place first.
        job_ids = [
            http("POST", f"{url}/api/v1/jobs", admin_key, {
                "image": "process", "command": [sys.executable, "-c", wl.code], "labels": ["bench"], "timeout_s": 600,
            })["id"]
            for _ in range(wl.jobs)
        ]
        cfg = {"url": f"ws://127.0.0.1:{port}", "key": admin_key, "job_ids": job_ids, "lines": wl.lines,
               "subscribers": wl.subscribers, "timeout": args.timeout}
        with open(run_dir / "worker.log", "ab") as err:
            worker = subprocess.Popen(
                [sys.executable, __file__, "--worker", json.dumps(cfg)],
                cwd=REPO, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
            )
        assert worker.stdout is not None
        line = worker.stdout.readline()
        if not line:
            raise BenchError(f"subscriber process failed:\n{tail(run_dir / 'worker.log')}")
        extensions = json.loads(line).get("extensions") or "none"

        cpu_before = cpu_seconds(server.pid)
        with open(agent_log, "ab") as out:
            agent = subprocess.Popen(
                [sys.executable, "-m", "yardmaster.agent", "--executor", "process", "--name", "bench", "--label", "bench",
                 "--capacity", str(wl.jobs), "--server", url],
                cwd=REPO, env={**env, "YM_AGENT_TOKEN": agent_info["token"], "YM_LOG_LEVEL": "WARNING"},
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        line = worker.stdout.readline()
        cpu_after = cpu_seconds(server.pid)
        worker.wait(10)
        if not line:
            raise BenchError(f"subscriber process failed:\n{tail(run_dir / 'worker.log')}")
        res = json.loads(line)
        stats = res["stats"]
        closes = [s["close"] for s in stats if s["close"]]
        if closes:
            raise BenchError(f"{len(closes)} subscriber(s) closed early (close codes: {sorted(set(closes))})")
        if res["timed_out"] or res["last_done"] is None or res["first_log"] is None:
            short = sum(1 for s in stats if s["lines"] < wl.lines * wl.jobs)
            raise BenchError(f"timed out after {args.timeout:.0f} s ({short} subscriber(s) missing lines)")
        gaps = sum(s["gaps"] for s in stats)
        if gaps:
            raise BenchError(f"{gaps} offset gap(s) seen by subscribers")
        bad = {state for s in stats for state in s["terminal"].values()} - {"succeeded"}
        if bad:
            raise BenchError(f"job ended {sorted(bad)}")
        return RunResult(
            competitor=comp.name,
            bytes_out=wl.jobs * wl.lines * 100 * wl.subscribers,
            wall_s=res["last_done"] - res["first_log"],
            log_frames=sum(s["logs"] for s in stats),
            frames=sum(s["frames"] for s in stats),
            server_cpu_s=cpu_after - cpu_before,
            extensions=extensions,
        )
    finally:
        for proc in (worker, agent, server):
            stop(proc)
        if worker is not None and worker.stdout is not None:
            worker.stdout.close()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def available(comp: Competitor) -> str | None:
    try:
        __import__("wsproto" if comp.ws == "wsproto" else "websockets")
    except ImportError:
        return f"{comp.name}: skipped (its package is not installed; `.venv/bin/pip install {comp.ws}`)"
    return None


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return "n/a"
    med = statistics.median(values)
    return f"±{(max(values) - min(values)) / 2 / med * 100:.0f}%"


def summarize(wl: Workload, comps: list[Competitor], tallies: dict[str, Tally], exts: dict[str, str]) -> None:
    print(f"\n{wl.describe()}")
    head = (f"{'competitor':<18} {'runs':>4} {'wall s':>7} {'frames/s':>9} {'KiB/frame':>9} {'CPU s':>6} "
            f"{'µs/frame':>9} {'noise':>6} {'wall ×':>7} {'CPU/frame ×':>11}  negotiated extension")
    print(head)
    print("-" * len(head))
    base = tallies.get(BASELINE)
    base_wall = statistics.median(r.wall_s for r in base.runs) if base and base.runs else None
    base_upf = statistics.median(r.us_per_frame for r in base.runs) if base and base.runs else None
    for c in comps:
        t = tallies[c.name]
        if not t.runs:
            print(f"{c.name:<18} {0:>4}  all runs failed: {t.failures[-1] if t.failures else '?'}")
            continue
        wall = statistics.median(r.wall_s for r in t.runs)
        fps = statistics.median(r.frames_per_s for r in t.runs)
        kib = statistics.median(r.kib_per_frame for r in t.runs)
        cpu = statistics.median(r.server_cpu_s for r in t.runs)
        upf = statistics.median(r.us_per_frame for r in t.runs)
        rw = f"{wall / base_wall:.2f}" if base_wall else "n/a"
        ru = f"{upf / base_upf:.2f}" if base_upf else "n/a"
        ext = exts.get(c.name, "?").split(";")[0] or "none"
        print(f"{c.name:<18} {len(t.runs):>4} {wall:7.2f} {fps:9.0f} {kib:9.1f} {cpu:6.2f} {upf:9.1f} "
              f"{spread([r.us_per_frame for r in t.runs]):>6} {rw:>7} {ru:>11}  {ext}")


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~30 s run: smaller workloads, two repeats")
    p.add_argument("--workload", choices=["burst", "trickle", "both"], default="both",
                   help="burst: one job at full speed (large frames); trickle: paced jobs (small frames)")
    p.add_argument("--lines", type=int, help="burst: lines the job writes (default 100000; quick 50000)")
    p.add_argument("--subscribers", type=int, help="client sockets (default 50; quick 25)")
    p.add_argument("--trickle-jobs", type=int, help="trickle: concurrent jobs (default 10; quick 5)")
    p.add_argument("--trickle-lines", type=int, help="trickle: lines per job (default 2000; quick 1000)")
    p.add_argument("--repeats", type=int, help="runs per competitor and workload, order alternating (default 5; quick 2)")
    p.add_argument("--only", action="append", choices=[c.name for c in ALL_COMPETITORS],
                   help="run only these competitors (repeatable)")
    p.add_argument("--no-deflate", action="store_true", help="leave out the sansio+deflate competitor")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one run may take (default 60)")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs with server/agent logs (printed)")
    args = p.parse_args()
    q = args.quick
    lines = args.lines or (50_000 if q else 100_000)
    subs = args.subscribers or (25 if q else 50)
    tjobs = args.trickle_jobs or (5 if q else 10)
    tlines = args.trickle_lines or (1000 if q else 2000)
    repeats = args.repeats or (2 if q else 5)
    # 16 MiB is the per-job log cap: beyond it the stored log loses its middle and counts break.
    if not (1 <= lines <= 150_000 and 1 <= tlines <= 150_000 and 1 <= subs <= 1000 and 1 <= tjobs <= 50
            and 1 <= repeats <= 20 and 1 <= args.timeout <= 600):
        print("error: need lines 1..150000, subscribers 1..1000, trickle jobs 1..50, repeats 1..20, "
              "timeout 1..600 s", file=sys.stderr)
        return 2
    workloads = []
    if args.workload in ("burst", "both"):
        workloads.append(Workload("burst", 1, lines, subs))
    if args.workload in ("trickle", "both"):
        workloads.append(Workload("trickle", tjobs, tlines, subs))

    comps = [c for c in ALL_COMPETITORS if (not args.only or c.name in args.only)]
    if args.no_deflate:
        comps = [c for c in comps if not c.deflate]
    for c in list(comps):
        why = available(c)
        if why:
            print(why)
            comps.remove(c)
    if not comps:
        print("error: nothing to run", file=sys.stderr)
        return 2

    print(f"live log fan-out on /ws/client: {', '.join(c.name for c in comps)}; "
          f"{repeats} repeat(s), order alternating; {os.cpu_count()} CPU(s)")
    for wl in workloads:
        print(f"  {wl.describe()}")
    tallies = {(wl.name, c.name): Tally() for wl in workloads for c in comps}
    exts: dict[str, str] = {}
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="ym-bench-fanout-")
    try:
        for r in range(repeats):
            order = comps if r % 2 == 0 else list(reversed(comps))
            for wl in workloads:
                for c in order:
                    label = f"[{r + 1}/{repeats}] {wl.name:<7} {c.name:<18}"
                    try:
                        res = run_once(c, wl, args, Path(tmp))
                    except BenchError as exc:
                        print(f"{label} FAILED: {exc}", flush=True)
                        tallies[(wl.name, c.name)].failures.append(str(exc))
                        continue
                    tallies[(wl.name, c.name)].runs.append(res)
                    exts[c.name] = res.extensions
                    print(f"{label} wall {res.wall_s:6.2f} s {res.frames_per_s:8.0f} frames/s "
                          f"{res.kib_per_frame:5.1f} KiB/frame  server CPU {res.server_cpu_s:5.2f} s "
                          f"{res.us_per_frame:6.1f} µs/frame", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nmedians over {repeats} run(s) each; total {time.monotonic() - started:.0f} s")
    for wl in workloads:
        summarize(wl, comps, {c.name: tallies[(wl.name, c.name)] for c in comps}, exts)
    print("\nwall: first log frame → every subscriber holds every line (trickle: paced by the jobs, ~equal by design)."
          "\nframes/s: log frames delivered to all subscribers per wall second."
          "\nµs/frame: server process CPU (utime+stime from /proc, whole process: agent ingestion, SQLite and"
          " fan-out)\n  per frame it sent to subscribers.  ×: ratio to websockets-sansio, lower is better."
          "\nnoise: half the min–max range of µs/frame across runs, relative to the median.")
    failed = sum(len(t.failures) for t in tallies.values())
    if failed:
        print(f"\n{failed} run(s) failed; see the lines marked FAILED above.")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(json.loads(sys.argv[2])))
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
