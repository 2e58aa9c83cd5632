"""Which connected agent takes a job: a pure decision, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class AgentSlots:
    agent_id: str
    labels: frozenset[str]
    free: int
    order: int = field(default=0)  # tie-breaker: stable across one scheduling pass
    executor: str = "docker"  # what its hello said: "docker", "process", or anything else


def choose_agent(required_labels: Iterable[str], agents: list[AgentSlots], executor: str = "docker") -> AgentSlots | None:
    """The agent of the job's executor, with all required labels and the most free slots (spreads
    load); None if none fits. Executors must match exactly, so an unsandboxed `process` agent never
    runs a job that expected a container, and a `process` job never lands on a Docker agent."""
    required = frozenset(required_labels)
    best: AgentSlots | None = None
    for agent in agents:
        if agent.free <= 0 or agent.executor != executor or not required <= agent.labels:
            continue
        if best is None or (agent.free, -agent.order) > (best.free, -best.order):
            best = agent
    return best
