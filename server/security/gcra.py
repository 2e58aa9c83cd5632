"""The generic cell rate algorithm (GCRA), pure: the rate limiter's one rule.

A bucket of `limit` requests per `period` stores one number, its theoretical arrival time (TAT).
A request costs period/limit of it; a bucket allows a burst of `limit`, then one request every
period/limit, and is full again `period` after its last use. RedisBroker runs the same arithmetic
in Lua (backends/redis_broker.py); the Broker contract suite holds both to the same counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Float slack, in ms: three requests of 333.33… ms must fill a 1,000 ms bucket exactly.
EPSILON_MS = 1e-3


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    tat_ms: float  # the bucket's TAT after this request (unchanged when refused)
    remaining: int
    retry_after_ms: int
    reset_ms: int


def gcra(tat_ms: float | None, now_ms: float, limit: int, period_ms: float, cost: int = 1) -> Verdict:
    """The verdict on one request of `cost` against a bucket whose TAT is `tat_ms` (None: unused)."""
    interval = period_ms / limit
    tat = now_ms if tat_ms is None or tat_ms < now_ms else tat_ms
    new_tat = tat + interval * cost
    allow_at = new_tat - period_ms
    if allow_at - now_ms > EPSILON_MS:
        remaining = max(0, math.floor((now_ms - (tat - period_ms)) / interval + EPSILON_MS))
        return Verdict(False, tat, remaining, math.ceil(allow_at - now_ms - EPSILON_MS), math.ceil(tat - now_ms - EPSILON_MS))
    remaining = max(0, math.floor((now_ms - allow_at) / interval + EPSILON_MS))
    return Verdict(True, new_tat, remaining, 0, math.ceil(new_tat - now_ms - EPSILON_MS))


def combine(verdicts: list[Verdict]) -> tuple[bool, int, int, int]:
    """(allowed, remaining, retry_after_ms, reset_ms) of one request on several buckets: allowed
    only if all allow; the most constrained bucket's remaining, the latest retry and reset."""
    allowed = all(v.allowed for v in verdicts)
    remaining = min(v.remaining for v in verdicts)
    retry = max((v.retry_after_ms for v in verdicts if not v.allowed), default=0)
    return allowed, remaining, retry, max(v.reset_ms for v in verdicts)
