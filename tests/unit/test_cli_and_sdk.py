"""The pure parts of the user CLI and the Python client: no server, no network."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import msgspec
import pytest

from yardmaster.protocol.jobs import JobSpecRequest
from yardmaster.server import cli_commands as cli
from yardmaster.server.sdk import RequestRefused, ServerUnreachable, YardmasterClient, _ws_url


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="yardmaster")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_client_commands(sub)
    return parser.parse_args(argv)


# ---- submit → job spec -------------------------------------------------------------------------


def test_submit_minimal_spec_leaves_defaults_to_the_server() -> None:
    args = parse(["submit", "--image", "busybox", "--", "echo", "hi"])
    assert args.command == "submit"  # the top-level subcommand is not clobbered
    assert cli.build_job_spec(args) == {"image": "busybox", "command": ["echo", "hi"]}


def test_submit_all_options() -> None:
    args = parse([
        "submit", "--image", "busybox", "--label", "gpu", "--label", "linux/amd64", "--timeout", "90",
        "--priority", "-5", "--env", "A=1", "--env", "B=x=y", "--env", "EMPTY=", "--max-attempts", "2",
        "--memory-mb", "64", "--cpus", "0.5", "--follow", "--", "ls", "-la", "--env", "/tmp",
    ])
    spec = cli.build_job_spec(args)
    assert spec == {
        "image": "busybox",
        "command": ["ls", "-la", "--env", "/tmp"],
        "env": {"A": "1", "B": "x=y", "EMPTY": ""},
        "labels": ["gpu", "linux/amd64"],
        "timeout_s": 90,
        "priority": -5,
        "max_attempts": 2,
        "resources": {"cpus": 0.5, "memory_mb": 64},
    }
    assert args.follow is True
    # The spec is one the API's strict decoder accepts.
    msgspec.json.decode(json.dumps(spec), type=JobSpecRequest)


def test_single_word_with_spaces_is_a_shell_string() -> None:
    args = parse(["submit", "--image", "busybox", "--", "echo hi && exit 3"])
    assert cli.build_job_spec(args)["command"] == "echo hi && exit 3"


def test_single_word_without_spaces_is_an_argv() -> None:
    args = parse(["submit", "--image", "busybox", "--", "true"])
    assert cli.build_job_spec(args)["command"] == ["true"]


def test_command_without_double_dash() -> None:
    args = parse(["submit", "--image", "busybox", "echo", "-n", "hi"])
    assert cli.build_job_spec(args)["command"] == ["echo", "-n", "hi"]


def test_missing_command_is_a_usage_error() -> None:
    args = parse(["submit", "--image", "busybox", "--"])
    with pytest.raises(cli.UsageError, match="no command"):
        cli.build_job_spec(args)


@pytest.mark.parametrize("argv", [
    ["submit", "--", "true"],  # no --image
    ["submit", "--image", "b", "--timeout", "0", "--", "true"],
    ["submit", "--image", "b", "--timeout", "ten", "--", "true"],
    ["logs", "j1", "--from-offset", "-1"],
])
def test_bad_arguments_exit_through_argparse(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2


# ---- env parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize("item, complaint", [
    ("NOVALUE", "expected NAME=VALUE"),
    ("=x", "not a valid variable name"),
    ("1A=x", "not a valid variable name"),
    ("A-B=x", "not a valid variable name"),
])
def test_env_errors(item: str, complaint: str) -> None:
    with pytest.raises(cli.UsageError, match=complaint):
        cli.parse_env([item])


def test_env_later_value_wins() -> None:
    assert cli.parse_env(["A=1", "A=2", "_b9=ok"]) == {"A": "2", "_b9": "ok"}


# ---- exit codes --------------------------------------------------------------------------------


@pytest.mark.parametrize("state, code, expected", [
    ("succeeded", 0, 0),
    ("succeeded", None, 0),
    ("failed", 3, 3),
    ("failed", 137, 137),
    ("failed", None, 1),
    ("failed", 0, 1),  # failed is never success
    ("failed", 300, 1),
    ("failed", -9, 1),
    ("timed-out", None, 124),
    ("timed-out", 137, 124),
    ("cancelled", 143, 130),
    ("lost", None, 2),
])
def test_exit_code_mapping(state: str, code: int | None, expected: int) -> None:
    assert cli.exit_code_for(state, code) == expected


# ---- error lines -------------------------------------------------------------------------------


URL = "http://127.0.0.1:8080"


@pytest.mark.parametrize("exc, line", [
    (ServerUnreachable(URL, "connection refused"), f"cannot reach the server at {URL}: connection refused"),
    (RequestRefused(401, "unauthorized", "bad token"), "the API key was refused"),
    (RequestRefused(422, "invalid-spec", "Expected `int` >= 1", "timeout_s"), "invalid job spec: timeout_s: Expected `int` >= 1"),
    (RequestRefused(404, "not-found", "no job j9"), "not found: no job j9"),
    (RequestRefused(409, "already-finished", "job is succeeded"), "job is succeeded (409 already-finished)"),
    (RequestRefused(503, "unavailable", "store down"), "server error (503): store down"),
    (RequestRefused(0, "forbidden", "not your job"), "permission denied: not your job"),
])
def test_error_lines(exc: Exception, line: str) -> None:
    text = cli.error_line(exc, URL)
    assert text == line
    assert "\n" not in text


def test_resolve_api_key_order(tmp_path: Path) -> None:
    (tmp_path / "admin-key").write_text("ym_file_key\n")
    env = {"YM_DATA_DIR": str(tmp_path)}
    assert cli.resolve_api_key("explicit", {**env, "YM_API_KEY": "fromenv"}) == "explicit"
    assert cli.resolve_api_key(None, {**env, "YM_API_KEY": "fromenv"}) == "fromenv"
    assert cli.resolve_api_key(None, env) == "ym_file_key"
    with pytest.raises(cli.UsageError, match="no API key"):
        cli.resolve_api_key(None, {"YM_DATA_DIR": str(tmp_path / "nothing")})


def test_run_without_key_is_one_line_and_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["jobs", "--url", "http://127.0.0.1:9"])
    code = cli.run_client_command(args, {"YM_DATA_DIR": str(tmp_path)})
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: no API key") and err.count("\n") == 1


def test_nested_agents_command_keeps_common_options() -> None:
    args = parse(["agents", "--url", "http://a:1", "create", "builder", "--label", "x", "--capacity", "4"])
    assert (args.url, args.name, args.label, args.capacity) == ("http://a:1", "builder", ["x"], 4)
    assert args.client_handler is cli.cmd_agents_create
    assert parse(["agents"]).client_handler is cli.cmd_agents
    assert cli.dispatch_client_command(argparse.Namespace(command="server")) is None


# ---- the client over a fake transport ----------------------------------------------------------


def fake_client(handler: "httpx.MockTransport | None" = None, key: str = "ym_secret_key") -> YardmasterClient:
    return YardmasterClient("http://yard.test:8080/", key, transport=handler)


def test_client_sends_bearer_and_decodes() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"id": "j1", "state": "queued"})

    client = fake_client(httpx.MockTransport(handle))
    assert client.submit_job({"image": "b", "command": ["true"]}) == {"id": "j1", "state": "queued"}
    assert seen[0].headers["authorization"] == "Bearer ym_secret_key"
    assert seen[0].url.path == "/api/v1/jobs"
    assert json.loads(seen[0].content) == {"image": "b", "command": ["true"]}


def test_client_error_body_becomes_api_error_without_the_key() -> None:
    body = {"error": {"code": "invalid-spec", "message": "Expected `int`", "field": "timeout_s"}}
    client = fake_client(httpx.MockTransport(lambda r: httpx.Response(422, json=body)))
    with pytest.raises(RequestRefused) as info:
        client.submit_job({"image": "b", "command": "x"})
    err = info.value
    assert (err.status, err.code, err.field) == (422, "invalid-spec", "timeout_s")
    assert "ym_secret_key" not in str(err) + repr(err) + repr(client)


def test_client_non_json_error() -> None:
    client = fake_client(httpx.MockTransport(lambda r: httpx.Response(502, text="<html>bad gateway</html>")))
    with pytest.raises(RequestRefused) as info:
        client.get_job("j1")
    assert (info.value.status, info.value.code) == (502, "http-502")


def test_client_transport_failure_is_server_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    client = fake_client(httpx.MockTransport(refuse))
    with pytest.raises(ServerUnreachable) as info:
        client.list_agents()
    assert "ym_secret_key" not in str(info.value)


def test_iter_logs_pages_until_empty() -> None:
    entries = [{"offset": i, "attempt": 1, "stream": "stdout", "text": f"{i}\n"} for i in range(5)]

    def handle(request: httpx.Request) -> httpx.Response:
        start = int(request.url.params["from_offset"])
        page = [e for e in entries if e["offset"] >= start][:2]
        return httpx.Response(200, json={"entries": page, "next_offset": start + len(page)})

    client = fake_client(httpx.MockTransport(handle))
    assert [log.offset for log in client.iter_logs("j1", 1)] == [1, 2, 3, 4]


@pytest.mark.parametrize("base, ws", [
    ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws/client"),
    ("https://yard.example/prefix/", "wss://yard.example/prefix/ws/client"),
])
def test_ws_url(base: str, ws: str) -> None:
    assert _ws_url(base.rstrip("/")) == ws


def test_submit_executor_option() -> None:
    args = parse(["submit", "--image", "none", "--executor", "process", "--", "true"])
    assert cli.build_job_spec(args)["executor"] == "process"
    assert "executor" not in cli.build_job_spec(parse(["submit", "--image", "b", "--", "true"]))
    with pytest.raises(SystemExit):
        parse(["submit", "--image", "b", "--executor", "vm", "--", "true"])


def test_agents_update_parses_and_sends_a_patch_of_what_was_given() -> None:
    args = parse(["agents", "update", "agt_1", "--label", "a", "--label", "b", "--capacity", "0"])
    assert args.client_handler is cli.cmd_agents_update
    assert (args.id, args.label, args.capacity, args.clear_labels) == ("agt_1", ["a", "b"], 0, False)
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "agt_1", "labels": []})

    client = fake_client(httpx.MockTransport(handle))
    client.update_agent("agt_1", labels=["a"], capacity=3)
    client.update_agent("agt/1", labels=[])
    client.update_agent("agt_1", capacity=1)
    assert [r.method for r in seen] == ["PATCH"] * 3
    assert [r.url.raw_path for r in seen] == [b"/api/v1/agents/agt_1", b"/api/v1/agents/agt%2F1", b"/api/v1/agents/agt_1"]
    assert [json.loads(r.content) for r in seen] == [{"labels": ["a"], "capacity": 3}, {"labels": []}, {"capacity": 1}]


@pytest.mark.parametrize("argv, message", [
    (["agents", "update", "agt_1"], "nothing to change"),
    (["agents", "update", "agt_1", "--clear-labels", "--label", "a"], "exclude each other"),
])
def test_agents_update_refuses_before_calling_the_server(argv: list[str], message: str) -> None:
    called: list[httpx.Request] = []
    client = fake_client(httpx.MockTransport(lambda r: called.append(r) or httpx.Response(200, json={})))
    with pytest.raises(cli.UsageError, match=message):
        cli.cmd_agents_update(parse(argv), client)
    assert called == []
