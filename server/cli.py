"""The `yardmaster` command: server, dev, agent, keygen, and the user commands of cli_commands."""

from __future__ import annotations

import argparse
import os
import sys

from yardmaster.server.cli_commands import add_client_commands, dispatch_client_command
from yardmaster.server.settings import SettingsError, load_settings


def _server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="listen address (YM_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (YM_PORT, default 8080)")
    p.add_argument("--data-dir", help="embedded state directory (YM_DATA_DIR, default ./.yardmaster)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yardmaster", description="WebSocket-first job orchestration.")
    sub = parser.add_subparsers(dest="command", required=True)
    _server_options(sub.add_parser("server", help="run a server replica"))
    dev = sub.add_parser("dev", help="server and a local agent in one command, on embedded state")
    _server_options(dev)
    dev.add_argument("--executor", choices=["auto", "docker", "process"], default="auto")
    dev.add_argument("--no-demo", action="store_true", help="do not run the demo job at start")
    sub.add_parser("agent", help="run a host agent (see `yardmaster agent --help`)", add_help=False)
    sub.add_parser("keygen", help="print a new admin API key for YM_ADMIN_KEY")
    add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "agent":
        # The agent is its own program (server and agent never import each other).
        os.execv(sys.executable, [sys.executable, "-m", "yardmaster.agent", *argv[1:]])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "server":
            from yardmaster.server.serve import serve

            serve(load_settings(host=args.host, port=args.port, data_dir=args.data_dir))
            return 0
        if args.command == "dev":
            from yardmaster.server.dev import run_dev

            return run_dev(
                load_settings(host=args.host, port=args.port, data_dir=args.data_dir),
                executor=args.executor,
                demo=not args.no_demo,
            )
        if args.command == "keygen":
            from yardmaster.server.security.tokens import new_token

            print(new_token("api-key"))
            return 0
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    code = dispatch_client_command(args)
    return 2 if code is None else code


if __name__ == "__main__":
    sys.exit(main())
