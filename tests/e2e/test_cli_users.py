"""`yardmaster login`, whoami, keys, users, audit and logout as a user types them, against a
real server process; the session lives in a real credentials file under XDG_CONFIG_HOME."""

from __future__ import annotations

import json
import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.cluster import REPO, HttpError, ServerProcess, http, wait_until
from tests.support.cluster_plugin import Cluster

PASSWORD = "correct horse battery staple"


class Terminal:
    """One user's shell: their own config directory, no API key in the environment and no
    admin-key file to fall back on, so only `yardmaster login` can sign them in."""

    def __init__(self, server: ServerProcess, home: Path) -> None:
        self.server = server
        self.config = home / "config"
        env = {k: v for k, v in os.environ.items() if not k.startswith("YM_")}
        self.env = {**env, "XDG_CONFIG_HOME": str(self.config), "HOME": str(home), "YM_URL": server.url,
                    "YM_DATA_DIR": str(home / "no-data-dir")}

    @property
    def credentials(self) -> Path:
        return self.config / "yardmaster" / "credentials.json"

    def stored(self) -> dict[str, str]:
        return json.loads(self.credentials.read_text())["sessions"][self.server.url]  # type: ignore[no-any-return]

    def run(self, *args: str, stdin: str | None = None, key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "YM_API_KEY": key} if key else self.env
        return subprocess.run([sys.executable, "-m", "yardmaster.server.cli", *args], cwd=REPO, env=env,
                              input=stdin if stdin is not None else "", capture_output=True, text=True, timeout=60)


