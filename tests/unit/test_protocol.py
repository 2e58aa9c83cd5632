"""Wire messages, codecs and job spec validation: pure, no I/O."""

from __future__ import annotations

import ast
import pathlib

import msgspec
import pytest

from yardmaster.protocol import messages as m
from yardmaster.protocol.codec import (
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
    DecodeError,
    agent_client_codec,
    agent_server_codec,
    client_reader_codec,
    client_server_codec,
)
from yardmaster.protocol.jobs import JobSpec, decode_spec_request, validation_field

ALL_TAGS = {
    "hello", "welcome", "heartbeat", "job-assign", "job-accept", "job-reject", "log-chunk", "log-ack",
    "result", "result-ack", "cancel", "cancel-ack", "drain", "error", "subscribe", "subscribed",
    "unsubscribe", "log", "job-state", "truncated", "ping", "pong",
}


def test_every_message_of_the_design_has_its_kebab_case_tag() -> None:
    tags = m.AGENT_TO_SERVER_TAGS | m.SERVER_TO_AGENT_TAGS | m.CLIENT_TO_SERVER_TAGS | m.SERVER_TO_CLIENT_TAGS
    assert ALL_TAGS <= tags


def test_protocol_package_imports_no_io() -> None:
    forbidden = {"asyncio", "socket", "ssl", "websockets", "redis", "pymongo", "aiosqlite", "sqlite3", "aiodocker",
                 "starlette", "uvicorn", "httpx", "threading", "subprocess", "yardmaster.server", "yardmaster.agent"}
    for path in pathlib.Path("protocol").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                parts = name.split(".")
                assert parts[0] not in forbidden and ".".join(parts[:2]) not in forbidden, f"{path} imports {name}"


SPEC = JobSpec(image="busybox", command=["echo", "hi"], env={"A": "1"}, labels=["gpu"])
AGENT_SIDE = [
    m.Hello(name="a", version="1", labels=["x"], capacity=2, running=[m.RunningJob(job_id="j", attempt=1, last_seq=4)]),
    m.Heartbeat(running=[m.RunningJob(job_id="j", attempt=1)]),
    m.JobAccept(job_id="j", attempt=1),
    m.JobReject(job_id="j", attempt=1, reason="busy"),
    m.LogChunk(job_id="j", attempt=1, seq=0, stream="stderr", data=b"\xff\x00bytes", ts=1.5),
    m.Result(job_id="j", attempt=1, state="failed", exit_code=3, error="boom"),
    m.CancelAck(job_id="j", attempt=1),
]
SERVER_SIDE = [
    m.Welcome(session_id="s", agent_id="a", heartbeat_interval_s=10, lease_s=30, resume=[m.ResumeJob(job_id="j", attempt=1, acked_seq=3)]),
    m.JobAssign(job_id="j", attempt=2, spec=SPEC, deadline=123.0),
    m.LogAck(job_id="j", attempt=1, seq=7),
    m.ResultAck(job_id="j", attempt=1),
    m.Cancel(job_id="j", attempt=1, reason="user", grace_s=5),
    m.Drain(reason="maintenance"),
    m.Error(code="stale-attempt", job_id="j", attempt=1),
]


@pytest.mark.parametrize("subprotocol", [SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON])
def test_agent_channel_round_trips_in_both_encodings(subprotocol: str) -> None:
    agent, server = agent_client_codec(subprotocol), agent_server_codec(subprotocol)
    for msg in AGENT_SIDE:
        frame = agent.encode(msg)
        assert isinstance(frame, bytes if subprotocol == SUBPROTOCOL_MSGPACK else str)
        assert server.decode(frame) == msg
    for msg in SERVER_SIDE:
        assert agent.decode(server.encode(msg)) == msg


def test_client_channel_round_trips() -> None:
    server, reader = client_server_codec(), client_reader_codec()
    for msg in [m.Subscribe(topic="job:j", from_offset=5), m.Unsubscribe(topic="jobs"), m.Ping(id="1")]:
        assert server.decode(reader.encode(msg)) == msg
    for msg in [m.Subscribed(topic="job:j", next_offset=0), m.Log(job_id="j", attempt=1, offset=3, stream="stdout", text="x"),
                m.JobStateMsg(job_id="j", state="running", attempt=1), m.Truncated(job_id="j", offset=9), m.Pong()]:
        assert reader.decode(server.encode(msg)) == msg


