"""A real Docker engine for the tests and for `scripts/dev`: an existing one (DOCKER_HOST, or the
default socket as the docker CLI finds it), or a private dockerd started here as root with
`--storage-driver=vfs --iptables=false --bridge=none`, with a busybox image imported from
Debian's busybox-static (there is no registry to pull from).

Talks to the Engine API with the standard library only (http.client over a unix socket), so
it works from synchronous, session-scoped fixtures without an event loop.

    python scripts/docker_engine.py run --image yardmaster/busybox:latest -- CMD ARGS...

runs CMD with DOCKER_HOST set to a usable engine (started for the purpose, and stopped after
CMD exits), or without one, with a warning, when none can be had.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.parse
from pathlib import Path

TEST_IMAGE = "yardmaster-test/busybox:latest"
DEFAULT_HOST = "unix:///var/run/docker.sock"
BUSYBOX_CANDIDATES = ("/usr/bin/busybox", "/bin/busybox")
APPLETS = (
    "sh", "ash", "echo", "cat", "sleep", "id", "ls", "touch", "head", "tail", "dd", "yes", "true",
    "false", "env", "wget", "ip", "kill", "tr", "printf", "seq", "grep", "mkdir", "rm", "pwd",
    "whoami", "wc", "sed", "awk", "test", "[", "date", "hostname", "ps", "uname", "xargs", "sort",
    "base64", "md5sum", "sha256sum", "trap", "nc", "ifconfig", "mount", "stat", "cut", "tee",
)


class EngineUnavailable(RuntimeError):
    """No Docker engine could be used or started; the message says why."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _connection(host: str, timeout: float) -> http.client.HTTPConnection:
    url = urllib.parse.urlparse(host)
    if url.scheme == "unix":
        return _UnixHTTPConnection(url.path, timeout)
    if url.scheme in ("tcp", "http"):
        return http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 2375, timeout=timeout)
    raise EngineUnavailable(f"unsupported DOCKER_HOST {host!r} (only unix:// and tcp:// are supported)")


def api(host: str, method: str, path: str, body: bytes | None = None, timeout: float = 30.0,
        headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = _connection(host, timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def ping(host: str, timeout: float = 2.0) -> bool:
    try:
        status, body = api(host, "GET", "/_ping", timeout=timeout)
    except (OSError, http.client.HTTPException, EngineUnavailable):
        return False
    return status == 200 and body.strip() == b"OK"


def busybox_rootfs_tar() -> bytes:
    """A tar of a minimal root filesystem: static busybox, its applet links, /tmp, /etc/passwd."""
    busybox = next((p for p in BUSYBOX_CANDIDATES if Path(p).is_file()), None)
    if busybox is None:
        raise EngineUnavailable("busybox not found (install Debian's busybox-static)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))

        for d in ("bin", "etc", "proc", "sys", "dev", "root", "home", "usr", "usr/bin", "var"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_file("bin/busybox", Path(busybox).read_bytes(), 0o755)
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            tar.addfile(link)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return buf.getvalue()


def image_exists(host: str, image: str) -> bool:
    status, _ = api(host, "GET", f"/images/{urllib.parse.quote(image, safe='')}/json")
    return status == 200


def import_image(host: str, image: str) -> None:
    repo, _, tag = image.rpartition(":")
    query = urllib.parse.urlencode({"fromSrc": "-", "repo": repo, "tag": tag})
    status, body = api(host, "POST", f"/images/create?{query}", body=busybox_rootfs_tar(), timeout=120,
                       headers={"Content-Type": "application/x-tar"})
    if status != 200 or b'"error"' in body:
        raise EngineUnavailable(f"importing {image} failed: HTTP {status}: {body[-500:]!r}")
    if not image_exists(host, image):
        raise EngineUnavailable(f"importing {image} reported success but the image is missing")


class DockerEngine:
    """Use DOCKER_HOST if it answers, else start a private dockerd (root only)."""

    def __init__(self, image: str = TEST_IMAGE, start_timeout_s: float = 60.0) -> None:
        self.image = image
        self.host = ""
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    def start(self) -> None:
        given = os.environ.get("DOCKER_HOST")
        if given and ping(given):
            self.host = given
        elif not given and ping(DEFAULT_HOST):
            self.host = DEFAULT_HOST
        else:
            self._start_private(given)
        if not image_exists(self.host, self.image):
            import_image(self.host, self.image)

    def _start_private(self, given: str | None) -> None:
        prefix = f"DOCKER_HOST={given} does not answer /_ping; " if given else ""
        dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists() else None)
        if dockerd is None:
            raise EngineUnavailable(prefix + "no dockerd binary found (install Debian's docker.io)")
        if os.geteuid() != 0:
            raise EngineUnavailable(prefix + "starting a private dockerd needs root")
        # Short base path: unix socket paths are limited to ~100 characters.
        self._dir = Path(tempfile.mkdtemp(prefix="ymd-", dir="/tmp"))
        sock = self._dir / "d.sock"
        log_path = self._dir / "dockerd.log"
        argv = [
            dockerd,
            "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--ip-masq=false",
            "--bridge=none", "--userland-proxy=false",
            f"--data-root={self._dir / 'data'}", f"--exec-root={self._dir / 'x'}",
            f"--pidfile={self._dir / 'd.pid'}", f"-H=unix://{sock}",
        ]
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        self.host = f"unix://{sock}"
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if sock.exists() and ping(self.host):
                return
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        reason = "exited" if self._proc and self._proc.returncode is not None else "did not answer /_ping in time"
        raise EngineUnavailable(f"{prefix}private dockerd {reason}; log tail:\n{tail}")

    def log_tail(self, lines: int = 30) -> str:
        if self._dir is None:
            return ""
        try:
            text = (self._dir / "dockerd.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def containers(self, label: str | None = None) -> list[dict[str, object]]:
        """All containers (running or not), optionally filtered by a label (`key=value`)."""
        query = "all=1"
        if label:
            query += "&filters=" + urllib.parse.quote(json.dumps({"label": [label]}))
        status, body = api(self.host, "GET", f"/containers/json?{query}")
        if status != 200:
            raise RuntimeError(f"listing containers failed: HTTP {status}")
        result: list[dict[str, object]] = json.loads(body)
        return result

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._dir is not None:
            # vfs layers can hold read-only dirs; best effort, and keep the log if removal fails.
            subprocess.run(["umount", "-R", "-l", str(self._dir)], stderr=subprocess.DEVNULL, check=False)
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _run(argv: list[str]) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="docker_engine.py")
    sub = parser.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run", help="run a command with DOCKER_HOST set to a usable engine")
    run.add_argument("--image", default=TEST_IMAGE, help="busybox image to import if missing")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run needs a command after --")
    engine = DockerEngine(image=args.image)
    env = dict(os.environ)
    try:
        engine.start()
        env["DOCKER_HOST"] = engine.host
        print(f"==> Docker engine: {engine.host} (image {args.image})", file=sys.stderr, flush=True)
    except EngineUnavailable as exc:
        print(f"==> WARNING: no Docker engine: {exc}", file=sys.stderr, flush=True)
    child = subprocess.Popen(command, env=env)
    forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        return child.wait()
    finally:
        engine.stop()


if __name__ == "__main__":
    import sys

    sys.exit(_run(sys.argv[1:]))
