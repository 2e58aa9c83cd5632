"""Shared parts of the benchmarks: child processes, the server and Redis, /proc sampling, a raw
HTTP client, the JSON-lines control channel of the helper processes, latency histograms and tables.

Only the standard library is imported at module level, so the arq helper (`arq_side.py`, run by
the arq virtual environment's Python) can use the control channel and histograms too.

Every process is started here and stopped by its PID (SIGTERM, then SIGKILL); each carries a
parent-death signal, so a benchmark killed outright does not leave servers behind.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import queue
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
NOFILE_WANTED = 65536


class BenchError(Exception):
    """A benchmark could not run (a process died, a timeout): reported as one line."""


class BenchTimeout(BenchError):
    pass


def repo_on_path() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# ---- limits, signals, the overall deadline ----------------------------------------------------


def raise_nofile(wanted: int = NOFILE_WANTED) -> int:
    """Raise this process's open-file limit (children inherit it); returns the soft limit now set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target_hard in (max(hard, wanted), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, target_hard), target_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def install_deadline(seconds: float) -> None:
    """SIGALRM after `seconds` raises BenchTimeout in the main thread; SIGTERM acts like Ctrl-C.
    Either unwinds through the callers' `finally`, which stop every child."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise BenchTimeout(f"the whole run exceeded its {seconds:.0f} s limit")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.setitimer(signal.ITIMER_REAL, seconds)


def describe(exc: BaseException) -> str:
    """One line for an expected failure; the exception type too when it is not a BenchError."""
    return str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"


def run_main(main: Callable[[], int]) -> None:
    """Exit codes: 0 ran, 1 a benchmark failed to run, 130 interrupted. Started by another
    Python than the repository's virtual environment, it re-runs itself with that one."""
    import importlib.util

    venv_python = REPO / ".venv" / "bin" / "python"
    if importlib.util.find_spec("yardmaster") is None and venv_python.exists() and Path(sys.executable) != venv_python:
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    try:
        code = main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


# ---- child processes ----------------------------------------------------------------------------

