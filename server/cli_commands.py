"""The user commands of the `yardmaster` CLI: submit, submit-batch, logs, jobs, job, cancel, agents.

server/cli.py owns the top-level parser; it calls `add_client_commands(subparsers)` and then
`dispatch_client_command(args)`, which returns an exit code (or None for a command that is not
one of these). Errors are one `error: ...` line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from yardmaster.protocol import messages as m
from yardmaster.server.sdk import (
    RequestRefused,
    ServerUnreachable,
    YardmasterClient,
    plaintext_credential_warning,
    tls_context,
)

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_DATA_DIR = "./.yardmaster"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Exit codes of `submit --follow` for outcomes that have no exit code of their own
# (the conventions of `timeout(1)` and of a shell interrupted by SIGINT).
EXIT_FAILED_NO_CODE = 1
EXIT_LOST = 2
EXIT_TIMED_OUT = 124
EXIT_CANCELLED = 130

Handler = Callable[[argparse.Namespace, YardmasterClient], int]


class UsageError(Exception):
    """A bad argument found before talking to the server."""


# ---- pure parts ----------------------------------------------------------------------------


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """`--env NAME=VALUE` options into a dict; the value may be empty or contain `=`."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"invalid --env {item!r}: expected NAME=VALUE")
        if not _ENV_NAME.match(name):
            raise UsageError(f"invalid --env {item!r}: {name!r} is not a valid variable name")
        env[name] = value
    return env


def command_from_words(words: Sequence[str]) -> list[str] | str:
    """The words after `--`: one word containing whitespace is a shell string, else an argv."""
    words = list(words)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise UsageError("no command given: yardmaster submit --image IMAGE -- COMMAND [ARG...]")
    if len(words) == 1 and any(c.isspace() for c in words[0]):
        return words[0]
    return words


def build_job_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The job spec of `submit`. Options left unset are omitted, so the server's defaults apply."""
    spec: dict[str, Any] = {"image": args.image, "command": command_from_words(args.argv)}
    if args.env:
        spec["env"] = parse_env(args.env)
    if args.label:
        spec["labels"] = list(args.label)
    if args.timeout is not None:
        spec["timeout_s"] = args.timeout
    if args.priority is not None:
        spec["priority"] = args.priority
    if args.max_attempts is not None:
        spec["max_attempts"] = args.max_attempts
    resources: dict[str, Any] = {}
    if args.cpus is not None:
        resources["cpus"] = args.cpus
    if args.memory_mb is not None:
        resources["memory_mb"] = args.memory_mb
    if resources:
        spec["resources"] = resources
    if getattr(args, "executor", None) is not None:
        spec["executor"] = args.executor
    return spec


def exit_code_for(state: str, exit_code: int | None) -> int:
    """The CLI's exit code for a finished job."""
    if state == "succeeded":
        return 0
    if state == "timed-out":
        return EXIT_TIMED_OUT
    if state == "cancelled":
        return EXIT_CANCELLED
    if state == "lost":
        return EXIT_LOST
    if exit_code is not None and 0 < exit_code < 256:
        return exit_code
    return EXIT_FAILED_NO_CODE


def error_line(exc: Exception, url: str, submitting: bool = False) -> str:
    """One line for stderr describing an error, without the `error: ` prefix."""
    if isinstance(exc, ServerUnreachable):
        return f"cannot reach the server at {url}: {exc.reason}"
    if isinstance(exc, UsageError):
        return str(exc)
    if isinstance(exc, RequestRefused):
        where = f"{exc.field}: " if exc.field else ""
        if exc.status == 401 or exc.code == "unauthorized":
            return "the API key was refused"
        if exc.status == 422 or exc.code == "invalid-spec":
            what = "invalid job spec" if exc.code == "invalid-spec" or submitting else "invalid request"
            return f"{what}: {where}{exc.message}"
        if exc.status == 403 or exc.code == "forbidden":
            return f"permission denied: {exc.message}"
        if exc.status == 404 or exc.code in ("not-found", "unknown-job"):
            return f"not found: {exc.message}"
        if exc.status == 429:
            return f"rate limited by the server: {exc.message}"
        if exc.status >= 500:
            return f"server error ({exc.status}): {exc.message}"
        return exc.message if exc.status == 0 else f"{exc.message} ({exc.status} {exc.code})"
    return str(exc)


