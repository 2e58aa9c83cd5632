"""Connected agents: the sockets this replica holds, presence in the Broker, and command routing.

The scheduler and the API never hold an agent's socket. They call `send_to_agent`: an agent
connected to this replica is sent to directly; for any other, the agent's replica is looked up in
the Broker's presence and the command published on that replica's channel, and the replica that
holds the socket sends it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal, Protocol

import msgspec

from yardmaster.protocol import messages as m
from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.backends.keys import PRESENCE_AGENT, replica_channel
from yardmaster.server.backends.base import BackendUnavailable, Broker
from yardmaster.server.core.presence import AgentPresence, decode_presence, encode_presence
from yardmaster.server.core.subscriptions import read_forever
from yardmaster.server.observability.metrics import Metrics

log = logging.getLogger("yardmaster.agents")

# Closes the agent's socket so that it connects again and gets a new welcome (new grant).
RECONNECT_REASON = "registration changed: reconnect"


class AgentCommand(msgspec.Struct, kw_only=True):
    agent_id: str
    kind: Literal["send", "revoke", "supersede", "reconnect"]
    session_id: str | None = None  # supersede: the session that must go
    message: m.ServerToAgent | None = None


_cmd_encoder = msgspec.msgpack.Encoder()
_cmd_decoder = msgspec.msgpack.Decoder(AgentCommand)


class AgentLink(Protocol):
    """What an agent channel connection offers the core."""

    agent_id: str
    session_id: str

    async def send(self, msg: m.ServerToAgent) -> None: ...

    async def close(self, code: int, reason: str) -> None: ...


class AgentHub:
    def __init__(self, broker: Broker, metrics: Metrics, replica_id: str, lease_s: float) -> None:
        self._broker = broker
        self._metrics = metrics
        self.replica_id = replica_id
        self._presence_ttl_ms = int(lease_s * 1000)
        self.links: dict[str, AgentLink] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Without this subscription no command would reach the agents connected here; commands
        # missed while it is being made again are recovered from the Store (a lost job-assign's
        # lease expires and the job is re-queued; the leader re-sends pending cancels).
        channel = replica_channel(self.replica_id)
        subscription = await self._broker.subscribe(channel)
        self._reader = asyncio.create_task(
            read_forever(self._broker, channel, subscription, self._handle), name="agent-commands"
        )

    async def close(self, code: int = CloseCode.RESTARTING, reason: str = "server restarting") -> None:
        if self._reader is not None:
            self._reader.cancel()
        links, self.links = list(self.links.values()), {}
        await asyncio.gather(*(link.close(code, reason) for link in links), return_exceptions=True)
        for link in links:
            await self._drop_presence(link)
        self._metrics.agents_connected.set(0)

    def _presence_value(self, link: AgentLink) -> str:
        return encode_presence(AgentPresence(replica=self.replica_id, session=link.session_id))

    async def register(self, link: AgentLink) -> None:
        """Make `link` the agent's one live connection; any older one is closed with 4002."""
        old = self.links.get(link.agent_id)
        self.links[link.agent_id] = link
        self._metrics.agents_connected.set(len(self.links))
        if old is not None and old is not link:
            await old.close(CloseCode.SUPERSEDED, "superseded by a new connection")
        previous = decode_presence(await self._broker.get_presence(PRESENCE_AGENT, link.agent_id), AgentPresence)
        await self._broker.set_presence(
            PRESENCE_AGENT, link.agent_id, self._presence_value(link), self._presence_ttl_ms
        )
        if previous is not None and previous.replica != self.replica_id:
            await self._publish(
                previous.replica, AgentCommand(agent_id=link.agent_id, kind="supersede", session_id=previous.session)
            )

    async def unregister(self, link: AgentLink) -> None:
        if self.links.get(link.agent_id) is link:
            del self.links[link.agent_id]
            self._metrics.agents_connected.set(len(self.links))
        await self._drop_presence(link)

    async def _drop_presence(self, link: AgentLink) -> None:
        try:
            await self._broker.delete_presence(
                PRESENCE_AGENT, link.agent_id, if_value=self._presence_value(link)
            )
        except BackendUnavailable:
            pass  # the entry expires by itself

    async def refresh(self, link: AgentLink) -> None:
        if self.links.get(link.agent_id) is link:
            await self._broker.set_presence(
                PRESENCE_AGENT, link.agent_id, self._presence_value(link), self._presence_ttl_ms
            )

    async def connected(self) -> dict[str, str]:
        """agent id → replica id, for every agent connected to any replica."""
        entries = await self._broker.list_presence(PRESENCE_AGENT)
        connected: dict[str, str] = {}
        for agent_id, raw in entries.items():
            presence = decode_presence(raw, AgentPresence)
            if presence is not None:
                connected[agent_id] = presence.replica
        return connected

    async def send_to_agent(self, agent_id: str, msg: m.ServerToAgent) -> bool:
        """Route a message to the agent wherever it is connected. False if it is not connected."""
        link = self.links.get(agent_id)
        if link is not None:
            # `links` holds the agent's newest connection to this replica (register replaces an
            # older one). Should the agent have moved to another replica a moment ago, this link
            # is being superseded and the message is lost with it: a job-assign's lease expires
            # and the job is re-queued; the leader sends pending cancels again.
            await link.send(msg)
            return True
        return await self._route(AgentCommand(agent_id=agent_id, kind="send", message=msg))

    async def revoke(self, agent_id: str) -> None:
        await self._route(AgentCommand(agent_id=agent_id, kind="revoke"))

    async def reconnect(self, agent_id: str) -> bool:
        """Close the agent's socket (1001) so it connects again; its jobs keep running meanwhile."""
        return await self._route(AgentCommand(agent_id=agent_id, kind="reconnect"))

    async def _route(self, command: AgentCommand) -> bool:
        presence = decode_presence(await self._broker.get_presence(PRESENCE_AGENT, command.agent_id), AgentPresence)
        if presence is None:
            # Not connected anywhere we know of; a local socket may still exist briefly.
            if command.agent_id in self.links:
                await self._execute(command)
                return True
            return False
        if presence.replica == self.replica_id:
            await self._execute(command)
        else:
            await self._publish(presence.replica, command)
        return True

    async def _publish(self, replica: str, command: AgentCommand) -> None:
        await self._broker.publish(replica_channel(replica), _cmd_encoder.encode(command))

    async def _handle(self, data: bytes) -> None:
        await self._execute(_cmd_decoder.decode(data))

    async def _execute(self, command: AgentCommand) -> None:
        link = self.links.get(command.agent_id)
        if link is None:
            return
        if command.kind == "send" and command.message is not None:
            await link.send(command.message)
        elif command.kind == "revoke":
            await link.close(CloseCode.REVOKED, "agent token revoked")
        elif command.kind == "reconnect":
            await link.close(CloseCode.GOING_AWAY, RECONNECT_REASON)
        elif command.kind == "supersede" and command.session_id == link.session_id:
            await link.close(CloseCode.SUPERSEDED, "superseded by a new connection")