# Runs argv with a parent-death signal: prctl(PR_SET_PDEATHSIG) survives execve, so the server,
# redis-server or helper dies with the benchmark even when the benchmark is killed with SIGKILL.
_DEATHSIG = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class Child:
    """One started process. Helpers speak JSON lines: commands on stdin, events on stdout;
    their stderr, and all output of plain processes, goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 control: bool = False, cwd: Path = REPO, grace: float = 0.0) -> None:
        self.name = name
        self.log_path = log_path
        self.grace = grace  # seconds to let it finish on its own before SIGTERM
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        log = open(log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DEATHSIG, str(os.getpid()), *argv],
                cwd=cwd, env=env if env is not None else dict(os.environ),
                stdin=subprocess.PIPE if control else subprocess.DEVNULL,
                stdout=subprocess.PIPE if control else log,
                stderr=log,
            )
        finally:
            log.close()
        if control:
            threading.Thread(target=self._read_events, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self._events.put(json.loads(raw))
            except ValueError:
                continue  # stray output; the protocol lines are JSON
        self._events.put(None)

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise BenchError(f"{self.name} is gone:\n{self.log_tail()}") from None

    def expect(self, timeout: float, event: str | None = None) -> dict[str, Any]:
        """The next event (of kind `event`, skipping others) within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no {event or 'answer'} within {timeout:.0f} s:\n{self.log_tail()}")
            try:
                msg = self._events.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                self._events.put(None)
                raise BenchError(f"{self.name} exited ({self.proc.poll()}):\n{self.log_tail()}")
            if msg.get("event") == "error":
                raise BenchError(f"{self.name}: {msg.get('message')}")
            if event is None or msg.get("event") == event:
                return msg

    def request(self, timeout: float, event: str | None = None, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.expect(timeout, event)

    async def arequest(self, timeout: float, event: str | None = None, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return await asyncio.to_thread(self.expect, timeout, event)

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "    (no log)"
        return "\n".join("    " + line for line in text) or "    (empty log)"

    def stop(self, timeout: float = 10.0) -> None:
        proc = self.proc
        if proc.stdin is not None:
            try:
                proc.stdin.close()  # helpers exit on EOF
            except OSError:
                pass
        if proc.poll() is None:
            try:
                proc.wait(max(self.grace, 0.5 if proc.stdin is not None else 0))
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


class Processes:
    """Every process a benchmark starts, stopped in reverse order on exit (also on errors and ^C)."""

    def __init__(self, keep: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ym-bench-"))
        self.keep = keep
        self._children: list[Child] = []
        self._cleanups: list[Callable[[], None]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
        if self.keep:
            print(f"logs kept in {self.dir}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, control: bool = False,
              cwd: Path = REPO, grace: float = 0.0, stop_after: Child | None = None) -> Child:
        """`stop_after`: stop the new child only after that one (e.g. a profiler after its target)."""
        child = Child(name, argv, self.dir / f"{name}.log", env, control, cwd, grace)
        if stop_after is not None and stop_after in self._children:
            self._children.insert(self._children.index(stop_after), child)
        else:
            self._children.append(child)
        return child

    def helper(self, name: str, script: str, config: dict[str, Any], python: str | None = None) -> Child:
        """A helper script of this folder, speaking the control protocol; its config goes in a file."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(BENCH_DIR)])}
        path = self.dir / f"{name}.json"
        path.write_text(json.dumps(config))
        return self.start(name, [python or sys.executable, str(BENCH_DIR / script), f"@{path}"], env, control=True)

    def on_exit(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self._children:
            self._children.remove(child)

    def stop_all(self) -> None:
        # Ignore a second ^C while stopping: a half-stopped run is what leaks processes.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for child in reversed(self._children):
                child.stop()
            self._children.clear()
            for fn in reversed(self._cleanups):
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                    print(f"cleanup failed: {exc}", file=sys.stderr)
            self._cleanups.clear()
        finally:
            signal.signal(signal.SIGINT, old)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---- /proc ------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        after_comm = f.read().rsplit(")", 1)[1].split()
    # after_comm[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(after_comm[11]) + int(after_comm[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


class CpuMeter:
    """CPU seconds used by a set of processes between start() and stop()."""

    def __init__(self, readers: dict[str, Callable[[], float]]) -> None:
        self.readers = readers
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    @classmethod
    def of_pids(cls, **pids: int) -> CpuMeter:
        return cls({name: (lambda p=pid: cpu_seconds(p)) for name, pid in pids.items()})

    def add(self, name: str, reader: Callable[[], float]) -> CpuMeter:
        self.readers[name] = reader
        return self

    def start(self) -> CpuMeter:
        self._start = {k: r() for k, r in self.readers.items()}
        return self

    def stop(self) -> dict[str, float]:
        self.used = {k: r() - self._start[k] for k, r in self.readers.items()}
        return self.used

    @property
    def total(self) -> float:
        return sum(self.used.values())


def machine_summary() -> str:
    mem_kib = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU(s){' (' + cpu + ')' if cpu else ''}, {mem_kib / 1024 / 1024:.1f} GiB RAM, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


# ---- Redis ------------------------------------------------------------------------------------


class Redis:
    """A redis-server without persistence on a free loopback port (started like
    tests/support/redis_server.py does, but as a Child, so it dies with the benchmark), with the
    two commands the benchmarks need."""

    def __init__(self, procs: Processes, name: str = "redis") -> None:
        import shutil

        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(binary, os.X_OK):
            raise BenchError("redis-server not found (Debian package redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        data = procs.dir / f"{name}-data"
        data.mkdir()
        self.child = procs.start(name, [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(data),
                                        "--save", "", "--appendonly", "no", "--daemonize", "no"])

        def answers() -> bool:
            if not self.child.alive():
                raise BenchError(f"redis-server exited:\n{self.child.log_tail()}")
            try:
                return self.command("PING") == b"+PONG\r\n"
            except OSError:
                return False

        wait_until(answers, 10, "redis-server")

    def command(self, *args: str) -> bytes:
        payload = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(payload)
            data = b""
            while True:
                more = s.recv(65536)
                if not more:
                    raise ConnectionResetError("redis-server closed the connection")
                data += more
                if data.startswith((b"+", b"-", b":")) and data.endswith(b"\r\n"):
                    return data
                if data.startswith(b"$"):
                    head, _, rest = data.partition(b"\r\n")
                    if len(rest) >= int(head[1:]) + 2:
                        return rest[: int(head[1:])]

    def flush(self) -> None:
        self.command("FLUSHALL")

    def cpu_seconds(self) -> float:
        """used_cpu_user + used_cpu_sys of the redis-server process, from INFO."""
        info = self.command("INFO", "cpu").decode()
        values = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        return float(values["used_cpu_user"]) + float(values["used_cpu_sys"])


# ---- the Yardmaster server ----------------------------------------------------------------------


@dataclass
class Server:
    child: Child
    port: int
    admin_key: str
    redis: Redis | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.child.pid

    def api(self, method: str, path: str, body: Any = None) -> Any:
        status, data = http_once(self.port, method, path, self.admin_key, body)
        if status >= 400:
            raise BenchError(f"{method} {path}: HTTP {status}: {data[:300]!r}")
        return json.loads(data) if data else None

    def agent_token(self, name: str, capacity: int, labels: Sequence[str] = ()) -> str:
        return str(self.api("POST", "/api/v1/agents", {"name": name, "labels": list(labels), "capacity": capacity})["token"])

    def metric(self, name: str) -> float | None:
        status, data = http_once(self.port, "GET", "/metrics", self.admin_key)
        for line in data.decode(errors="replace").splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None


# The limits of issue 9 as a benchmark needs them: every quota off (a benchmark's one client runs
# thousands of jobs and sockets at once), every rate class on but far out of reach, so that what
# the limiter costs is part of every figure. A server older than the limits ignores these.
BENCH_RATE = "1000000/1s"
BENCH_LIMITS = {
    **{f"YM_RATE_{c.upper().replace('-', '_')}": BENCH_RATE
       for c in ("unauthenticated", "sign-in", "submit", "sandbox-create", "api", "admin", "handshake", "client-messages")},
    "YM_QUOTA_QUEUED_JOBS": "0",
    "YM_QUOTA_RUNNING_JOBS": "0",
    "YM_QUOTA_CLIENT_SOCKETS": "0",
    "YM_QUOTA_SUBSCRIPTIONS": "0",
}


def start_server(procs: Processes, name: str, redis: Redis | None = None, env: dict[str, str] | None = None,
                 timeout: float = 30.0) -> Server:
    """`yardmaster server` with its default timings, the limits of BENCH_LIMITS and a fresh data
    dir; `redis` for Redis mode. Its output goes to <name>.log; it is ready once /readyz says it
    leads the scheduler."""
    repo_on_path()
    from yardmaster.server.security.tokens import new_token

    port = free_port()
    admin_key = new_token("api-key")
    data_dir = procs.dir / f"{name}-data"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("YM_")}
    full_env.update({
        "YM_HOST": "127.0.0.1",
        "YM_PORT": str(port),
        "YM_DATA_DIR": str(data_dir),
        "YM_ADMIN_KEY": admin_key,
        "YM_LOG_LEVEL": "warning",
        **BENCH_LIMITS,
        **({"YM_REDIS_URL": redis.url} if redis else {}),
        **(env or {}),
    })
    shim = source_shim(procs)
    if shim:
        full_env["PYTHONPATH"] = os.pathsep.join([shim, full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    child = procs.start(name, [sys.executable, "-m", "yardmaster.server.cli", "server"], full_env)
    server = Server(child, port, admin_key, redis)

    def ready() -> bool:
        if not child.alive():
            raise BenchError(f"server {name} exited ({child.proc.returncode}):\n{child.log_tail()}")
        try:
            status, data = http_once(port, "GET", "/readyz", None, timeout=2)
        except OSError:
            return False
        return status == 200 and bool(json.loads(data).get("leader"))

    try:
        wait_until(ready, timeout, f"server {name} to be ready and lead")
    except BenchError as exc:
        raise BenchError(f"{exc}:\n{child.log_tail()}") from None
    # Only once it serves: attached earlier, py-spy may catch the launcher before its exec and
    # record nothing of the server.
    profile(procs, child)
    return server


SOURCE_ENV = "BENCH_YM_SRC"


def source_shim(procs: Processes) -> str | None:
    """With BENCH_YM_SRC=<a source tree> (e.g. `git archive <commit>` unpacked), servers run that
    code instead of the working tree's: a `yardmaster` package of symlinks to its protocol/,
    server/ and agent/ goes first on the server's PYTHONPATH (the editable install's finder comes
    after the path). The fake agent and the benchmark keep the working tree's protocol code."""
    src = os.environ.get(SOURCE_ENV)
    if not src:
        return None
    root = Path(src).resolve()
    shim = procs.dir / "ym-src"
    pkg = shim / "yardmaster"
    if not pkg.exists():
        if not (root / "server" / "cli.py").exists():
            raise BenchError(f"{SOURCE_ENV}={src} is not a Yardmaster source tree (no server/cli.py)")
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        for part in ("protocol", "server", "agent"):
            (pkg / part).symlink_to(root / part)
        print(f"servers run the code in {root}", file=sys.stderr, flush=True)
    return str(shim)


PROFILE_ENV = "BENCH_PROFILE_DIR"
PY_SPY = REPO / ".bench-venv" / "tools" / "bin" / "py-spy"


def profile(procs: Processes, target: Child) -> None:
    """With BENCH_PROFILE_DIR set, py-spy samples `target` (all threads, idle ones left out) until it
    exits, into <dir>/<name>.txt as collapsed stacks (`profile_top.py` summarizes them)."""
    out_dir = os.environ.get(PROFILE_ENV)
    if not out_dir:
        return
    import shutil

    py_spy = shutil.which("py-spy") or (str(PY_SPY) if PY_SPY.exists() else None)
    if py_spy is None:
        raise BenchError(f"{PROFILE_ENV} is set but py-spy is missing: "
                         f"python3 -m venv .bench-venv/tools && .bench-venv/tools/bin/pip install py-spy")
    os.makedirs(out_dir, exist_ok=True)
    out = Path(out_dir) / f"{target.name}.txt"
    procs.start(f"{target.name}-py-spy", [py_spy, "record", "--pid", str(target.pid), "--rate", "200", "--threads", "--nonblocking",
                                          "--format", "raw", "--output", str(out)], grace=15, stop_after=target)
    print(f"profiling {target.name} (pid {target.pid}) into {out}", file=sys.stderr, flush=True)


def server_env_for_sockets(n: int) -> dict[str, str]:
    """Settings that let one API key hold `n` client sockets (defaults: 100 per key, 10,000 in all)."""
    return {"YM_QUOTA_CLIENT_SOCKETS": str(n + 100), "YM_LIMIT_CONCURRENCY": str(n + 1000)}


# ---- HTTP -------------------------------------------------------------------------------------


def http_once(port: int, method: str, path: str, key: str | None, body: Any = None,
              timeout: float = 15.0) -> tuple[int, bytes]:
    """One blocking request on a fresh connection (set-up calls, not the measured path)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class HttpConn:
    """A keep-alive HTTP/1.1 connection over asyncio streams: little client CPU per request, so
    the load generator leaves the cores to the server."""

    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self._prefix = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        reused = self._writer is not None
        try:
            return await self._request(method, path, body)
        except (ConnectionError, asyncio.IncompleteReadError):
            if not reused:
                raise
        # The server closed the idle keep-alive connection as we sent (uvicorn's keep-alive
        # timeout): it never read the request, so sending it again on a fresh one is safe.
        return await self._request(method, path, body)

    async def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self._prefix
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        writer.write(head + b"\r\n" + (body or b""))
        try:
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionResetError("server closed the connection")
            status = int(status_line.split()[1])
            length, chunked, close = -1, False, False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            if chunked:
                parts = []
                while (size := int((await reader.readline()).split(b";")[0], 16)) > 0:
                    parts.append(await reader.readexactly(size + 2))
                await reader.readline()
                data = b"".join(p[:-2] for p in parts)
            elif length >= 0:
                data = await reader.readexactly(length)
            else:
                data, close = await reader.read(), True
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class HttpPool:
    """Keep-alive connections handed out one request at a time; opens more (up to `limit`) when
    all are busy, so an open-loop sender is not held back by slow answers."""

    def __init__(self, port: int, key: str, limit: int = 256) -> None:
        self.port, self.key, self.limit = port, key, limit
        self._idle: list[HttpConn] = []
        self._count = 0
        self._freed = asyncio.Condition()

    async def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
        async with self._freed:
            while not self._idle and self._count >= self.limit:
                await self._freed.wait()
            if self._idle:
                conn = self._idle.pop()
            else:
                conn = HttpConn(self.port, self.key)
                self._count += 1
        ok = False
        try:
            result = await asyncio.wait_for(conn.request(method, path, body), timeout)
            ok = True
            return result
        finally:
            async with self._freed:
                if ok:
                    self._idle.append(conn)
                else:
                    conn.close()
                    self._count -= 1
                self._freed.notify()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


# ---- the helpers' side of the control channel ---------------------------------------------------


class Control:
    """Commands arrive as JSON lines on stdin; events leave as JSON lines on stdout. EOF on stdin
    means the benchmark is gone: the helper exits."""

    def __init__(self) -> None:
        self._reader: asyncio.StreamReader | None = None

    async def open(self) -> Control:
        loop = asyncio.get_running_loop()
        self._reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self._reader), sys.stdin)
        return self

    async def command(self) -> dict[str, Any] | None:
        assert self._reader is not None
        line = await self._reader.readline()
        return json.loads(line) if line else None

    @staticmethod
    def emit(event: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
        sys.stdout.flush()


def load_config(arg: str) -> dict[str, Any]:
    """A helper's config: JSON on the command line, or "@file" for big ones (argv is capped at 128 KiB)."""
    if arg.startswith("@"):
        with open(arg[1:]) as f:
            return dict(json.load(f))
    return dict(json.loads(arg))


def fast_loop_run(main: Any) -> Any:
    """asyncio.run with uvloop when it is installed (uvicorn picks it too), for the helpers."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# ---- latency histograms -------------------------------------------------------------------------

_BUCKETS_PER_E = 1 / math.log(1.02)  # 2 % wide buckets: percentiles within 2 %


class Hist:
    """Latencies in log-spaced buckets of 2 %; mergeable across processes as JSON."""

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = counts or {}
        self.n = sum(self.counts.values())

    def add(self, seconds: float) -> None:
        us = seconds * 1e6
        i = int(math.log(us) * _BUCKETS_PER_E) if us > 1 else 0
        self.counts[i] = self.counts.get(i, 0) + 1
        self.n += 1

    def extend(self, values: Iterable[float]) -> Hist:
        for v in values:
            self.add(v)
        return self

    def merge(self, other: Hist) -> Hist:
        for i, c in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + c
        self.n += other.n
        return self

    def to_json(self) -> dict[str, int]:
        return {str(k): v for k, v in self.counts.items()}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> Hist:
        return cls({int(k): v for k, v in data.items()})

    def quantile(self, q: float, total: int | None = None) -> float:
        """Seconds at quantile q (upper bucket bound). With `total` > n the missing samples count
        as infinitely late (lost or never delivered)."""
        total = max(total or self.n, self.n)
        if total == 0:
            return math.nan
        rank = math.ceil(q * total)
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                return math.exp((i + 1) / _BUCKETS_PER_E) / 1e6
        return math.inf


# ---- tables -----------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "n/a"
    if math.isinf(seconds):
        return "inf"
    return f"{seconds * 1000:.1f}" if seconds < 10 else f"{seconds * 1000:.0f}"


def num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "n/a"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b or math.isinf(a) or math.isinf(b) or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}x"


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], note: str = "") -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    if note:
        print(note)
    sys.stdout.flush()


@dataclass
class Targets:
    """The issue's targets: measured value, goal, met or not. Printed, never enforced."""

    rows: list[list[str]] = field(default_factory=list)

    def at_least(self, what: str, value: float | None, goal: float, unit: str = "") -> None:
        self._add(what, value, f">= {goal:,g}{unit}", None if value is None else value >= goal, value and value / goal)

    def at_most(self, what: str, value: float | None, goal: float, unit: str = "") -> None:
        ok = None if value is None or math.isnan(value) else value <= goal
        self._add(what, value, f"<= {goal:,g}{unit}", ok, None if value is None else goal / value if value else None)

    def check(self, what: str, ok: bool | None, detail: str) -> None:
        self.rows.append([what, detail, "", "n/a" if ok is None else ("met" if ok else "MISSED")])

    def _add(self, what: str, value: float | None, goal: str, ok: bool | None, headroom: float | None) -> None:
        shown = "n/a" if value is None or math.isnan(value) else (f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}")
        self.rows.append([what, f"{shown} (goal {goal})", "n/a" if not headroom else f"{headroom:.2f}x",
                          "n/a" if ok is None else ("met" if ok else "MISSED")])

    def print(self) -> None:
        print_table("targets (issue 7; reported, never enforced)", ["target", "measured", "of goal", ""], self.rows,
                    "of goal: measured/goal for 'at least' targets, goal/measured for 'at most' ones; >= 1.00x is met.")


def header(name: str, quick: bool) -> None:
    print(f"== {name} ({'quick' if quick else 'full'}) on {machine_summary()}")
    sys.stdout.flush()
