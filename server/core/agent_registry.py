"""Agents as records: registration and tokens, what a hello is granted, drain, update, revoke.

The registration decides what an agent does, not the agent: its effective labels are the
registered ones, or, only when it was registered with none, the valid labels its hello declares;
its effective capacity is min(declared, registered). The HTTP API and the agent channel only
translate to and from these calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgspec

from yardmaster.protocol import messages as m
from yardmaster.protocol.jobs import Label
from yardmaster.server.backends.base import Store
from yardmaster.server.backends.records import AgentRecord
from yardmaster.server.core.agents import AgentHub
from yardmaster.server.core.ids import new_id
from yardmaster.server.security import tokens

log = logging.getLogger("yardmaster.agents")

MAX_LABELS = 64  # the same bound as a job's labels (protocol.jobs.JobSpec)
MAX_CAPACITY = 1024
AGENT_TEXT_LIMIT = 200  # agent-supplied strings in log lines and records


def clip(text: str, limit: int = AGENT_TEXT_LIMIT) -> str:
    """An agent-supplied string cut to `limit` characters before it reaches a log line or a record."""
    return text if len(text) <= limit else text[:limit] + "..."


def _is_label(value: str) -> bool:
    try:
        msgspec.convert(value, Label)
    except msgspec.ValidationError:
        return False
    return True


def sanitize_labels(declared: Iterable[str]) -> tuple[list[str], list[str]]:
    """(valid labels, sorted, unique, at most MAX_LABELS; the refused rest, in hello order)."""
    valid: set[str] = set()
    refused: list[str] = []
    for label in declared:
        (valid.add if _is_label(label) else refused.append)(label)
    ordered = sorted(valid)
    return ordered[:MAX_LABELS], refused + ordered[MAX_LABELS:]


def clamp_capacity(capacity: int) -> int:
    return max(0, min(capacity, MAX_CAPACITY))


@dataclass(frozen=True)
class Grant:
    """What placement uses for an agent."""

    labels: list[str]
    capacity: int


def grant_of(agent: AgentRecord) -> Grant:
    labels = agent.labels if agent.labels else agent.declared_labels
    capacity = agent.capacity if agent.declared_capacity is None else min(agent.capacity, agent.declared_capacity)
    return Grant(labels=sorted(labels), capacity=capacity)


@dataclass(frozen=True)
class HelloOutcome:
    agent: AgentRecord
    grant: Grant
    refused_labels: list[str]  # declared labels that are invalid or over the count limit
    not_granted: list[str]  # declared labels (valid or not) missing from the grant


class AgentNotFound(LookupError):
    pass


class AgentRegistry:
    def __init__(self, store: Store, hub: AgentHub, agents_changed: Callable[[], None] = lambda: None) -> None:
        self._store = store
        self._hub = hub
        self._agents_changed = agents_changed  # the scheduler re-reads agents, then schedules

    # ---- admins ----------------------------------------------------------------------------

    async def create(self, name: str, labels: list[str], capacity: int) -> tuple[AgentRecord, str]:
        """Register an agent; returns its record and its token (stored only as a hash)."""
        token = tokens.new_token("agent")
        agent = AgentRecord(
            id=new_id("agt"),
            name=name,
            token_hash=tokens.token_hash(token),
            labels=sorted(set(labels)),
            capacity=capacity,
            created_at=time.time(),
        )
        await self._store.put_agent(agent)
        return agent, token

    async def list_agents(self) -> list[tuple[AgentRecord, bool]]:
        """Every agent, with whether it is connected to any replica."""
        connected = await self._hub.connected()
        return [(agent, agent.id in connected) for agent in await self._store.list_agents()]

    async def revoke(self, agent_id: str) -> AgentRecord:
        agent = await self._store.revoke_agent(agent_id, time.time())
        if agent is None:
            raise AgentNotFound(agent_id)
        await self._hub.revoke(agent.id)  # closes its live socket (4001) wherever it is
        return agent

    async def drain(self, agent_id: str) -> tuple[AgentRecord, bool]:
        """No new jobs until it connects afresh; a connected agent is told to finish and leave."""
        agent = await self._store.update_agent(agent_id, {"draining_since": time.time()})
        if agent is None:
            raise AgentNotFound(agent_id)
        connected = await self._hub.send_to_agent(agent.id, m.Drain(reason="drain requested by an admin"))
        return agent, connected

    async def update(
        self, agent_id: str, *, labels: list[str] | None = None, capacity: int | None = None
    ) -> tuple[AgentRecord, bool]:
        """Change the registration. The scheduler reads it on its next pass; a connected agent
        whose grant changed is made to reconnect, so its welcome (and slot count) follows."""
        changes: dict[str, object] = {}
        if labels is not None:
            changes["labels"] = sorted(set(labels))
        if capacity is not None:
            changes["capacity"] = capacity
        before = await self._store.get_agent(agent_id)
        if before is None:
            raise AgentNotFound(agent_id)
        agent = await self._store.update_agent(agent_id, changes) if changes else before
        if agent is None:
            raise AgentNotFound(agent_id)
        connected = agent.id in await self._hub.connected()
        if connected and grant_of(agent) != grant_of(before):
            await self._hub.reconnect(agent.id)
        self._agents_changed()
        return agent, connected

    # ---- the agent itself --------------------------------------------------------------------

    async def hello(self, agent_id: str, hello: m.Hello) -> HelloOutcome:
        """Record what the agent says about itself and decide what it is granted."""
        declared, refused = sanitize_labels(hello.labels)
        agent = await self._store.update_agent(
            agent_id,
            {
                "last_seen_at": time.time(),
                "version": clip(hello.version, 64),
                "executor": clip(hello.executor, 64),
                "declared_labels": declared,
                "declared_capacity": clamp_capacity(hello.capacity),
                "draining_since": None,  # a fresh connection (a restarted agent) takes jobs again
            },
        )
        if agent is None:
            raise AgentNotFound(agent_id)
        grant = grant_of(agent)
        granted = set(grant.labels)
        not_granted = [label for label in dict.fromkeys(hello.labels) if label not in granted]
        return HelloOutcome(agent=agent, grant=grant, refused_labels=refused, not_granted=not_granted)

    async def seen(self, agent_id: str) -> None:
        await self._store.update_agent(agent_id, {"last_seen_at": time.time()})
