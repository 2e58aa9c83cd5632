"""`yardmaster dev`: a server and a local agent in one command, on embedded state, with a demo
job whose output is shown live."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import aiodocker
import uvicorn

from yardmaster.server.sdk import RequestRefused, YardmasterClient
from yardmaster.server.observability.logging import configure_logging
from yardmaster.server.security.bootstrap import ADMIN_KEY_FILE
from yardmaster.server.serve import uvicorn_config
from yardmaster.server.settings import Settings

DEMO_IMAGE_ENV = "YM_DEV_IMAGE"
DEFAULT_DEMO_IMAGE = "yardmaster/busybox:latest"
DEMO_SCRIPT = (
    "echo 'hello from a hardened Yardmaster container';"
    " echo \"user: $(id -u), capabilities: $(grep CapEff /proc/self/status | cut -f2)\";"
    " touch /rootfs-write-test 2>/dev/null && echo 'root fs: writable' || echo 'root fs: read-only';"
    " echo \"network interfaces: $(ls /sys/class/net 2>/dev/null | tr '\\n' ' ')\";"
    " for i in 1 2 3 4 5; do echo \"tick $i\"; sleep 1; done; echo done"
)


def _say(line: str) -> None:
    print(f"[dev] {line}", file=sys.stderr, flush=True)


async def _docker_image_present(image: str) -> bool | None:
    """True/False when a Docker engine answers (image present or not); None when no engine."""
    try:
        async with aiodocker.Docker() as docker:
            await docker.system.info()
            try:
                await docker.images.inspect(image)
                return True
            except aiodocker.DockerError:
                return False
    except Exception:
        return None


def _agent_token(client: YardmasterClient, data_dir: Path) -> str:
    """The local agent's token: made once and kept (0600) in the data dir."""
    path = data_dir / "dev-agent-token"
    if path.exists():
        token = path.read_text().strip()
        names = {a["name"]: a for a in client.list_agents()}
        local = names.get("local")
        if token and local is not None and local.get("revoked_at") is None:
            return token
    created = client.create_agent("local", labels=["local"], capacity=2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(created["token"] + "\n")
    return str(created["token"])


def _run_demo(client: YardmasterClient, command: str, image: str | None) -> None:
    spec: dict[str, object] = {"image": image or "local", "command": command, "timeout_s": 120}
    if image is None:
        spec["executor"] = "process"  # only jobs that ask for it are placed on a process agent
    job = client.submit_job(spec)
    _say(f"demo job {job['id']} submitted; its output, live:")

    def on_log(log: object) -> None:
        stream = sys.stdout if getattr(log, "stream", "stdout") == "stdout" else sys.stderr
        stream.write(getattr(log, "text", ""))
        stream.flush()

    final = client.follow_logs(job["id"], 0, on_log=on_log)
    _say(f"demo job {final.state} (exit code {final.exit_code})")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_dev(settings: Settings, *, executor: str = "auto", demo: bool = True) -> int:
    # Ctrl-C and SIGTERM stop dev at any point (also when SIGINT was ignored at start, as it is
    # for a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    configure_logging("warning" if settings.log_level == "info" else settings.log_level)
    image = os.environ.get(DEMO_IMAGE_ENV, DEFAULT_DEMO_IMAGE)
    if executor == "auto":
        present = asyncio.run(_docker_image_present(image))
        if present is None:
            executor = "process"
            _say("WARNING: no Docker engine reachable (DOCKER_HOST); jobs run UNSANDBOXED as local processes")
        else:
            executor = "docker"
            if not present:
                _say(f"WARNING: image {image} is not in the Docker engine; the demo job will fail (no pulls)")
    url = f"http://{settings.host}:{settings.port}"
    server = uvicorn.Server(uvicorn_config(settings))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            _say("the server did not start (is the port in use?)")
            return 1
        thread.join(0.05)
    data_dir = Path(settings.data_dir)
    # With YM_ADMIN_KEY the server makes no admin-key file: the configured key is the admin key.
    key = settings.admin_key or (data_dir / ADMIN_KEY_FILE).read_text().strip()
    client = YardmasterClient(url, key)
    agent: subprocess.Popen[bytes] | None = None
    try:
        token = _agent_token(client, data_dir)
        env = {**os.environ, "YM_AGENT_TOKEN": token}
        agent = subprocess.Popen(
            [sys.executable, "-m", "yardmaster.agent", "--server", url, "--executor", executor, "--name", "local", "--label", "local"],
            env=env,
        )
        _say(f"Yardmaster is running at {url} (state in {data_dir}/, executor: {executor})")
        if settings.admin_key:
            _say("admin API key: the one in YM_ADMIN_KEY")
        else:
            _say(f"admin API key: {key}  (also in {data_dir}/{ADMIN_KEY_FILE})")
        how = f"--image {image}" if executor == "docker" else "--image local --executor process"
        _say(f"try: YM_URL={url} yardmaster submit {how} --follow -- echo hi")
        if demo:
            _run_demo(client, DEMO_SCRIPT, image if executor == "docker" else None)
        _say("serving; press Ctrl-C to stop")
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        pass
    except RequestRefused as exc:
        _say(f"error: {exc}")
        return 1
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
        server.should_exit = True
        thread.join(15)
        client.close()
    return 0
