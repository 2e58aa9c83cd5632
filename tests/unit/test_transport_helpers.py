"""Pure helpers of the transport hardening: Origin comparison, Host policy, loopback detection,
plaintext-credential warnings, TLS error wording, and file modes of the data directory."""

from __future__ import annotations

import os
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.tls import make_tls_files
from yardmaster.agent import connection as agent_conn
from yardmaster.agent.main import ConfigError, parse_options
from yardmaster.protocol import urls
from yardmaster.server import sdk
from yardmaster.server.backends.stores import ensure_private_dir, ensure_private_file
from yardmaster.server.channels.client_channel import origin_allowed
from yardmaster.server.observability.middleware import HostCheckMiddleware, is_ip_address_host, trusted_host_policy
from yardmaster.server.settings import SettingsError, load_settings


# ---- Origin ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "allowed", "ok"),
    [
        (None, "h:8080", "ws", (), True),  # not a browser
        ("http://h:8080", "h:8080", "ws", (), True),
        ("http://H:8080", "h:8080", "ws", (), True),
        ("https://h:8080", "h:8080", "ws", (), False),  # scheme differs: a plain-http server
        ("https://h:8080", "h:8080", "wss", (), True),
        ("http://h:8080", "h:8080", "wss", (), False),
        ("http://h:8081", "h:8080", "ws", (), False),  # port differs
        ("http://h", "h:80", "ws", (), True),  # default ports are the same origin
        ("https://h", "h", "wss", (), True),
        ("https://h:443", "h", "wss", (), True),
        ("http://h", "h:8080", "ws", (), False),
        ("null", "h:8080", "ws", (), False),
        ("file://", "h:8080", "ws", (), False),
        ("http://h:notaport", "h:8080", "ws", (), False),
        ("https://app.example", "h:8080", "ws", ("https://app.example",), True),
        ("https://app.example", "h:8080", "ws", ("https://app.example:443",), True),
        ("http://app.example", "h:8080", "ws", ("https://app.example",), False),
        ("https://app.example:8443", "h:8080", "ws", ("https://app.example",), False),
        ("https://evil.example", "h:8080", "ws", ("*",), True),
        ("https://evil.example", None, "ws", (), False),
    ],
)
def test_origin_allowed_compares_scheme_host_and_port(origin: str | None, host: str | None, scheme: str,
                                                       allowed: tuple[str, ...], ok: bool) -> None:
    assert origin_allowed(origin, host, allowed, scheme) is ok


# ---- Host ------------------------------------------------------------------------------------------


def test_default_trusted_hosts_are_loopback_names_and_the_configured_host() -> None:
    hosts, any_ip = trusted_host_policy(load_settings({"YM_HOST": "yard.lan"}))
    assert set(hosts) == {"127.0.0.1", "localhost", "[::1]", "yard.lan"} and any_ip is False


def test_wildcard_listen_address_adds_this_machines_names_and_ip_addresses() -> None:
    for address in ("0.0.0.0", "::"):
        hosts, any_ip = trusted_host_policy(load_settings({"YM_HOST": address}))
        assert any_ip is True
        assert {"localhost", "127.0.0.1", socket.gethostname().lower()} <= set(hosts)
        assert address not in hosts


def test_configured_trusted_hosts_are_the_whole_list_and_normalised() -> None:
    hosts, any_ip = trusted_host_policy(load_settings({"YM_HOST": "0.0.0.0",
                                                       "YM_TRUSTED_HOSTS": "Yard.Example, *.corp.example, ::1"}))
    assert hosts == ["yard.example", "*.corp.example", "[::1]"] and any_ip is False


@pytest.mark.parametrize("entry", ["yard.example:8080", "https://yard.example", "a*b.example", "*example.com"])
def test_trusted_hosts_with_port_scheme_or_odd_wildcard_are_refused(entry: str) -> None:
    with pytest.raises(SettingsError, match="YM_TRUSTED_HOSTS"):
        trusted_host_policy(load_settings({"YM_TRUSTED_HOSTS": entry}))


@pytest.mark.parametrize(
    ("header", "expected"),
    [("10.1.2.3", True), ("10.1.2.3:8080", True), ("[fe80::1]:8080", True), ("[::1]", True),
     ("yard.example", False), ("yard.example:8080", False), ("", False), (None, False), ("10.1.2.3:x", False)],
)
def test_is_ip_address_host(header: str | None, expected: bool) -> None:
    assert is_ip_address_host(header) is expected


