"""A real `redis-server` process on a free loopback port, in its own temp dir.

Only the PID started here is ever signalled. restart() keeps the port and the data dir, so with
appendonly (the default) the data survives the restart.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServerUnavailable(Exception):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, port: int | None = None, appendonly: bool = True) -> None:
        self.binary = shutil.which("redis-server") or REDIS_SERVER
        if not os.access(self.binary, os.X_OK):
            raise RedisServerUnavailable(f"redis-server not found (looked for {REDIS_SERVER} and on PATH)")
        self.port = port or _free_port()
        self.appendonly = appendonly
        self.dir = Path(tempfile.mkdtemp(prefix="ym-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> Path:
        return self.dir / "redis.sock"

    @property
    def unix_url(self) -> str:
        """The same server over its unix socket."""
        return f"unix://{self.socket_path}?db=0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _args(self) -> list[str]:
        return [
            self.binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self._log),
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen(self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RedisServerUnavailable(f"redis-server exited with {self._proc.returncode}: {self._tail_log()}")
            if self._answers_ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RedisServerUnavailable(f"redis-server did not answer on port {self.port}: {self._tail_log()}")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # in case it was paused
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung Redis)."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _answers_ping(self) -> bool:
        # Also waits out AOF loading: redis answers -LOADING until the data is back.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _tail_log(self) -> str:
        try:
            return " | ".join(self._log.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class RedisSentinel(RedisServer):
    """A Sentinel (redis-server --sentinel) watching the master at 127.0.0.1:`master_port`."""

    def __init__(self, master_port: int, master: str = "mymaster", port: int | None = None) -> None:
        super().__init__(port=port, appendonly=False)
        self.master_port = master_port
        self.master = master

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/0?master={self.master}"

    def _args(self) -> list[str]:
        conf = self.dir / "sentinel.conf"  # sentinel rewrites its config file, so it must be ours
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile {self._log}\n"
            f"sentinel monitor {self.master} 127.0.0.1 {self.master_port} 1\n"
        )
        return [self.binary, str(conf), "--sentinel"]