class Pty:
    """A command on a real pseudo-terminal, as typed at a shell prompt."""

    def __init__(self, terminal: Terminal, *args: str, key: str | None = None) -> None:
        env = {**terminal.env, "YM_API_KEY": key} if key else terminal.env
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "yardmaster.server.cli", *args], cwd=REPO, env=env,
                                     stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.seen = b""

    def expect(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} within {timeout}s; the terminal shows {self.seen!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.seen += os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    assert text.encode() in self.seen, f"no {text!r}; the terminal shows {self.seen!r}"

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.seen += chunk
        os.close(self.master)
        return code, self.seen.decode(errors="replace")


def client_sockets(server: ServerProcess) -> float:
    text = server.api("GET", "/metrics")
    line = next((x for x in text.splitlines() if x.startswith('yardmaster_websockets_open{channel="client"}')), "x 0")
    return float(line.split()[-1])


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return result


def field(output: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith(f"{name}:"))


@pytest.fixture
def server(cluster: Cluster) -> ServerProcess:
    return cluster.server()


@pytest.fixture
def ada(server: ServerProcess, tmp_path: Path) -> Terminal:
    """A terminal of user `ada`, created by the admin with `yardmaster users create`."""
    admin = Terminal(server, tmp_path / "admin-home")
    created = ok(admin.run("users", "create", "ada", "--email", "ada@example.com", "--first-name", "Ada",
                           "--password-stdin", stdin=PASSWORD + "\n", key=server.admin_key))
    assert "(ada) created, role user" in created.stdout
    return Terminal(server, tmp_path / "ada-home")


def test_login_whoami_keys_users_audit_logout(server: ServerProcess, ada: Terminal) -> None:
    signed_in = ok(ada.run("login", "--username", "ada", "--password-stdin", stdin=PASSWORD + "\n"))
    assert f"signed in to {server.url} as ada (role user)" in signed_in.stdout
    # The session is kept 0600 in a 0700 directory, with the refresh token and never the password.
    assert stat.S_IMODE(ada.credentials.stat().st_mode) == 0o600
    assert stat.S_IMODE(ada.credentials.parent.stat().st_mode) == 0o700
    assert PASSWORD not in ada.credentials.read_text()
    assert ada.stored()["refresh_token"].startswith("ymr_")

    me = ok(ada.run("whoami")).stdout
    assert (field(me, "username"), field(me, "role"), field(me, "email")) == ("ada", "user", "ada@example.com")
    assert field(me, "signed in with") == f"session of ada at {server.url}"

    created = ok(ada.run("keys", "create", "ci", "--scope", "jobs:read", "--expires-in-days", "30"))
    secret, key_id = field(created.stdout, "key"), field(created.stdout, "id")
    assert secret.startswith("ymk_") and "shown only this once" in created.stderr
    listed = ok(ada.run("keys", "list")).stdout
    assert key_id in listed and "jobs:read" in listed and secret not in listed
    # The new key acts as ada, and is refused once revoked.
    assert field(ok(ada.run("whoami", key=secret)).stdout, "username") == "ada"
    assert "revoked" in ok(ada.run("keys", "revoke", key_id)).stdout
    refused = ada.run("whoami", key=secret)
    assert refused.returncode == 1 and refused.stderr == "error: the API key was refused\n"

    # users and audit are for admins only.
    not_admin = ada.run("users", "list")
    assert not_admin.returncode == 1 and not_admin.stderr.startswith("error: permission denied")
    assert ada.run("audit").returncode == 1
    users = ok(ada.run("users", "list", key=server.admin_key)).stdout
    assert "ada@example.com" in users and "active" in users
    audit = ok(ada.run("audit", "--since", "1h", key=server.admin_key)).stdout
    for action in ("user.created", "login.succeeded", "key.created", "key.revoked"):
        assert action in audit, audit
    ada_id = json.loads(ok(ada.run("whoami", "--json")).stdout)["id"]
    mine = json.loads(ok(ada.run("audit", "--actor", ada_id, "--action", "key.", "--json", key=server.admin_key)).stdout)
    assert sorted(e["action"] for e in mine["entries"]) == ["key.created", "key.revoked"]
    whole = ok(ada.run("audit", "--json", "--limit", "1000", key=server.admin_key)).stdout
    for credential in (PASSWORD, secret, ada.stored()["refresh_token"], ada.stored()["access_token"]):
        assert credential not in whole

    refresh_token = ada.stored()["refresh_token"]
    out = ok(ada.run("logout"))
    assert out.stdout == f"signed out of {server.url}\n"
    assert not ada.credentials.exists()
    with pytest.raises(HttpError) as info:  # revoked on the server, not just forgotten here
        http("POST", f"{server.url}/api/v1/auth/refresh", body={"refresh_token": refresh_token})
    assert info.value.status == 401
    after = ada.run("whoami")
    assert after.returncode == 2 and "Traceback" not in after.stderr
    assert after.stderr.startswith(f"error: no API key and not signed in to {server.url}: run `yardmaster login`")
    assert ok(ada.run("logout")).stdout == f"not signed in to {server.url}\n"


def test_an_expired_access_token_is_renewed_and_the_refresh_token_rotated(ada: Terminal) -> None:
    ok(ada.run("login", "-u", "ada@example.com", "--password-stdin", stdin=PASSWORD))
    first = ada.stored()
    data = json.loads(ada.credentials.read_text())
    data["sessions"][ada.server.url]["access_expires_at"] = 0  # as if 15 minutes had passed
    ada.credentials.write_text(json.dumps(data))
    assert field(ok(ada.run("whoami")).stdout, "username") == "ada"
    second = ada.stored()
    assert second["refresh_token"] != first["refresh_token"] and second["access_token"] != first["access_token"]
    # The spent refresh token is refused (and, being reused, ends the session: the server
    # cannot tell the user from a thief).
    with pytest.raises(HttpError) as info:
        http("POST", f"{ada.server.url}/api/v1/auth/refresh", body={"refresh_token": first["refresh_token"]})
    assert info.value.status == 401


def test_a_session_ended_by_the_admin_says_so(server: ServerProcess, ada: Terminal) -> None:
    ok(ada.run("login", "-u", "ada", "--password-stdin", stdin=PASSWORD))
    ada_id = json.loads(ok(ada.run("whoami", "--json")).stdout)["id"]
    disabled = ok(ada.run("users", "update", "ada", "--disable", key=server.admin_key))  # by username
    assert disabled.stdout == f"user {ada_id} (ada): role user, disabled\n"
    ended = ada.run("whoami")
    assert ended.returncode == 1
    assert ended.stderr == f"error: your session at {server.url} has ended (signed out, expired or revoked): run `yardmaster login`\n"
    again = ada.run("login", "-u", "ada", "--password-stdin", stdin=PASSWORD)
    assert again.returncode == 1 and again.stderr == "error: sign-in refused: wrong username or password\n"
    enabled = ok(ada.run("users", "update", ada_id, "--enable", "--role", "admin", key=server.admin_key))
    assert enabled.stdout == f"user {ada_id} (ada): role admin, active\n"
    ok(ada.run("login", "-u", "ada", "--password-stdin", stdin=PASSWORD))
    assert field(ok(ada.run("whoami")).stdout, "role") == "admin"


def test_refusals_of_login_and_users(server: ServerProcess, ada: Terminal) -> None:
    wrong = ada.run("login", "-u", "ada", "--password-stdin", stdin="not the password at all\n")
    assert wrong.returncode == 1 and wrong.stderr == "error: sign-in refused: wrong username or password\n"
    nobody = ada.run("login", "-u", "nobody", "--password-stdin", stdin=PASSWORD)
    assert nobody.stderr == wrong.stderr  # never says whether the user exists
    assert not ada.credentials.exists()
    no_tty = ada.run("login", "-u", "ada")  # no terminal to ask on, and no --password-stdin
    assert no_tty.returncode == 2 and "--password-stdin" in no_tty.stderr
    taken = ada.run("users", "create", "ADA", "--password-stdin", stdin=PASSWORD, key=server.admin_key)
    assert taken.returncode == 1 and taken.stderr.startswith("error: conflict: username")
    short = ada.run("users", "create", "bob", "--password-stdin", stdin="short", key=server.admin_key)
    assert short.returncode == 1 and short.stderr.startswith("error: invalid request: password")
    missing = ada.run("users", "update", "nobody", "--disable", key=server.admin_key)
    assert missing.returncode == 1 and missing.stderr.startswith("error: not found")
    nothing = ada.run("users", "update", "ada", key=server.admin_key)
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr


def test_login_asks_on_the_terminal_and_never_echoes_the_password(server: ServerProcess, ada: Terminal) -> None:
    term = Pty(ada, "login")
    term.expect("Username: ")
    term.type("ada")
    term.expect("Password: ")
    term.type(PASSWORD)
    code, screen = term.finish()
    assert code == 0, screen
    assert "signed in to" in screen and "ada" in screen  # the username is echoed, as typed
    assert PASSWORD not in screen
    assert ada.stored()["refresh_token"].startswith("ymr_")


def test_users_create_asks_twice_for_the_password(server: ServerProcess, ada: Terminal) -> None:
    differ = Pty(ada, "users", "create", "bob", key=server.admin_key)
    differ.expect("Password for the new user: ")
    differ.type(PASSWORD)
    differ.expect("Repeat the password: ")
    differ.type(PASSWORD + "!")
    code, screen = differ.finish()
    assert code == 2 and "the passwords differ" in screen and PASSWORD not in screen
    same = Pty(ada, "users", "create", "bob", key=server.admin_key)
    same.expect("Password for the new user: ")
    same.type(PASSWORD)
    same.expect("Repeat the password: ")
    same.type(PASSWORD)
    code, screen = same.finish()
    assert code == 0 and "(bob) created" in screen and PASSWORD not in screen
    bob = Terminal(server, ada.config.parent.parent / "bob-home")
    ok(bob.run("login", "-u", "bob", "--password-stdin", stdin=PASSWORD))


def test_a_signed_in_user_submits_and_follows_a_job(cluster: Cluster, server: ServerProcess, ada: Terminal) -> None:
    cluster.agent(server, "p1", executor="process")
    ok(ada.run("login", "-u", "ada", "--password-stdin", stdin=PASSWORD))
    # The WebSocket of --follow authenticates with the session's access token too.
    run = ada.run("submit", "--image", "none", "--executor", "process", "--follow", "--", "echo from-ada")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "from-ada\n"
    [job] = server.api("GET", "/api/v1/jobs")["jobs"]
    assert job["owner"] == json.loads(ok(ada.run("whoami", "--json")).stdout)["id"]


def test_following_ends_clearly_when_the_user_is_disabled(server: ServerProcess, ada: Terminal) -> None:
    ok(ada.run("login", "-u", "ada", "--password-stdin", stdin=PASSWORD))
    job_id = ok(ada.run("submit", "--image", "none", "--label", "nobody", "--", "true")).stdout.strip()
    follow = subprocess.Popen([sys.executable, "-m", "yardmaster.server.cli", "logs", "--follow", job_id], cwd=REPO,
                              env=ada.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        wait_until(lambda: client_sockets(server) == 1, 20, what="the follower's socket")
        ok(ada.run("users", "update", "ada", "--disable", key=server.admin_key))
        # The open socket closes with 4001; the follower tries to renew its token, which is refused.
        out, err = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 1, err
    assert err == f"error: your session at {server.url} has ended (signed out, expired or revoked): run `yardmaster login`\n"


def test_a_refused_access_token_on_the_websocket_is_renewed(ada: Terminal) -> None:
    ok(ada.run("login", "-u", "ada", "--password-stdin", stdin=PASSWORD))
    job_id = ok(ada.run("submit", "--image", "none", "--label", "nobody", "--", "true")).stdout.strip()
    ok(ada.run("cancel", job_id))
    before = ada.stored()
    data = json.loads(ada.credentials.read_text())
    data["sessions"][ada.server.url]["access_token"] = "eyJub3QiOiJhIHRva2VuIn0.e30.c2ln"  # refused, not expired
    ada.credentials.write_text(json.dumps(data))
    # `logs --follow` opens the WebSocket first: its handshake is refused (401), the follower
    # renews the token once and follows the job to its end.
    follow = ada.run("logs", "--follow", job_id)
    assert follow.returncode == 0, follow.stderr
    assert ada.stored()["refresh_token"] != before["refresh_token"]