def test_unknown_fields_are_ignored_on_the_agent_wire_for_forward_compatibility() -> None:
    server = agent_server_codec(SUBPROTOCOL_JSON)
    msg = server.decode('{"type": "job-accept", "job_id": "j", "attempt": 1, "added_in_v2": true}')
    assert msg == m.JobAccept(job_id="j", attempt=1)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "malformed"),
        ('{"no": "type"}', "malformed"),
        ('{"type": "teleport"}', "unknown-type"),
        ('{"type": "job-accept", "job_id": "j"}', "malformed"),
        ('{"type": "log-chunk", "job_id": "j", "attempt": 1, "seq": 0, "stream": "stdin", "data": "", "ts": 0}', "malformed"),
        (b"binary on text", "malformed"),
    ],
)
def test_bad_frames_raise_decode_error_with_a_code(frame: str | bytes, code: str) -> None:
    with pytest.raises(DecodeError) as err:
        agent_server_codec(SUBPROTOCOL_JSON).decode(frame)
    assert err.value.code == code
    assert err.value.to_error().code == code


def test_size_limit_is_enforced_before_decoding() -> None:
    codec = agent_server_codec(SUBPROTOCOL_MSGPACK, max_bytes=100)
    with pytest.raises(DecodeError) as err:
        codec.decode(b"\x00" * 101)
    assert err.value.code == "too-big"


def test_text_frame_on_msgpack_connection_is_malformed() -> None:
    with pytest.raises(DecodeError) as err:
        agent_server_codec(SUBPROTOCOL_MSGPACK).decode('{"type":"heartbeat"}')
    assert err.value.code == "malformed"


def test_spec_defaults_are_hardened() -> None:
    spec = decode_spec_request(b'{"image": "busybox", "command": "echo hi"}')
    assert spec.network == "none" and spec.read_only_rootfs and spec.user == "65534:65534"
    assert spec.argv() == ["/bin/sh", "-c", "echo hi"]
    assert decode_spec_request(b'{"image": "b", "command": ["echo", "a b"]}').argv() == ["echo", "a b"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"command": ["x"]}', "image"),
        (b'{"image": "b", "command": []}', "command"),
        (b'{"image": "b", "command": ["x"], "timeout_s": 0}', "timeout_s"),
        (b'{"image": "b", "command": ["x"], "priority": 5000}', "priority"),
        (b'{"image": "b", "command": ["x"], "max_attempts": 0}', "max_attempts"),
        (b'{"image": "b", "command": ["x"], "resources": {"memory_mb": 1}}', "resources.memory_mb"),
        (b'{"image": "b", "command": ["x"], "env": {"1BAD": "x"}}', "env"),
        (b'{"image": "b", "command": ["x"], "network": "host"}', "network"),
        (b'{"image": "b", "command": ["x"], "labels": ["has space"]}', "labels[0]"),
        (b'{"image": "b", "command": ["x"], "user": "root"}', "user"),
        (b'{"image": "b", "command": ["x"], "imagee": "typo"}', "imagee"),
        (b'{"image": "b", "command": ["x"], "workdir": "relative"}', "workdir"),
    ],
)
def test_invalid_specs_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        decode_spec_request(body)
    assert validation_field(err.value) == field


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"image": "x", "command": ["true"], "labels": ["gpu\\n"]}', "labels[0]"),
        (b'{"image": "x", "command": ["true"], "user": "1000\\n"}', "user"),
        (b'{"image": "x", "command": ["true"], "env": {"PATH\\n": "x"}}', "env"),
    ],
)
def test_a_trailing_newline_never_passes_a_pattern(body: bytes, field: str) -> None:
    # `$` would match before a final newline (msgspec patterns are searched like re.search).
    with pytest.raises(msgspec.ValidationError) as refused:
        decode_spec_request(body)
    assert validation_field(refused.value) == field
