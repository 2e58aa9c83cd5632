"""What the Broker's presence entries hold: msgspec Structs, stored as JSON text.

An entry that does not decode (written by another version, or damaged) reads as absent: presence
is refreshed every few seconds, so a missing entry heals by itself.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec


class AgentPresence(msgspec.Struct, kw_only=True, frozen=True):
    """Which replica holds an agent's socket, and which session of that agent it is."""

    replica: str
    session: str


class ReplicaPresence(msgspec.Struct, kw_only=True, frozen=True):
    """A live replica: where it runs (for `GET /api/v1/cluster`)."""

    host: str
    pid: int


P = TypeVar("P", AgentPresence, ReplicaPresence)

_encoder = msgspec.json.Encoder()


def encode_presence(value: AgentPresence | ReplicaPresence) -> str:
    """Deterministic for equal values, so `delete_presence(if_value=...)` compares them exactly."""
    return _encoder.encode(value).decode()


def decode_presence(raw: str | None, cls: type[P]) -> P | None:
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=cls)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