def resolve_api_key(explicit: str | None, environ: dict[str, str] | os._Environ[str]) -> str:
    if explicit:
        return explicit
    if environ.get("YM_API_KEY"):
        return environ["YM_API_KEY"]
    path = Path(environ.get("YM_DATA_DIR") or DEFAULT_DATA_DIR) / "admin-key"
    try:
        key = path.read_text().strip()
    except OSError:
        key = ""
    if not key:
        raise UsageError(f"no API key: pass --api-key, set YM_API_KEY, or start the server so that it writes {path}")
    return key


# ---- output --------------------------------------------------------------------------------


def _table(rows: list[list[str]], headers: list[str], out: TextIO) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        out.write("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _command_text(spec: dict[str, Any]) -> str:
    cmd = spec.get("command")
    return cmd if isinstance(cmd, str) else " ".join(cmd or [])


def _none(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _write_log(log: m.Log) -> None:
    out = sys.stderr if log.stream == "stderr" else sys.stdout
    out.write(log.text)
    out.flush()


def _note_truncated(msg: m.Truncated) -> None:
    sys.stderr.write(f"[yardmaster: earlier output of job {msg.job_id} is gone; resuming at offset {msg.offset}]\n")


def _follow(client: YardmasterClient, job_id: str, from_offset: int) -> m.JobStateMsg:
    try:
        return client.follow_logs(job_id, from_offset=from_offset, on_log=_write_log, on_truncated=_note_truncated)
    except KeyboardInterrupt:
        sys.stderr.write(f"\ninterrupted; job {job_id} keeps running (yardmaster cancel {job_id} stops it)\n")
        raise SystemExit(EXIT_CANCELLED) from None


# ---- commands ------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace, client: YardmasterClient) -> int:
    job = client.submit_job(build_job_spec(args))
    if not args.follow:
        print(job["id"])
        return 0
    sys.stderr.write(f"job {job['id']} {job.get('state', 'queued')}\n")
    final = _follow(client, job["id"], 0)
    if final.state != "succeeded":
        detail = f" (exit code {final.exit_code})" if final.exit_code is not None else ""
        reason = f": {final.error}" if final.error else ""
        sys.stderr.write(f"job {job['id']} {final.state}{detail}{reason}\n")
    return exit_code_for(final.state, final.exit_code)


def read_batch_file(path: str, stdin: TextIO | None = None) -> list[Any]:
    """The specs of `submit-batch`: a JSON array of job specs (or one spec) in a file, `-` for stdin."""
    try:
        text = (stdin or sys.stdin).read() if path == "-" else Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        specs = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from None
    if isinstance(specs, dict):
        return [specs]
    if not isinstance(specs, list):
        raise UsageError(f"{path} must hold a JSON array of job specs")
    return specs


def cmd_submit_batch(args: argparse.Namespace, client: YardmasterClient) -> int:
    for job in client.submit_jobs(read_batch_file(args.file)):
        print(job["id"])
    return 0


def cmd_logs(args: argparse.Namespace, client: YardmasterClient) -> int:
    if args.follow:
        _follow(client, args.job, args.from_offset)
        return 0
    for log in client.iter_logs(args.job, args.from_offset):
        _write_log(log)
    return 0


def cmd_jobs(args: argparse.Namespace, client: YardmasterClient) -> int:
    page = client.list_jobs(state=args.state, limit=args.limit)
    rows = [
        [j["id"], j["state"], str(j.get("attempt", "")), _none(j.get("exit_code")), str(j.get("priority", 0)),
         _short(str((j.get("spec") or {}).get("image", "")), 24), _short(_command_text(j.get("spec") or {}), 40),
         _none(j.get("created_at"))]
        for j in page.get("jobs") or []
    ]
    _table(rows, ["ID", "STATE", "ATTEMPT", "EXIT", "PRIO", "IMAGE", "COMMAND", "CREATED"], sys.stdout)
    if page.get("next"):
        sys.stderr.write(f"(more jobs; showing the newest {len(rows)}, use --limit for more)\n")
    return 0


def cmd_job(args: argparse.Namespace, client: YardmasterClient) -> int:
    print(json.dumps(client.get_job(args.job), indent=2, sort_keys=True))
    return 0


def cmd_cancel(args: argparse.Namespace, client: YardmasterClient) -> int:
    job = client.cancel_job(args.job)
    print(f"job {job.get('id', args.job)} {job.get('state', 'cancelling')}")
    return 0


def cmd_agents(args: argparse.Namespace, client: YardmasterClient) -> int:
    rows = []
    for a in client.list_agents():
        status = "revoked" if a.get("revoked_at") else ("connected" if a.get("connected") else "offline")
        rows.append([a["id"], a.get("name", ""), ",".join(a.get("labels") or []) or "-", str(a.get("capacity", "")),
                     status, _none(a.get("last_seen_at")), _none(a.get("version")), _none(a.get("executor"))])
    _table(rows, ["ID", "NAME", "LABELS", "CAPACITY", "STATUS", "LAST SEEN", "VERSION", "EXECUTOR"], sys.stdout)
    return 0


def cmd_agents_create(args: argparse.Namespace, client: YardmasterClient) -> int:
    agent = client.create_agent(args.name, labels=args.label or [], capacity=args.capacity)
    print(f"id:    {agent['id']}")
    print(f"name:  {agent.get('name', args.name)}")
    print(f"token: {agent['token']}")
    sys.stderr.write("warning: the agent token is shown only this once; store it now (it cannot be shown again)\n")
    return 0


def cmd_agents_update(args: argparse.Namespace, client: YardmasterClient) -> int:
    if args.clear_labels and args.label:
        raise UsageError("--clear-labels and --label exclude each other")
    labels = [] if args.clear_labels else (args.label or None)
    if labels is None and args.capacity is None:
        raise UsageError("nothing to change: give --label, --clear-labels or --capacity")
    agent = client.update_agent(args.id, labels=labels, capacity=args.capacity)
    print(f"agent {agent.get('id', args.id)} ({agent.get('name', '?')}): "
          f"labels {','.join(agent.get('registered_labels') or []) or '-'}, "
          f"capacity {agent.get('registered_capacity', '?')} registered; "
          f"effective labels {','.join(agent.get('labels') or []) or '-'}, capacity {agent.get('capacity', '?')}")
    return 0


def cmd_agents_drain(args: argparse.Namespace, client: YardmasterClient) -> int:
    agent = client.drain_agent(args.id)
    where = "it finishes its running jobs, then disconnects" if agent.get("connected") else "it is not connected"
    print(f"agent {agent.get('id', args.id)} ({agent.get('name', '?')}) draining: {where}")
    return 0


def cmd_agents_revoke(args: argparse.Namespace, client: YardmasterClient) -> int:
    agent = client.revoke_agent(args.id)
    print(f"agent {agent.get('id', args.id)} ({agent.get('name', '?')}) revoked")
    return 0


# ---- parser --------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    # SUPPRESS: a nested subcommand (agents create) must not reset a value given before it.
    group.add_argument("--url", default=argparse.SUPPRESS, help=f"server URL (env YM_URL, default {DEFAULT_URL})")
    group.add_argument("--api-key", default=argparse.SUPPRESS,
                       help="API key (env YM_API_KEY, else the file $YM_DATA_DIR/admin-key)")
    group.add_argument("--ca-file", default=argparse.SUPPRESS, metavar="PEM",
                       help="CA certificate(s) to trust for https:// instead of the defaults (env YM_CA_FILE)")
    return common


def add_client_commands(subparsers: Any) -> None:
    """Add the user commands to the top-level parser's subparsers."""
    common = _common_options()

    p = subparsers.add_parser("submit", parents=[common], help="submit a job",
                              usage="%(prog)s --image IMAGE [options] -- COMMAND [ARG...]")
    p.add_argument("--image", required=True, help="container image")
    p.add_argument("--label", action="append", default=[], help="label the agent must carry (repeatable)")
    p.add_argument("--timeout", type=_positive_int, help="timeout in seconds")
    p.add_argument("--priority", type=int, help="priority, -1000..1000 (higher runs first)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable (repeatable)")
    p.add_argument("--max-attempts", type=_positive_int, help="attempts before the job is lost")
    p.add_argument("--memory-mb", type=_positive_int, help="memory limit in MiB")
    p.add_argument("--cpus", type=float, help="CPU limit")
    p.add_argument("--executor", choices=("docker", "process"),
                   help="docker (default) or process: only `--executor process` agents run process jobs")
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream the logs and exit with the job's exit code")
    # dest "argv", not "command": the top-level parser usually stores the subcommand there.
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="the command after --; one word with spaces runs under sh -c")
    p.set_defaults(client_handler=cmd_submit)

    p = subparsers.add_parser("submit-batch", parents=[common], help="submit up to 1000 jobs from a JSON file, all or none",
                              description="Submit the job specs of FILE (a JSON array, as POST /api/v1/jobs takes) "
                                          "in one request: all are queued, or none. Prints the job ids in order.")
    p.add_argument("file", metavar="FILE", help="JSON file with an array of job specs; - reads stdin")
    p.set_defaults(client_handler=cmd_submit_batch)

    p = subparsers.add_parser("logs", parents=[common], help="print a job's logs")
    p.add_argument("job")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job finishes")
    p.add_argument("--from-offset", type=_non_negative_int, default=0, metavar="N")
    p.set_defaults(client_handler=cmd_logs)

    p = subparsers.add_parser("jobs", parents=[common], help="list jobs, newest first")
    p.add_argument("--state", help="only jobs in this state")
    p.add_argument("--limit", type=_positive_int, default=20)
    p.set_defaults(client_handler=cmd_jobs)

    p = subparsers.add_parser("job", parents=[common], help="show one job as JSON")
    p.add_argument("job")
    p.set_defaults(client_handler=cmd_job)

    p = subparsers.add_parser("cancel", parents=[common], help="cancel a job")
    p.add_argument("job")
    p.set_defaults(client_handler=cmd_cancel)

    p = subparsers.add_parser("agents", parents=[common], help="list, create or revoke agents")
    p.set_defaults(client_handler=cmd_agents)
    agent_sub = p.add_subparsers(dest="agents_command", metavar="{list,create,update,revoke,drain}")
    q = agent_sub.add_parser("list", parents=[common], help="list agents (the default)")
    q.set_defaults(client_handler=cmd_agents)
    q = agent_sub.add_parser("create", parents=[common], help="register an agent and print its token once")
    q.add_argument("name")
    q.add_argument("--label", action="append", default=[], help="label (repeatable)")
    q.add_argument("--capacity", type=_positive_int, help="concurrent job slots")
    q.set_defaults(client_handler=cmd_agents_create)
    q = agent_sub.add_parser("update", parents=[common], help="change an agent's registered labels or capacity")
    q.add_argument("id")
    q.add_argument("--label", action="append", default=[], help="registered label (repeatable; replaces the labels)")
    q.add_argument("--clear-labels", action="store_true", help="register no labels (the agent's own then apply)")
    q.add_argument("--capacity", type=_non_negative_int, help="concurrent job slots")
    q.set_defaults(client_handler=cmd_agents_update)
    q = agent_sub.add_parser("revoke", parents=[common], help="revoke an agent's token")
    q.add_argument("id")
    q.set_defaults(client_handler=cmd_agents_revoke)
    q = agent_sub.add_parser("drain", parents=[common], help="finish running jobs, take no new ones, disconnect")
    q.add_argument("id")
    q.set_defaults(client_handler=cmd_agents_drain)


def is_client_command(args: argparse.Namespace) -> bool:
    return getattr(args, "client_handler", None) is not None


def run_client_command(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str] | None = None) -> int:
    """Run a parsed user command; returns the process exit code."""
    env = os.environ if environ is None else environ
    url = (getattr(args, "url", None) or env.get("YM_URL") or DEFAULT_URL).rstrip("/")
    handler: Handler = args.client_handler
    try:
        api_key = resolve_api_key(getattr(args, "api_key", None), env)
        ca_file = getattr(args, "ca_file", None) or env.get("YM_CA_FILE") or None
        try:
            tls_context(ca_file)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if (warning := plaintext_credential_warning(url)) is not None:
            sys.stderr.write(f"warning: {warning}\n")
        with YardmasterClient(url, api_key, ca_file=ca_file) as client:
            return handler(args, client)
    except (RequestRefused, ServerUnreachable, UsageError) as exc:
        sys.stderr.write(f"error: {error_line(exc, url, submitting=handler in (cmd_submit, cmd_submit_batch))}\n")
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    except BrokenPipeError:
        # stdout closed early (`yardmaster logs X | head`): not an error.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        except OSError:
            pass
        return 0


def dispatch_client_command(args: argparse.Namespace) -> int | None:
    """The exit code of a user command, or None when `args` is not one of them."""
    if not is_client_command(args):
        return None
    return run_client_command(args)
