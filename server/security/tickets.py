"""Short-lived, single-use tickets for browser WebSockets (which cannot send headers).

Kept in the Broker's presence with a TTL, so any replica can redeem a ticket another issued;
`delete_presence(if_value=...)` makes redeeming atomic: only one redeemer wins.
"""

from __future__ import annotations

import secrets

import msgspec

from yardmaster.server.backends.base import Broker
from yardmaster.server.backends.keys import PRESENCE_TICKET
from yardmaster.server.security import tokens
from yardmaster.server.security.principals import Principal



class TicketService:
    def __init__(self, broker: Broker, ttl_s: float) -> None:
        self._broker = broker
        self.ttl_s = ttl_s

    async def issue(self, principal: Principal) -> str:
        ticket = "ymt_" + secrets.token_urlsafe(32)
        await self._broker.set_presence(
            PRESENCE_TICKET, tokens.token_hash(ticket), msgspec.json.encode(principal).decode(), int(self.ttl_s * 1000)
        )
        return ticket

    async def redeem(self, ticket: str) -> Principal | None:
        if not ticket.startswith("ymt_") or len(ticket) > 100:
            return None
        key = tokens.token_hash(ticket)
        value = await self._broker.get_presence(PRESENCE_TICKET, key)
        if value is None or not await self._broker.delete_presence(PRESENCE_TICKET, key, if_value=value):
            return None
        return msgspec.json.decode(value, type=Principal)
