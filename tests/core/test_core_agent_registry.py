"""AgentRegistry in one replica: what a hello is granted, and admins changing the registration."""

from __future__ import annotations

import asyncio

import pytest

from yardmaster.protocol import messages as m
from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.core.agent_registry import AgentNotFound
from yardmaster.server.core.agents import RECONNECT_REASON
from tests.core.conftest import MESSAGE_WAIT_S, Core


async def test_hello_records_the_declaration_and_grants_the_registration(core: Core) -> None:
    link = await core.add_agent(labels=["a"], capacity=2)
    outcome = await core.rt.agent_registry.hello(
        link.agent_id, m.Hello(name="n", version="1", labels=["prod", "bad label"], capacity=9, executor="process")
    )
    assert (outcome.grant.labels, outcome.grant.capacity) == (["a"], 2)
    assert outcome.refused_labels == ["bad label"] and outcome.not_granted == ["prod", "bad label"]
    rec = await core.store.get_agent(link.agent_id)
    assert rec is not None and (rec.labels, rec.declared_labels, rec.declared_capacity, rec.executor) == (
        ["a"], ["prod"], 9, "process")


async def test_an_update_is_used_by_the_next_scheduling_pass(core: Core) -> None:
    link = await core.add_agent(labels=["a"], capacity=1)
    await core.lead()
    job = await core.submit(labels=["b"])
    assert await core.rt.scheduler.tick() == 0
    await core.rt.agent_registry.update(link.agent_id, labels=["b"])
    await core.assign(job, link)


async def test_a_connected_agent_reconnects_only_when_its_grant_changes(core: Core) -> None:
    link = await core.add_agent(labels=["a"], capacity=2)
    await core.rt.agent_registry.hello(link.agent_id, m.Hello(name="n", version="1", capacity=2))
    agent, connected = await core.rt.agent_registry.update(link.agent_id, labels=["a"], capacity=5)
    assert connected and (agent.capacity, agent.declared_capacity) == (5, 2)
    # Commands to an agent arrive in order: once this one is there, a reconnect would have been too.
    await core.rt.agents.send_to_agent(link.agent_id, m.Drain(reason="probe"))
    await link.next(m.Drain)
    assert link.closed is None  # still min(2, 5) = 2 slots and label "a": nothing to tell it
    await core.rt.agent_registry.update(link.agent_id, capacity=1)
    async with asyncio.timeout(MESSAGE_WAIT_S):  # the command goes through the Broker's pub/sub
        while link.closed is None:
            await asyncio.sleep(0.001)
    assert link.closed == (CloseCode.GOING_AWAY, RECONNECT_REASON)


async def test_unknown_agents_are_not_found(core: Core) -> None:
    registry = core.rt.agent_registry
    with pytest.raises(AgentNotFound):
        await registry.update("agt_nope", capacity=1)
    with pytest.raises(AgentNotFound):
        await registry.drain("agt_nope")
    with pytest.raises(AgentNotFound):
        await registry.revoke("agt_nope")
