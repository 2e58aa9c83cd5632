"""WebSocket close codes of both channels: the one list the server, the agent and the clients use.

Codes 1000-1015 are RFC 6455's; 4000-4999 are ours (docs/protocol.md says what each means and
whether a peer should come back).
"""

from __future__ import annotations

import enum


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY = 1008  # refused by policy (e.g. a client that keeps flooding)
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    RESTARTING = 1012  # the server is shutting down: reconnect, to another replica if there is one
    REVOKED = 4001  # the credential was revoked: do not come back with it
    SUPERSEDED = 4002  # a newer connection of the same agent took over
    PROTOCOL_ERROR = 4003  # broken or unsupported protocol: do not come back unchanged
    TOO_SLOW = 4008  # the peer did not read fast enough: resume by offset


# An agent that gets one of these exits instead of reconnecting.
AGENT_FATAL: frozenset[CloseCode] = frozenset({CloseCode.REVOKED, CloseCode.SUPERSEDED, CloseCode.PROTOCOL_ERROR})
