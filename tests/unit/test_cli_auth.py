"""The CLI's credentials file, which credential a command uses, and the client's token handling.
Real files in tmp_path; the HTTP side over httpx's in-memory transport (no server, no network)."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from yardmaster.server import cli_commands as cli
from yardmaster.server.cli_auth import (
    DEFAULT_URL,
    Credential,
    CredentialsError,
    CredentialStore,
    NotSignedIn,
    StoredSession,
    config_dir,
    normalize_url,
    resolve_credential,
    resolve_url,
)
from yardmaster.server.sdk import RequestRefused, Tokens, YardmasterClient

URL = "https://yard.example"


def session(refresh: str = "ymr_first", access: str | None = "at_first", expires_at: float = 0.0,
            url: str = URL) -> StoredSession:
    return StoredSession(url=url, username="ada", user_id="usr_1", refresh_token=refresh, access_token=access,
                         access_expires_at=expires_at or time.time() + 600)


@pytest.fixture
def store(tmp_path: Path) -> CredentialStore:
    return CredentialStore(tmp_path / "config" / "yardmaster")


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- where the file is ---------------------------------------------------------------------------


def test_config_dir_follows_xdg_then_home(tmp_path: Path) -> None:
    assert config_dir({"XDG_CONFIG_HOME": "/cfg", "HOME": "/home/ada"}) == Path("/cfg/yardmaster")
    # A relative XDG_CONFIG_HOME is to be ignored (XDG base directory specification).
    assert config_dir({"XDG_CONFIG_HOME": "rel", "HOME": "/home/ada"}) == Path("/home/ada/.config/yardmaster")
    assert config_dir({"HOME": "/home/ada"}) == Path("/home/ada/.config/yardmaster")
    assert CredentialStore.for_environ({"XDG_CONFIG_HOME": str(tmp_path)}).path == tmp_path / "yardmaster" / "credentials.json"


def test_urls_are_stored_in_one_form() -> None:
    assert normalize_url("HTTPS://Yard.Example/") == "https://yard.example"
    assert normalize_url("http://127.0.0.1:8080/base/") == "http://127.0.0.1:8080/base"


# ---- modes and atomic writes ---------------------------------------------------------------------


def test_directory_is_0700_and_file_0600_whatever_the_umask(store: CredentialStore, umask_zero: None) -> None:
    store.save(session(), make_default=True)
    assert mode(store.directory) == 0o700
    assert mode(store.path) == 0o600


def test_an_existing_open_directory_is_closed_to_others(store: CredentialStore) -> None:
    store.directory.mkdir(parents=True, mode=0o755)
    os.chmod(store.directory, 0o755)
    store.save(session(), make_default=True)
    assert mode(store.directory) == 0o700


def test_save_replaces_the_file_atomically(store: CredentialStore) -> None:
    store.save(session("ymr_old"), make_default=True)
    with open(store.path, "rb") as before:  # a reader that opened the old file
        store.save(session("ymr_new"), make_default=False)
        old_text = before.read()
    assert json.loads(old_text)["sessions"][URL]["refresh_token"] == "ymr_old"  # whole, not half-written
    assert store.get(URL).refresh_token == "ymr_new"  # type: ignore[union-attr]
    assert sorted(p.name for p in store.directory.iterdir()) == ["credentials.json"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_whole(store: CredentialStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.save(session("ymr_old"), make_default=True)

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(CredentialsError, match="No space left") as info:
        store.save(session("ymr_new"), make_default=False)
    monkeypatch.undo()
    assert "ymr_" not in str(info.value)
    assert store.get(URL).refresh_token == "ymr_old"  # type: ignore[union-attr]
    assert sorted(p.name for p in store.directory.iterdir()) == ["credentials.json"]


def test_the_file_keeps_sessions_per_server_and_the_last_login_as_default(store: CredentialStore) -> None:
    assert store.get(URL) is None and store.default_url() is None
    store.save(session(url=URL), make_default=True)
    store.save(session("ymr_b", url="http://127.0.0.1:9000"), make_default=True)
    assert store.default_url() == "http://127.0.0.1:9000"
    assert store.get("HTTPS://yard.example/").username == "ada"  # type: ignore[union-attr]
    data = json.loads(store.path.read_text())
    assert set(data["sessions"]) == {URL, "http://127.0.0.1:9000"} and data["version"] == 1
    assert "password" not in store.path.read_text()
    assert store.remove("http://127.0.0.1:9000") is True
    assert store.default_url() == URL  # the default moves to a server still signed in
    assert store.remove("http://127.0.0.1:9000") is False
    assert store.remove(URL) is True
    assert not store.path.exists()  # nothing left: no file


@pytest.mark.parametrize("content", ["{not json", "[]", '{"version": 99, "sessions": {}}'])
def test_a_damaged_file_is_named_not_guessed_at(store: CredentialStore, content: str) -> None:
    store.directory.mkdir(parents=True)
    store.path.write_text(content)
    with pytest.raises(CredentialsError, match="credentials.json"):
        store.get(URL)


def test_reprs_never_show_a_token() -> None:
    s = session("ymr_secret_refresh", "at_secret_access")
    tokens = Tokens("at_secret_access", "ymr_secret_refresh", 1.0)
    cred = Credential("api-key", URL, api_key="ymk_secret_key")
    text = repr(s) + repr(tokens) + repr(cred) + repr(s.tokens()) + str(s)
    assert "secret" not in text


# ---- which credential a command uses -------------------------------------------------------------


def test_credential_precedence(tmp_path: Path, store: CredentialStore) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "admin-key").write_text("ymk_file\n")
    env = {"YM_DATA_DIR": str(data_dir)}
    store.save(session(), make_default=True)

    assert resolve_credential("ymk_flag", URL, {**env, "YM_API_KEY": "ymk_env"}, store).api_key == "ymk_flag"
    assert resolve_credential(None, URL, {**env, "YM_API_KEY": "ymk_env"}, store).api_key == "ymk_env"
    by_session = resolve_credential(None, URL, env, store)
    assert by_session.kind == "session" and by_session.session is not None and by_session.session.username == "ada"
    # Another server has no session: the local admin key file.
    by_file = resolve_credential(None, DEFAULT_URL, env, store)
    assert (by_file.kind, by_file.api_key) == ("admin-key-file", "ymk_file")
    with pytest.raises(NotSignedIn, match="yardmaster login"):
        resolve_credential(None, DEFAULT_URL, {"YM_DATA_DIR": str(tmp_path / "none")}, store)


def test_url_precedence(store: CredentialStore) -> None:
    assert resolve_url(None, {}, store) == DEFAULT_URL
    store.save(session(url="https://signed-in.example"), make_default=True)
    assert resolve_url(None, {}, store) == "https://signed-in.example"
    assert resolve_url(None, {"YM_URL": "http://env:1/"}, store) == "http://env:1"
    assert resolve_url("http://flag:2", {"YM_URL": "http://env:1"}, store) == "http://flag:2"


# ---- renewing under the lock ---------------------------------------------------------------------


class Exchanges:
    """A stand-in for POST /api/v1/auth/refresh that rotates like the server does."""

    def __init__(self, delay: float = 0.0) -> None:
        self.seen: list[str] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, refresh_token: str) -> Tokens:
        time.sleep(self.delay)
        with self.lock:
            self.seen.append(refresh_token)
            n = len(self.seen)
        return Tokens(f"at_{n}", f"ymr_{n}", time.time() + 900)


def test_a_valid_stored_access_token_is_used_without_refreshing(store: CredentialStore) -> None:
    store.save(session(expires_at=time.time() + 600), make_default=True)
    exchange = Exchanges()
    assert store.renew(URL, None, exchange).access_token == "at_first"
    assert exchange.seen == []


def test_renewal_rotates_the_refresh_token_in_the_file(store: CredentialStore) -> None:
    store.save(session(expires_at=time.time() + 10), make_default=True)  # about to expire
    exchange = Exchanges()
    tokens = store.renew(URL, None, exchange)
    assert exchange.seen == ["ymr_first"] and tokens.access_token == "at_1"
    stored = store.get(URL)
    assert stored is not None and (stored.refresh_token, stored.access_token) == ("ymr_1", "at_1")
    assert mode(store.path) == 0o600


def test_a_refused_access_token_is_renewed_even_before_its_expiry(store: CredentialStore) -> None:
    store.save(session(expires_at=time.time() + 600), make_default=True)
    exchange = Exchanges()
    refused = store.get(URL).tokens()  # type: ignore[union-attr]
    assert store.renew(URL, refused, exchange).access_token == "at_1"
    assert exchange.seen == ["ymr_first"]


def test_tokens_rotated_by_another_command_are_taken_not_refreshed_again(store: CredentialStore) -> None:
    store.save(session(expires_at=time.time() + 10), make_default=True)
    mine = store.get(URL).tokens()  # type: ignore[union-attr]
    store.renew(URL, None, Exchanges())  # another command got there first
    exchange = Exchanges()
    assert store.renew(URL, mine, exchange).access_token == "at_1"
    assert exchange.seen == []  # presenting the spent ymr_first would look like theft to the server


def test_concurrent_renewals_refresh_once(store: CredentialStore) -> None:
    store.save(session(expires_at=time.time() + 10), make_default=True)
    exchange = Exchanges(delay=0.2)  # widens the window in which an unlocked renew would race
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(store.renew(URL, None, exchange).access_token))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert exchange.seen == ["ymr_first"]
    assert results == ["at_1"] * 4


def test_a_refused_refresh_leaves_the_file_as_it_was(store: CredentialStore) -> None:
    store.save(session(expires_at=time.time() + 10), make_default=True)
    before = store.path.read_bytes()

    def refuse(refresh_token: str) -> Tokens:
        raise RequestRefused(401, "unauthorized", "refresh token revoked")

    with pytest.raises(RequestRefused):
        store.renew(URL, None, refuse)
    assert store.path.read_bytes() == before


def test_renew_without_a_session_says_to_sign_in(store: CredentialStore) -> None:
    with pytest.raises(NotSignedIn, match="yardmaster login"):
        store.renew(URL, None, Exchanges())


# ---- the client with tokens ----------------------------------------------------------------------


class FakeServer:
    """Answers like the sign-in routes: one valid access token at a time, rotation on refresh."""

    def __init__(self) -> None:
        self.valid_access = "at_0"
        self.valid_refresh = "ymr_0"
        self.n = 0
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/api/v1/auth/login":
            body = json.loads(request.content)
            if body != {"username": "ada", "password": "correct horse battery"}:
                return httpx.Response(401, json={"error": {"code": "invalid-credentials", "message": "invalid"}})
            return self._issue()
        if path == "/api/v1/auth/refresh":
            if json.loads(request.content).get("refresh_token") != self.valid_refresh:
                return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "refresh refused"}})
            return self._issue()
        if request.headers.get("authorization") != f"Bearer {self.valid_access}":
            return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "bad token"}})
        if path == "/api/v1/auth/logout":
            self.valid_access = self.valid_refresh = "-"
            return httpx.Response(204)
        return httpx.Response(200, json={"id": "usr_1", "username": "ada", "role": "user"})

    def _issue(self) -> httpx.Response:
        self.n += 1
        self.valid_access, self.valid_refresh = f"at_{self.n}", f"ymr_{self.n}"
        return httpx.Response(200, json={"access_token": self.valid_access, "token_type": "Bearer",
                                         "expires_in": 900, "refresh_token": self.valid_refresh})

    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]


def test_login_then_requests_carry_the_access_token() -> None:
    server = FakeServer()
    client = YardmasterClient.login("http://yard.test", "ada", "correct horse battery",
                                    transport=httpx.MockTransport(server))
    assert client.whoami()["username"] == "ada"
    assert "authorization" not in server.requests[0].headers  # sign-in sends no credential
    assert server.requests[1].headers["authorization"] == "Bearer at_1"
    assert "correct horse" not in repr(client) and "at_1" not in repr(client) and "ymr_1" not in repr(client.tokens)


def test_a_wrong_password_raises_without_the_password() -> None:
    with pytest.raises(RequestRefused) as info:
        YardmasterClient.login("http://yard.test", "ada", "wrong password!!", transport=httpx.MockTransport(FakeServer()))
    assert (info.value.status, info.value.code) == (401, "invalid-credentials")
    assert "wrong password" not in str(info.value) + repr(info.value)


def test_a_refused_access_token_is_renewed_once_and_the_request_retried() -> None:
    server = FakeServer()
    client = YardmasterClient("http://yard.test", tokens=Tokens("at_old", "ymr_0", time.time() + 600),
                              transport=httpx.MockTransport(server))
    assert client.whoami()["id"] == "usr_1"
    assert server.paths() == ["/api/v1/users/me", "/api/v1/auth/refresh", "/api/v1/users/me"]
    assert client.tokens is not None and client.tokens.refresh_token == "ymr_1"


def test_an_access_token_about_to_expire_is_renewed_before_it_is_sent() -> None:
    server = FakeServer()
    client = YardmasterClient("http://yard.test", tokens=Tokens("at_0", "ymr_0", time.time() + 5),
                              transport=httpx.MockTransport(server))
    client.whoami()
    assert server.paths() == ["/api/v1/auth/refresh", "/api/v1/users/me"]


def test_a_refused_refresh_is_a_401_and_not_retried_forever() -> None:
    server = FakeServer()
    client = YardmasterClient("http://yard.test", tokens=Tokens("at_old", "ymr_spent", time.time() + 600),
                              transport=httpx.MockTransport(server))
    with pytest.raises(RequestRefused) as info:
        client.whoami()
    assert info.value.status == 401
    assert server.paths() == ["/api/v1/users/me", "/api/v1/auth/refresh"]
    assert "ymr_spent" not in str(info.value)


def test_the_renew_hook_replaces_the_default_refresh() -> None:
    server = FakeServer()
    calls: list[Tokens | None] = []

    def renew(stale: Tokens | None, exchange: object) -> Tokens:
        calls.append(stale)
        return Tokens(server.valid_access, server.valid_refresh, time.time() + 900)

    client = YardmasterClient("http://yard.test", tokens=Tokens("at_old", None, time.time() + 600), renew=renew,
                              transport=httpx.MockTransport(server))
    client.whoami()
    assert len(calls) == 1 and calls[0] is not None and calls[0].access_token == "at_old"


def test_logout_sends_the_refresh_token_and_forgets_the_tokens() -> None:
    server = FakeServer()
    client = YardmasterClient.login("http://yard.test", "ada", "correct horse battery",
                                    transport=httpx.MockTransport(server))
    client.logout()
    assert json.loads(server.requests[-1].content) == {"refresh_token": "ymr_1"}
    assert client.tokens is None
    with pytest.raises(RequestRefused) as info:
        client.whoami()
    assert info.value.status == 401


def test_api_key_and_tokens_exclude_each_other() -> None:
    with pytest.raises(ValueError):
        YardmasterClient("http://yard.test", "ymk_x", tokens=Tokens("a"))


def test_retry_after_of_a_429_is_kept() -> None:
    def throttled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "32"},
                              json={"error": {"code": "too-many-attempts", "message": "slow down"}})

    with pytest.raises(RequestRefused) as info:
        YardmasterClient.login("http://yard.test", "ada", "whatever-password", transport=httpx.MockTransport(throttled))
    assert info.value.retry_after == 32
    assert cli.error_line(info.value, URL) == "too many failed sign-ins; try again in 32 s"


# ---- CLI pure parts ------------------------------------------------------------------------------


def test_password_from_stdin_loses_only_the_final_line_break() -> None:
    assert cli.read_password(True, stdin=io.StringIO("  spaces kept \n")) == "  spaces kept "
    assert cli.read_password(True, stdin=io.StringIO("crlf\r\n")) == "crlf"
    with pytest.raises(cli.UsageError, match="no password"):
        cli.read_password(True, stdin=io.StringIO("\n"))


def test_since_durations_become_unix_seconds() -> None:
    assert cli.parse_since("15m", 10_000.0) == "9100.000"
    assert cli.parse_since("2h", 10_000.0) == "2800.000"
    assert cli.parse_since("2024-05-01T00:00:00Z", 0) == "2024-05-01T00:00:00Z"
    assert cli.parse_since("1714521600", 0) == "1714521600"
    local_midnight = datetime(2025, 1, 31).timestamp()  # a date without a zone: this machine's time
    assert cli.parse_since("2025-01-31", 0) == f"{local_midnight:.3f}"
    assert cli.parse_since("yesterday", 0) == "yesterday"  # the server names what it takes


@pytest.mark.parametrize("exc, session, line", [
    (RequestRefused(401, "unauthorized", "x"), True,
     f"your session at {URL} has ended (signed out, expired or revoked): run `yardmaster login`"),
    (RequestRefused(401, "unauthorized", "x"), False, "the API key was refused"),
    (RequestRefused(401, "invalid-credentials", "x"), True, "sign-in refused: wrong username or password"),
    (RequestRefused(409, "conflict", "taken", "username"), False, "conflict: username: taken"),
])
def test_error_lines_of_sign_in(exc: Exception, session: bool, line: str) -> None:
    assert cli.error_line(exc, URL, session=session) == line


def test_login_refuses_password_stdin_without_username(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli_parser()
    args = parser.parse_args(["login", "--url", "http://127.0.0.1:9", "--password-stdin"])
    code = cli.run_client_command(args, {"XDG_CONFIG_HOME": str(tmp_path)})
    assert code == 2 and "--password-stdin needs --username" in capsys.readouterr().err


def test_a_command_without_any_credential_says_how_to_get_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = cli_parser().parse_args(["whoami", "--url", "http://127.0.0.1:9"])
    code = cli.run_client_command(args, {"XDG_CONFIG_HOME": str(tmp_path), "YM_DATA_DIR": str(tmp_path / "d")})
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "yardmaster login" in err


def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yardmaster")
    cli.add_client_commands(parser.add_subparsers(dest="command", required=True))
    return parser
