from __future__ import annotations

import random

import pytest

from yardmaster.agent.connection import agent_ws_url, backoff_delay
from yardmaster.agent.executors.docker import container_config, container_name
from yardmaster.agent.main import ConfigError, parse_options
from yardmaster.protocol.jobs import JobSpec, Resources


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/ws/agent"),
        ("https://ym.example/", "wss://ym.example/ws/agent"),
        ("ws://127.0.0.1:8000/ws/agent", "ws://127.0.0.1:8000/ws/agent"),
        ("http://127.0.0.1:8000/prefix", "ws://127.0.0.1:8000/prefix/ws/agent"),
    ],
)
def test_agent_ws_url(base: str, expected: str) -> None:
    assert agent_ws_url(base) == expected


def test_agent_ws_url_rejects_other_schemes() -> None:
    with pytest.raises(ValueError):
        agent_ws_url("ftp://x")


def test_backoff_is_full_jitter_and_capped() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, 0.5, 15.0, rng) for n in range(12) for _ in range(50)]
    assert all(0 <= d <= 15.0 for d in delays)
    assert max(backoff_delay(0, 0.5, 15.0, rng) for _ in range(200)) <= 0.5
    assert max(backoff_delay(20, 0.5, 15.0, rng) for _ in range(200)) > 7.5  # cap reached, still spread out


def test_options_from_env_and_flags() -> None:
    env = {"YM_SERVER_URL": "http://127.0.0.1:1, http://127.0.0.1:2", "YM_AGENT_TOKEN": "t0k",
           "YM_AGENT_LABELS": "gpu, linux", "YM_AGENT_CAPACITY": "4", "YM_AGENT_NAME": "a1"}
    opts = parse_options([], env)
    assert opts.urls == ["ws://127.0.0.1:1/ws/agent", "ws://127.0.0.1:2/ws/agent"]
    assert (opts.token, opts.name, opts.labels, opts.capacity, opts.executor) == ("t0k", "a1", ["gpu", "linux"], 4, "docker")
    flags = parse_options(["--server", "ws://127.0.0.1:9", "--token", "x", "--label", "a", "--capacity", "1",
                           "--executor", "process", "--json"], env)
    assert flags.urls == ["ws://127.0.0.1:9/ws/agent"] and flags.labels == ["a"] and flags.capacity == 1
    assert flags.executor == "process" and flags.use_json


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"YM_AGENT_TOKEN": "t"}, "no server URL"),
        (["--server", "http://127.0.0.1:1"], {}, "no agent token"),
        (["--server", "http://127.0.0.1:1", "--token", "t", "--capacity", "0"], {}, "at least 1"),
        (["--server", "gopher://x", "--token", "t"], {}, "not an http"),
    ],
)
def test_bad_options(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_options(argv, env)


def test_container_config_is_hardened_by_default() -> None:
    spec = JobSpec(image="img:1", command="echo hi", env={"A": "1"}, workdir="/w",
                   resources=Resources(cpus=0.5, memory_mb=64, pids=32))
    cfg = container_config("job/1", 2, spec, "agent-a")
    host = cfg["HostConfig"]
    assert cfg["Cmd"] == ["/bin/sh", "-c", "echo hi"]
    assert cfg["Env"] == ["A=1"] and cfg["WorkingDir"] == "/w" and cfg["User"] == "65534:65534"
    assert cfg["Labels"] == {"yardmaster.job": "job/1", "yardmaster.attempt": "2", "yardmaster.agent": "agent-a"}
    assert host["ReadonlyRootfs"] is True and host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"] and host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Memory"] == host["MemorySwap"] == 64 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000 and host["PidsLimit"] == 32
    assert host["Tmpfs"] == {"/tmp": "rw,nosuid,nodev,size=64m"}
    assert container_name("job/1", 2) == "ym-job_1-2"