async def _status_for(middleware: HostCheckMiddleware, host: str) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"host", host.encode())], "query_string": b""}
    await middleware(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def test_host_check_lets_ip_addresses_through_only_when_told() -> None:
    open_to_ips = HostCheckMiddleware(_ok_app, ["localhost"], any_ip_address=True)
    strict = HostCheckMiddleware(_ok_app, ["localhost"])
    assert await _status_for(open_to_ips, "10.1.2.3:8080") == 200
    assert await _status_for(open_to_ips, "localhost:8080") == 200
    assert await _status_for(open_to_ips, "rebound.evil.example") == 400
    assert await _status_for(strict, "10.1.2.3:8080") == 400
    assert await _status_for(strict, "localhost") == 200


# ---- loopback and plaintext warnings (agent and CLI side) --------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("LOCALHOST.", True), ("app.localhost", True), ("10.0.0.5", False), ("yard.example", False),
     ("localhost.evil.example", False), ("", False), (None, False)],
)
def test_is_loopback(host: str | None, expected: bool) -> None:
    assert urls.is_loopback(host) is expected


def test_agent_warns_for_plain_ws_to_another_host_only() -> None:
    warn = agent_conn.plaintext_credential_warning
    assert "unencrypted" in (warn("ws://10.0.0.5:8080/ws/agent") or "")
    assert "unencrypted" in (warn("ws://yard.example/ws/agent") or "")
    assert warn("wss://yard.example/ws/agent") is None
    assert warn("ws://127.0.0.1:8080/ws/agent") is None
    assert warn("ws://localhost:8080/ws/agent") is None
    assert warn("ws://[::1]:8080/ws/agent") is None


def test_cli_warns_for_plain_http_to_another_host_only() -> None:
    warn = sdk.plaintext_credential_warning
    assert "unencrypted" in (warn("http://10.0.0.5:8080") or "")
    assert "unencrypted" in (warn("HTTP://yard.example") or "")
    assert warn("https://yard.example") is None
    assert warn("http://127.0.0.1:8080") is None
    assert warn("http://localhost:8080") is None


def _verify_error() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    exc.verify_message = "self-signed certificate"  # type: ignore[attr-defined]  # set by the ssl module normally
    return exc


def test_a_refused_certificate_is_explained_with_the_option_to_fix_it() -> None:
    agent_line = agent_conn.connect_error(_verify_error())
    assert "not trusted (self-signed certificate)" in agent_line and "YM_CA_FILE" in agent_line
    assert agent_conn.connect_error(ConnectionRefusedError(111, "Connection refused")) == "[Errno 111] Connection refused"
    wrapped = RuntimeError("connect failed")
    wrapped.__cause__ = _verify_error()
    cli_reason = sdk._tls_reason(wrapped)
    assert cli_reason is not None and "--ca-file" in cli_reason and "self-signed certificate" in cli_reason
    assert sdk._tls_reason(RuntimeError("other")) is None


@pytest.mark.parametrize("tls_context", [agent_conn.tls_context, sdk.tls_context])
def test_tls_context_names_an_unreadable_ca_file(tls_context: Any, tmp_path: Path) -> None:
    assert tls_context(None) is None
    with pytest.raises(ValueError, match="cannot use CA file .*missing.pem"):
        tls_context(str(tmp_path / "missing.pem"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="cannot use CA file"):
        tls_context(str(garbage))


# ---- file modes ------------------------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dir_is_created_0700_and_an_existing_one_is_fixed(tmp_path: Path, umask_022: None) -> None:
    fresh = tmp_path / "a" / "data"
    ensure_private_dir(str(fresh))
    assert _mode(fresh) == 0o700
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o755)
    ensure_private_dir(str(existing))
    assert _mode(existing) == 0o700


def test_private_file_is_created_0600_never_truncated_and_fixed_when_it_exists(tmp_path: Path, umask_022: None) -> None:
    created = tmp_path / "yardmaster.db"
    ensure_private_file(str(created), create=True)
    assert created.exists() and _mode(created) == 0o600
    old = tmp_path / "yardmaster.db-wal"
    old.write_bytes(b"contents")
    old.chmod(0o644)
    ensure_private_file(str(old), create=True)
    assert old.read_bytes() == b"contents" and _mode(old) == 0o600
    ensure_private_file(str(tmp_path / "yardmaster.db-shm"), create=False)
    assert not (tmp_path / "yardmaster.db-shm").exists()


# ---- the CA file option -----------------------------------------------------------------------------


def test_agent_takes_the_ca_file_from_the_flag_or_YM_CA_FILE_and_refuses_an_unreadable_one(tmp_path: Path) -> None:
    ca = str(make_tls_files(tmp_path / "tls").ca_file)
    base = ["--server", "https://yard.example", "--token", "yma_x"]
    assert parse_options(base, {"YM_CA_FILE": ca}).ca_file == ca
    assert parse_options([*base, "--ca-file", ca], {}).ca_file == ca
    assert parse_options(base, {}).ca_file is None
    with pytest.raises(ConfigError, match="cannot use CA file"):
        parse_options(base, {"YM_CA_FILE": str(tmp_path / "missing.pem")})
