"""Command line entry: `python -m yardmaster.agent --server URL --token T ...`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

from yardmaster.agent import __version__
from yardmaster.agent.connection import (
    EXIT_FATAL_CLOSE,
    AgentConnection,
    AuthRefused,
    ConnectionSettings,
    FatalClose,
    agent_ws_url,
    plaintext_credential_warning,
    tls_context,
)
from yardmaster.agent.executors.base import Executor, ExecutorUnavailable
from yardmaster.agent.executors.docker import DockerExecutor
from yardmaster.agent.executors.process import ProcessExecutor
from yardmaster.agent.supervisor import AgentConfig, Supervisor

log = logging.getLogger("agent")

EXIT_USAGE = 2
EXIT_AUTH = 2
EXIT_EXECUTOR = 1


class ConfigError(ValueError):
    pass


@dataclass
class Options:
    urls: list[str]
    token: str
    name: str
    labels: list[str] = field(default_factory=list)
    capacity: int = 2
    executor: str = "docker"
    use_json: bool = False
    log_level: str = "INFO"
    ca_file: str | None = None


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m yardmaster.agent", description="Yardmaster host agent")
    p.add_argument("--server", action="append", default=[], metavar="URL",
                   help="server base URL, http(s):// or ws(s):// (repeatable; env YM_SERVER_URL, comma-separated)")
    p.add_argument("--token", help="agent token (env YM_AGENT_TOKEN)")
    p.add_argument("--name", help="agent name (env YM_AGENT_NAME, default: host name)")
    p.add_argument("--label", action="append", default=[], metavar="L", help="label (repeatable; env YM_AGENT_LABELS)")
    p.add_argument("--capacity", type=int, help="job slots (env YM_AGENT_CAPACITY, default 2)")
    p.add_argument("--executor", choices=("docker", "process"), help="env YM_AGENT_EXECUTOR, default docker")
    p.add_argument("--json", action="store_true", help="use the JSON subprotocol instead of MessagePack")
    p.add_argument("--ca-file", metavar="PEM", help="CA certificate(s) to trust for wss:// instead of the system's (env YM_CA_FILE)")
    p.add_argument("--log-level", default=os.environ.get("YM_LOG_LEVEL", "INFO"), help="default INFO")
    p.add_argument("--version", action="version", version=f"yardmaster-agent {__version__}")
    return p


def parse_options(argv: list[str] | None, env: dict[str, str] | os._Environ[str] = os.environ) -> Options:
    args = _parser().parse_args(argv)
    raw_urls = [u for s in args.server for u in _split(s)] or _split(env.get("YM_SERVER_URL"))
    if not raw_urls:
        raise ConfigError("no server URL: pass --server URL or set YM_SERVER_URL")
    try:
        urls = [agent_ws_url(u) for u in raw_urls]
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    token = args.token or env.get("YM_AGENT_TOKEN", "")
    if not token.strip():
        raise ConfigError("no agent token: pass --token or set YM_AGENT_TOKEN")
    capacity_raw = args.capacity if args.capacity is not None else env.get("YM_AGENT_CAPACITY", "2")
    try:
        capacity = int(capacity_raw)
    except ValueError:
        raise ConfigError(f"capacity must be an integer, not {capacity_raw!r}") from None
    if capacity < 1:
        raise ConfigError("capacity must be at least 1")
    executor = args.executor or env.get("YM_AGENT_EXECUTOR", "docker")
    if executor not in ("docker", "process"):
        raise ConfigError(f"unknown executor {executor!r} (docker or process)")
    level = str(args.log_level).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"unknown log level {args.log_level!r}")
    return Options(
        urls=urls,
        token=token.strip(),
        name=args.name or env.get("YM_AGENT_NAME") or socket.gethostname(),
        labels=args.label or _split(env.get("YM_AGENT_LABELS")),
        capacity=capacity,
        executor=executor,
        use_json=args.json,
        ca_file=_ca_file(args.ca_file or env.get("YM_CA_FILE")),
        log_level=level,
    )


def _ca_file(path: str | None) -> str | None:
    if not path or not path.strip():
        return None
    try:
        tls_context(path.strip())  # read now: a bad file is a usage error, not a reconnect loop
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return path.strip()


def _fail(message: str, code: int) -> int:
    print(f"yardmaster-agent: error: {message}", file=sys.stderr)
    return code


async def run_agent(opts: Options) -> int:
    executor: Executor
    if opts.executor == "docker":
        executor = DockerExecutor(opts.name)
    else:
        log.warning("process executor: jobs run UNSANDBOXED as this user on this host")
        executor = ProcessExecutor()
    try:
        await executor.open()
    except ExecutorUnavailable as exc:
        return _fail(str(exc), EXIT_EXECUTOR)
    supervisor = Supervisor(AgentConfig(name=opts.name, version=__version__, labels=opts.labels,
                                        capacity=opts.capacity), executor)
    conn = AgentConnection(ConnectionSettings(urls=opts.urls, token=opts.token, use_json=opts.use_json,
                                              ca_file=opts.ca_file), supervisor)
    for url in opts.urls:
        if (warning := plaintext_credential_warning(url)) is not None:
            log.warning("%s", warning)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, conn.request_stop)
    log.info("agent %s starting: executor %s, capacity %d, servers %s", opts.name, executor.name,
             opts.capacity, ", ".join(opts.urls))
    try:
        return await conn.run()
    except AuthRefused as exc:
        return _fail(str(exc), EXIT_AUTH)
    except FatalClose as exc:
        return _fail(str(exc), EXIT_FATAL_CLOSE)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await supervisor.shutdown()  # no container is left behind, whatever the exit path
        await executor.close()


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_options(argv)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    logging.basicConfig(stream=sys.stderr, level=opts.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # websockets logs handshake headers at DEBUG, and those carry the token.
    logging.getLogger("websockets").setLevel(max(logging.INFO, logging.getLevelName(opts.log_level)))
    try:
        return asyncio.run(run_agent(opts))
    except KeyboardInterrupt:
        return 0
