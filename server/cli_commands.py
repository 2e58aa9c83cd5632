"""The user commands of the `yardmaster` CLI: submit, submit-batch, logs, jobs, job, cancel, agents,
login, logout, whoami, keys, users, audit.

server/cli.py owns the top-level parser; it calls `add_client_commands(subparsers)` and then
`dispatch_client_command(args)`, which returns an exit code (or None for a command that is not
one of these). Errors are one `error: ...` line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, get_args

from yardmaster.protocol import messages as m
from yardmaster.protocol import urls
from yardmaster.server.cli_auth import (
    DEFAULT_DATA_DIR,
    DEFAULT_URL,
    Credential,
    CredentialsError,
    CredentialStore,
    NotSignedIn,
    StoredSession,
    resolve_credential,
    resolve_url,
)
from yardmaster.server.backends.records import Role
from yardmaster.server.sdk import (
    RequestRefused,
    ServerUnreachable,
    YardmasterClient,
    plaintext_credential_warning,
    retry_hint,
    tls_context,
)
from yardmaster.server.security.scopes import Scope

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")

# Exit codes of `submit --follow` for outcomes that have no exit code of their own
# (the conventions of `timeout(1)` and of a shell interrupted by SIGINT).
EXIT_FAILED_NO_CODE = 1
EXIT_LOST = 2
EXIT_TIMED_OUT = 124
EXIT_CANCELLED = 130

Handler = Callable[[argparse.Namespace, YardmasterClient], int]
ROLES: tuple[str, ...] = get_args(Role)
SCOPES: tuple[str, ...] = get_args(Scope)


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


def error_line(exc: Exception, url: str, submitting: bool = False, session: bool = False) -> str:
    """One line for stderr describing an error, without the `error: ` prefix. `session`: the
    command used the stored session of `yardmaster login` (not an API key)."""
    if isinstance(exc, ServerUnreachable):
        return f"cannot reach the server at {url}: {exc.reason}"
    if isinstance(exc, (UsageError, NotSignedIn, CredentialsError)):
        return str(exc)
    if isinstance(exc, RequestRefused):
        where = f"{exc.field}: " if exc.field else ""
        if exc.code == "invalid-credentials":
            return "sign-in refused: wrong username or password"
        if exc.code == "too-many-attempts":
            wait = f"; try again in {int(exc.retry_after + 0.999)} s" if exc.retry_after is not None else ""
            return f"too many failed sign-ins{wait}"
        if exc.status == 401 or exc.code == "unauthorized":
            if session:
                return f"your session at {url} has ended (signed out, expired or revoked): run `yardmaster login`"
            return "the API key was refused"
        if exc.status == 422 or exc.code == "invalid-spec":
            what = "invalid job spec" if exc.code == "invalid-spec" or submitting else "invalid request"
            return f"{what}: {where}{exc.message}"
        if exc.status == 403 or exc.code == "forbidden":
            return f"permission denied: {exc.message}"
        if exc.code == "conflict":
            return f"conflict: {where}{exc.message}"
        if exc.status == 404 or exc.code in ("not-found", "unknown-job"):
            return f"not found: {exc.message}"
        if exc.status == 429:
            what = {"rate-limited": "rate limited by the server", "quota-exceeded": "quota exceeded"}.get(exc.code, "refused for now")
            return f"{what} ({exc.code}): {exc.message}{retry_hint(exc.message, exc.retry_after)}"
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


# ---- sign-in -------------------------------------------------------------------------------


def urls_warning(url: str, what: str) -> str | None:
    return urls.plaintext_credential_warning(url, what, "use https://")


class Context:
    """What `login` and `logout` work with besides a client: the server, the credentials file."""

    def __init__(self, url: str, store: CredentialStore, ca_file: str | None, environ: Any) -> None:
        self.url = url
        self.store = store
        self.ca_file = ca_file
        self.environ = environ

    def anonymous_client(self) -> YardmasterClient:
        return YardmasterClient(self.url, ca_file=self.ca_file)

    def session_client(self, session: StoredSession) -> YardmasterClient:
        return YardmasterClient(self.url, tokens=session.tokens(), ca_file=self.ca_file,
                                renew=lambda stale, exchange: self.store.renew(self.url, stale, exchange))


SessionHandler = Callable[[argparse.Namespace, Context], int]


def read_password(from_stdin: bool, prompt: str = "Password: ", confirm: bool = False,
                  stdin: TextIO | None = None) -> str:
    """The password from stdin (`--password-stdin`: all of it but the final line break), else
    asked on the terminal without echo. Never from an argument: those show in `ps`."""
    if from_stdin:
        text = (stdin or sys.stdin).read()
        password = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
        if not password:
            raise UsageError("--password-stdin: stdin holds no password")
        return password
    try:
        with warnings.catch_warnings():
            # getpass falls back to reading stdin WITH echo when there is no terminal: refuse instead.
            warnings.simplefilter("error", getpass.GetPassWarning)
            password = getpass.getpass(prompt)
            if confirm and getpass.getpass("Repeat the password: ") != password:
                raise UsageError("the passwords differ")
    except getpass.GetPassWarning:
        raise UsageError("no terminal to ask for the password without echo: pipe it in with --password-stdin") from None
    except EOFError:
        raise UsageError("no password given") from None
    if not password:
        raise UsageError("no password given")
    return password


def _ask_username() -> str:
    if not sys.stdin.isatty():
        raise UsageError("give --username (there is no terminal to ask on)")
    sys.stderr.write("Username: ")
    sys.stderr.flush()
    username = sys.stdin.readline().strip()
    if not username:
        raise UsageError("no username given")
    return username


def cmd_login(args: argparse.Namespace, ctx: Context) -> int:
    if args.password_stdin and not args.username:
        raise UsageError("--password-stdin needs --username (stdin holds the password)")
    username = args.username or _ask_username()
    password = read_password(args.password_stdin)
    with ctx.anonymous_client() as client:
        tokens = client.sign_in(username, password)
        if not tokens.refresh_token:
            raise UsageError("the server sent no refresh token, so there is no session to keep")
        me = client.whoami()
    tokens = client.tokens or tokens  # whoami may have renewed them
    session = StoredSession(url=ctx.url, username=str(me.get("username") or username), user_id=me.get("id"),
                            refresh_token=tokens.refresh_token or "", access_token=tokens.access_token,
                            access_expires_at=tokens.expires_at, saved_at=time.time())
    ctx.store.save(session, make_default=True)
    print(f"signed in to {ctx.url} as {session.username} (role {me.get('role', '?')})")
    sys.stderr.write(f"session saved in {ctx.store.path}\n")
    if ctx.environ.get("YM_API_KEY"):
        sys.stderr.write("note: YM_API_KEY is set, and commands use it rather than this session\n")
    return 0


def cmd_logout(args: argparse.Namespace, ctx: Context) -> int:
    session = ctx.store.get(ctx.url)
    if session is None:
        print(f"not signed in to {ctx.url}")
        return 0
    ended = ""
    with ctx.session_client(session) as client:
        try:
            client.logout()
        except RequestRefused as exc:
            if exc.status != 401:
                raise
            ended = " (the session had already ended)"
    # Only now: a server that could not be reached keeps the session for another try.
    ctx.store.remove(ctx.url)
    print(f"signed out of {ctx.url}{ended}")
    return 0


def _full_name(user: dict[str, Any]) -> str:
    return " ".join(p for p in (user.get("first_name"), user.get("last_name")) if p)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def cmd_whoami(args: argparse.Namespace, client: YardmasterClient) -> int:
    me = client.whoami()
    if args.json:
        _print_json(me)
        return 0
    credential: Credential | None = getattr(args, "credential", None)
    rows = [("username", me.get("username")), ("id", me.get("id")), ("role", me.get("role")),
            ("email", me.get("email")), ("name", _full_name(me)), ("server", client.base_url),
            ("signed in with", credential.describe() if credential else None)]
    for label, value in rows:
        print(f"{label + ':':<16}{_none(value)}")
    return 0


# ---- keys ----------------------------------------------------------------------------------


def _key_status(key: dict[str, Any]) -> str:
    if key.get("revoked_at"):
        return "revoked"
    return "active"


def _scopes_text(scopes: Any) -> str:
    return "all of the role" if scopes is None else (",".join(scopes) or "none")


def cmd_keys(args: argparse.Namespace, client: YardmasterClient) -> int:
    keys = client.list_keys(all_users=getattr(args, "all", False))
    if getattr(args, "json", False):
        _print_json(keys)
        return 0
    rows = [[k["id"], _short(str(k.get("name", "")), 24), _none(k.get("prefix") or k.get("hint")),
             _scopes_text(k.get("scopes")), _none(k.get("owner")), _none(k.get("created_at")),
             _none(k.get("expires_at")), _none(k.get("last_used_at")), _key_status(k)] for k in keys]
    _table(rows, ["ID", "NAME", "PREFIX", "SCOPES", "OWNER", "CREATED", "EXPIRES", "LAST USED", "STATUS"], sys.stdout)
    return 0


def cmd_keys_create(args: argparse.Namespace, client: YardmasterClient) -> int:
    key = client.create_key(args.name, expires_in_days=args.expires_in_days, scopes=args.scope or None)
    if args.json:
        _print_json(key)
    else:
        print(f"id:      {key['id']}")
        print(f"name:    {key.get('name', args.name)}")
        print(f"scopes:  {_scopes_text(key.get('scopes'))}")
        print(f"expires: {_none(key.get('expires_at'))}")
        print(f"key:     {key['key']}")
    sys.stderr.write("warning: the key is shown only this once; store it now (it cannot be shown again)\n")
    return 0


def cmd_keys_revoke(args: argparse.Namespace, client: YardmasterClient) -> int:
    key = client.revoke_key(args.id)
    print(f"key {key.get('id', args.id)}" + (f" ({key['name']})" if key.get("name") else "") + " revoked")
    return 0


# ---- users ---------------------------------------------------------------------------------


def find_user(client: YardmasterClient, ref: str) -> dict[str, Any]:
    """A user by id, else by username (case-insensitive; read from the listing)."""
    try:
        return client.get_user(ref)
    except RequestRefused as exc:
        if exc.status != 404:
            raise
    after: str | None = None
    while True:
        page = client.list_users(limit=500, after=after)
        for user in page.get("users") or []:
            if str(user.get("username", "")).casefold() == ref.casefold():
                return user
        after = page.get("next")
        if not after:
            raise RequestRefused(404, "not-found", f"no user with id or username {ref!r}")


def _user_status(user: dict[str, Any]) -> str:
    return "disabled" if user.get("disabled") or user.get("disabled_at") else "active"


def cmd_users(args: argparse.Namespace, client: YardmasterClient) -> int:
    page = client.list_users(limit=getattr(args, "limit", None), after=getattr(args, "after", None))
    users = page.get("users") or []
    if getattr(args, "json", False):
        _print_json(page)
        return 0
    rows = [[u["id"], str(u.get("username", "")), _none(u.get("email")), _short(_full_name(u), 30) or "-",
             str(u.get("role", "")), _user_status(u), _none(u.get("created_at")), _none(u.get("last_login_at"))]
            for u in users]
    _table(rows, ["ID", "USERNAME", "EMAIL", "NAME", "ROLE", "STATUS", "CREATED", "LAST LOGIN"], sys.stdout)
    if page.get("next"):
        sys.stderr.write(f"(more users: --after {page['next']})\n")
    return 0


def cmd_users_create(args: argparse.Namespace, client: YardmasterClient) -> int:
    password = None if args.no_password else read_password(args.password_stdin, "Password for the new user: ",
                                                           confirm=True)
    profile = {"email": args.email, "first_name": args.first_name, "last_name": args.last_name,
               "phone": args.phone, "role": args.role}
    user = client.create_user(args.username, password, **profile)
    if args.json:
        _print_json(user)
    else:
        print(f"user {user.get('id')} ({user.get('username', args.username)}) created, role {user.get('role', '?')}")
    return 0


def cmd_users_update(args: argparse.Namespace, client: YardmasterClient) -> int:
    disabled = True if args.disable else False if args.enable else None
    if args.role is None and disabled is None:
        raise UsageError("nothing to change: give --role, --disable or --enable")
    user = client.update_user(find_user(client, args.user)["id"], role=args.role, disabled=disabled)
    if args.json:
        _print_json(user)
    else:
        print(f"user {user.get('id')} ({user.get('username', '?')}): role {user.get('role', '?')}, {_user_status(user)}")
    return 0


# ---- audit ---------------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float) -> str:
    """`--since`: a duration back from now (`90s`, `15m`, `2h`, `7d`, `1w`) or a date or time
    without a zone (`2025-01-31`, `2025-01-31T09:00`: this machine's local time) becomes Unix
    seconds; RFC 3339 with a zone and Unix seconds go to the server as they are (it checks them)."""
    text = text.strip()
    match = _DURATION.match(text)
    if match:
        return f"{now - float(match.group(1)) * _UNIT_S[match.group(2)]:.3f}"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return text
    if when.tzinfo is not None:
        return text
    return f"{when.timestamp():.3f}"  # a naive datetime's timestamp() is local time


def _details_text(details: Any) -> str:
    if not details:
        return "-"
    if isinstance(details, dict):
        return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
                        for k, v in sorted(details.items()))
    return json.dumps(details)


def cmd_audit(args: argparse.Namespace, client: YardmasterClient) -> int:
    since = parse_since(args.since, time.time()) if args.since else None
    page = client.list_audit(actor=args.actor, action=args.action, since=since, before=args.before, limit=args.limit)
    if args.json:
        _print_json(page)
        return 0
    rows = [[_none(e.get("at")), str(e.get("action", "")), _none(e.get("actor")), _none(e.get("target")),
             _none(e.get("client_address")), _short(_details_text(e.get("details")), 60)]
            for e in page.get("entries") or []]
    _table(rows, ["AT", "ACTION", "ACTOR", "TARGET", "CLIENT", "DETAILS"], sys.stdout)
    if page.get("next"):
        sys.stderr.write(f"(more entries: --before {page['next']})\n")
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


def _common_options(api_key: bool = True) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server")
    # SUPPRESS: a nested subcommand (agents create) must not reset a value given before it.
    group.add_argument("--url", default=argparse.SUPPRESS,
                       help=f"server URL (env YM_URL, else the server of `yardmaster login`, else {DEFAULT_URL})")
    if api_key:
        group.add_argument("--api-key", default=argparse.SUPPRESS,
                           help="API key (env YM_API_KEY, else the session of `yardmaster login`, "
                                "else the file $YM_DATA_DIR/admin-key)")
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

    _add_account_commands(subparsers, common)


def _json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")


def _add_account_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    server_only = _common_options(api_key=False)

    p = subparsers.add_parser("login", parents=[server_only], help="sign in with a password and keep the session",
                              description="Sign in to the server and keep the session (a refresh token, never the "
                                          "password) in $XDG_CONFIG_HOME/yardmaster/credentials.json, mode 0600. "
                                          "Later commands use it unless --api-key or YM_API_KEY is given.")
    p.add_argument("--username", "-u", help="username or email (asked when not given)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin instead of asking")
    p.set_defaults(session_handler=cmd_login)

    p = subparsers.add_parser("logout", parents=[server_only], help="end the session of `yardmaster login`",
                              description="Revoke the session on the server and remove it from the credentials file.")
    p.set_defaults(session_handler=cmd_logout)

    p = subparsers.add_parser("whoami", parents=[common], help="show the user the credential belongs to")
    _json_option(p)
    p.set_defaults(client_handler=cmd_whoami, json=False)

    p = subparsers.add_parser("keys", parents=[common], help="list, create or revoke your API keys")
    p.add_argument("--all", action="store_true", default=argparse.SUPPRESS, help="everyone's keys (admin)")
    _json_option(p)
    p.set_defaults(client_handler=cmd_keys)
    keys_sub = p.add_subparsers(dest="keys_command", metavar="{list,create,revoke}")
    q = keys_sub.add_parser("list", parents=[common], help="list your keys (the default)")
    q.add_argument("--all", action="store_true", default=argparse.SUPPRESS, help="everyone's keys (admin)")
    _json_option(q)
    q.set_defaults(client_handler=cmd_keys)
    q = keys_sub.add_parser("create", parents=[common], help="create a key and print its secret once")
    q.add_argument("name")
    q.add_argument("--expires-in-days", type=_positive_int, metavar="N", help="expire after N days (default: never)")
    q.add_argument("--scope", action="append", default=[], choices=SCOPES,
                   help="limit the key to this scope (repeatable; default: every scope of your role)")
    _json_option(q)
    q.set_defaults(client_handler=cmd_keys_create, json=False)
    q = keys_sub.add_parser("revoke", parents=[common], help="revoke a key (its open sockets close)")
    q.add_argument("id")
    q.set_defaults(client_handler=cmd_keys_revoke)

    p = subparsers.add_parser("users", parents=[common], help="list, create or update users (admin)")
    p.add_argument("--limit", type=_positive_int, default=argparse.SUPPRESS)
    p.add_argument("--after", metavar="ID", default=argparse.SUPPRESS, help="the page after this user id")
    _json_option(p)
    p.set_defaults(client_handler=cmd_users)
    users_sub = p.add_subparsers(dest="users_command", metavar="{list,create,update}")
    q = users_sub.add_parser("list", parents=[common], help="list users (the default)")
    q.add_argument("--limit", type=_positive_int, default=argparse.SUPPRESS)
    q.add_argument("--after", metavar="ID", default=argparse.SUPPRESS, help="the page after this user id")
    _json_option(q)
    q.set_defaults(client_handler=cmd_users)
    q = users_sub.add_parser("create", parents=[common], help="create a user (asks for the password)")
    q.add_argument("username")
    q.add_argument("--email")
    q.add_argument("--first-name")
    q.add_argument("--last-name")
    q.add_argument("--phone")
    q.add_argument("--role", choices=ROLES, help="default: user")
    how = q.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true", help="read the password from stdin instead of asking")
    how.add_argument("--no-password", action="store_true", help="no password: the user signs in by single sign-on only")
    _json_option(q)
    q.set_defaults(client_handler=cmd_users_create, json=False)
    q = users_sub.add_parser("update", parents=[common], help="change a user's role, or disable or enable them")
    q.add_argument("user", help="user id or username")
    q.add_argument("--role", choices=ROLES)
    state = q.add_mutually_exclusive_group()
    state.add_argument("--disable", action="store_true", help="refuse their sign-ins, keys and sessions from now on")
    state.add_argument("--enable", action="store_true")
    _json_option(q)
    q.set_defaults(client_handler=cmd_users_update, json=False)

    p = subparsers.add_parser("audit", parents=[common], help="show the audit log, newest first (admin)")
    p.add_argument("--actor", help="only entries of this user id")
    p.add_argument("--action", help="only this action, or a prefix ending in '.' (login.)")
    p.add_argument("--since", help="from this time on: 15m, 2h, 7d, RFC 3339 or Unix seconds")
    p.add_argument("--before", metavar="ID", help="the page before this entry id")
    p.add_argument("--limit", type=_positive_int, help="entries per page (server default 100)")
    _json_option(p)
    p.set_defaults(client_handler=cmd_audit, json=False)


def is_client_command(args: argparse.Namespace) -> bool:
    return getattr(args, "client_handler", None) is not None or getattr(args, "session_handler", None) is not None


def _client_for(credential: Credential, ctx: Context) -> YardmasterClient:
    if credential.session is not None:
        return ctx.session_client(credential.session)
    return YardmasterClient(credential.url, credential.api_key, ca_file=ctx.ca_file)


def run_client_command(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str] | None = None) -> int:
    """Run a parsed user command; returns the process exit code."""
    env = os.environ if environ is None else environ
    store = CredentialStore.for_environ(env)
    url = (getattr(args, "url", None) or env.get("YM_URL") or DEFAULT_URL).rstrip("/")
    handler: Handler | None = getattr(args, "client_handler", None)
    session_handler: SessionHandler | None = getattr(args, "session_handler", None)
    credential: Credential | None = None
    try:
        url = resolve_url(getattr(args, "url", None), env, store)
        ca_file = getattr(args, "ca_file", None) or env.get("YM_CA_FILE") or None
        try:
            tls_context(ca_file)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        ctx = Context(url, store, ca_file, env)
        if session_handler is not None:
            if (warning := urls_warning(url, "the password and session tokens")) is not None:
                sys.stderr.write(f"warning: {warning}\n")
            return session_handler(args, ctx)
        assert handler is not None
        credential = resolve_credential(getattr(args, "api_key", None), url, env, store)
        args.credential = credential
        if (warning := plaintext_credential_warning(url)) is not None:
            sys.stderr.write(f"warning: {warning}\n")
        with _client_for(credential, ctx) as client:
            return handler(args, client)
    except (RequestRefused, ServerUnreachable, UsageError, NotSignedIn, CredentialsError) as exc:
        session = session_handler is not None or (credential is not None and credential.kind == "session")
        line = error_line(exc, url, submitting=handler in (cmd_submit, cmd_submit_batch), session=session)
        sys.stderr.write(f"error: {line}\n")
        return 2 if isinstance(exc, (UsageError, NotSignedIn)) else 1
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
