"""Routing messages to agents: an agent connected to this replica is sent to directly (no presence
lookup, no Broker publish); one connected to another replica is reached over the Broker."""

from __future__ import annotations

import asyncio

from tests.core.conftest import MESSAGE_WAIT_S, FakeAgentLink
from yardmaster.protocol import messages as m
from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.core.agents import AgentHub
from yardmaster.server.observability.metrics import Metrics

CANCEL = m.Cancel(job_id="job_1", attempt=1, reason="test", grace_s=1.0)


class CountingBroker(MemoryBroker):
    """A real MemoryBroker that records presence reads and publishes."""

    def __init__(self) -> None:
        super().__init__()
        self.presence_reads: list[str] = []
        self.published: list[str] = []

    async def get_presence(self, kind: str, member: str) -> str | None:
        self.presence_reads.append(member)
        return await super().get_presence(kind, member)

    async def publish(self, channel: str, data: bytes) -> None:
        self.published.append(channel)
        await super().publish(channel, data)


async def replica(broker: CountingBroker, replica_id: str) -> AgentHub:
    hub = AgentHub(broker, Metrics(), replica_id, lease_s=30)
    await hub.start()
    return hub


async def test_a_local_agent_gets_its_message_without_the_broker() -> None:
    broker = CountingBroker()
    hub = await replica(broker, "rep_a")
    try:
        link = FakeAgentLink("agt_local")
        await hub.register(link)
        broker.presence_reads.clear()
        broker.published.clear()
        assert await hub.send_to_agent("agt_local", CANCEL)
        assert link.sent == [CANCEL]
        assert broker.presence_reads == [] and broker.published == []
    finally:
        await hub.close()


async def test_an_agent_on_another_replica_is_reached_over_the_broker() -> None:
    broker = CountingBroker()
    here, there = await replica(broker, "rep_a"), await replica(broker, "rep_b")
    try:
        link = FakeAgentLink("agt_remote")
        await there.register(link)
        broker.published.clear()
        assert await here.send_to_agent("agt_remote", CANCEL)
        assert broker.published == ["replica:rep_b"]
        assert await asyncio.wait_for(link.next(m.Cancel), MESSAGE_WAIT_S) == CANCEL
        assert not await here.send_to_agent("agt_nowhere", CANCEL)
    finally:
        await here.close()
        await there.close()


async def test_revoking_a_local_agent_closes_it_without_a_publish() -> None:
    broker = CountingBroker()
    hub = await replica(broker, "rep_a")
    try:
        link = FakeAgentLink("agt_revoked")
        await hub.register(link)
        broker.published.clear()
        await hub.revoke("agt_revoked")
        assert link.closed is not None and link.closed[0] == CloseCode.REVOKED
        assert broker.published == []
    finally:
        await hub.close()
