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


def choose_agent(required_labels: Iterable[str], agents: list[AgentSlots]) -> AgentSlots | None:
    """The agent with all required labels and the most free slots (spreads load); None if none fits."""
    required = frozenset(required_labels)
    best: AgentSlots | None = None
    for agent in agents:
        if agent.free <= 0 or not required <= agent.labels:
            continue
        if best is None or (agent.free, -agent.order) > (best.free, -best.order):
            best = agent
    return best
