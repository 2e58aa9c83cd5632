"""Tokens, settings and placement decisions: pure code."""

from __future__ import annotations

import pytest

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
    assert "hunter2" not in repr(load_settings({"YM_ADMIN_KEY": "ymk_x", "YM_REDIS_URL": secret}).admin_key)


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
