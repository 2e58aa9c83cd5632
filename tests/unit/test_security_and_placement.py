"""Tokens, settings and placement decisions: pure code."""

from __future__ import annotations

import pytest

from yardmaster.server.backends.records import AgentRecord
from yardmaster.server.core.agent_registry import Grant, clip, grant_of, sanitize_labels
from yardmaster.server.core.placement import AgentSlots, choose_agent
from yardmaster.server.security import tokens
from yardmaster.server.settings import SettingsError, load_settings


def test_tokens_are_prefixed_checksummed_and_distinct_by_kind() -> None:
    key = tokens.new_token("api-key")
    agent = tokens.new_token("agent")
    assert key.startswith("ymk_") and agent.startswith("yma_")
    assert tokens.well_formed(key, "api-key") and not tokens.well_formed(key, "agent")
    assert tokens.well_formed(agent, "agent") and not tokens.well_formed(agent, "api-key")
    mistyped = key[:10] + ("A" if key[10] != "A" else "B") + key[11:]
    assert not tokens.well_formed(mistyped, "api-key")
    assert not tokens.well_formed(key + "x", "api-key")
    assert len({tokens.new_token("api-key") for _ in range(100)}) == 100
    assert tokens.token_hash(key) != tokens.token_hash(agent) and len(tokens.token_hash(key)) == 64
    assert key not in tokens.hint(key)


def test_settings_from_environment_are_validated_by_name() -> None:
    s = load_settings({"YM_PORT": "9000", "YM_ALLOWED_ORIGINS": "https://a.example, https://b.example"})
    assert s.port == 9000 and s.allowed_origins == ("https://a.example", "https://b.example")
    assert not s.scale_out
    with pytest.raises(SettingsError, match="YM_PORT"):
        load_settings({"YM_PORT": "eighty"})
    with pytest.raises(SettingsError, match="YM_LEASE_S"):
        load_settings({"YM_LEASE_S": "5", "YM_HEARTBEAT_INTERVAL_S": "10"})
    with pytest.raises(SettingsError, match="YM_REDIS_URL"):
        load_settings({"YM_REDIS_URL": "http://nope"})
    secret = "redis://:hunter2@localhost"
    key = tokens.new_token("api-key")
    loaded = load_settings({"YM_ADMIN_KEY": key, "YM_REDIS_URL": secret})
    assert "hunter2" not in repr(loaded) and key not in repr(loaded)
    with pytest.raises(SettingsError, match="YM_ADMIN_KEY") as info:
        load_settings({"YM_ADMIN_KEY": key[:-1] + "x"})
    assert key[:-1] not in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("YM_MAX_REQUEST_BODY_BYTES", "-5"),
        ("YM_VIEWER_BUFFER_BYTES", "12"),
        ("YM_LOG_CAP_BYTES", "-1"),
        ("YM_LEASE_S", "-1"),
        ("YM_PORT", "70000"),
        ("YM_ALLOW_ROOT_JOBS", "maybe"),
        ("YM_MAX_JOB_CPUS", "-3"),
        ("YM_QUOTA_CLIENT_SOCKETS", "-2"),
    ],
)
def test_settings_out_of_range_are_refused_naming_the_variable_not_the_value(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name) as info:
        load_settings({name: value})
    assert value not in str(info.value).replace(name, "")


def test_settings_parse_booleans_lists_and_empty_optionals() -> None:
    s = load_settings({"YM_ALLOW_ROOT_JOBS": "true", "YM_ALLOWED_IMAGES": "busybox:*, ghcr.io/acme/*", "YM_ADMIN_KEY": ""})
    assert s.allow_root_jobs is True
    assert s.allowed_images == ("busybox:*", "ghcr.io/acme/*")
    assert s.admin_key is None
    assert load_settings({}).effective_trusted_hosts()[:2] == ("127.0.0.1", "localhost")
    with pytest.raises(SettingsError, match="YM_TLS_CERT_FILE"):
        load_settings({"YM_TLS_CERT_FILE": "/x.pem"})


def _agents(*specs: tuple[str, set[str], int]) -> list[AgentSlots]:
    return [AgentSlots(agent_id=a, labels=frozenset(l), free=f, order=i) for i, (a, l, f) in enumerate(specs)]


def test_placement_requires_every_label_and_a_free_slot() -> None:
    agents = _agents(("a", {"linux"}, 2), ("b", {"linux", "gpu"}, 0), ("c", {"linux", "gpu"}, 1))
    chosen = choose_agent(["gpu"], agents)
    assert chosen is not None and chosen.agent_id == "c"
    assert choose_agent(["arm"], agents) is None
    assert choose_agent([], _agents(("a", set(), 0))) is None


def test_placement_spreads_to_the_agent_with_most_free_slots_then_stable_order() -> None:
    agents = _agents(("a", set(), 1), ("b", set(), 3), ("c", set(), 3))
    chosen = choose_agent([], agents)
    assert chosen is not None and chosen.agent_id == "b"


def test_placement_matches_the_executor_exactly() -> None:
    agents = [
        AgentSlots(agent_id="proc", labels=frozenset(), free=5, order=0, executor="process"),
        AgentSlots(agent_id="dock", labels=frozenset(), free=1, order=1, executor="docker"),
        AgentSlots(agent_id="odd", labels=frozenset(), free=9, order=2, executor="podman"),
    ]
    docker_job = choose_agent([], agents)  # a job's executor is "docker" unless it asks otherwise
    assert docker_job is not None and docker_job.agent_id == "dock"
    process_job = choose_agent([], agents, "process")
    assert process_job is not None and process_job.agent_id == "proc"
    only_process = [a for a in agents if a.executor != "docker"]
    assert choose_agent([], only_process, "docker") is None  # never an unsandboxed host
    assert choose_agent([], agents[1:], "process") is None  # never a process job on Docker


def _agent(**fields: object) -> AgentRecord:
    return AgentRecord(id="agt_1", name="a", token_hash="h", created_at=0.0, **fields)  # type: ignore[arg-type]


def test_the_registration_decides_labels_and_capacity() -> None:
    # Registered labels win; what the agent declares is ignored.
    assert grant_of(_agent(labels=["a"], capacity=2, declared_labels=["prod"], declared_capacity=8)) == Grant(["a"], 2)
    # Registered with none: the declared labels apply. Capacity is min(declared, registered).
    assert grant_of(_agent(labels=[], capacity=4, declared_labels=["gpu"], declared_capacity=1)) == Grant(["gpu"], 1)
    # Never said hello: the registration as it is.
    assert grant_of(_agent(labels=["b"], capacity=3)) == Grant(["b"], 3)
    assert grant_of(_agent(labels=["b"], capacity=3, declared_capacity=0)) == Grant(["b"], 0)


def test_declared_labels_follow_the_job_label_rule() -> None:
    valid, refused = sanitize_labels(["linux", "has space", "linux", "-dash-first", "x" * 129, "arm64"])
    assert valid == ["arm64", "linux"]
    assert refused == ["has space", "-dash-first", "x" * 129]
    many = [f"l{i:03d}" for i in range(70)]
    valid, refused = sanitize_labels(many)
    assert valid == many[:64] and refused == many[64:]


def test_clip_bounds_agent_supplied_text() -> None:
    assert clip("short") == "short"
    assert clip("x" * 10_000) == "x" * 200 + "..."
    assert clip("y" * 100, 10) == "y" * 10 + "..."
