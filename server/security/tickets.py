"""Short-lived, single-use tickets for browser WebSockets (which cannot send headers).

Kept in the Broker's presence with a TTL, so any replica can redeem a ticket another issued;
`delete_presence(if_value=...)` makes redeeming atomic: only one redeemer wins. A ticket stands
for the credential it was issued with: one whose API key was revoked or expired since, or whose
access token was signed out or expired since, is refused.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable

import msgspec

from yardmaster.server.backends.base import Broker
from yardmaster.server.backends.keys import PRESENCE_TICKET
from yardmaster.server.security import tokens
from yardmaster.server.security.principals import Principal

TICKET_PREFIX = "ymt_"


class TicketService:
    def __init__(self, broker: Broker, still_valid: Callable[[Principal], Awaitable[bool]], ttl_s: float) -> None:
        self._broker = broker
        self._still_valid = still_valid  # the runtime's check of a credential, as the socket sweep uses
        self.ttl_s = ttl_s

    async def issue(self, principal: Principal) -> str:
        ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
        await self._broker.set_presence(
            PRESENCE_TICKET, tokens.token_hash(ticket), msgspec.json.encode(principal).decode(), int(self.ttl_s * 1000)
        )
        return ticket

    async def redeem(self, ticket: str) -> Principal | None:
        """The ticket's principal, once; None for an unknown, used, expired or forged ticket, or
        one whose credential no longer works. Either way the ticket is used up."""
        if not ticket.startswith(TICKET_PREFIX) or len(ticket) > 100:
            return None
        key = tokens.token_hash(ticket)
        value = await self._broker.get_presence(PRESENCE_TICKET, key)
        if value is None or not await self._broker.delete_presence(PRESENCE_TICKET, key, if_value=value):
            return None
        principal = msgspec.json.decode(value, type=Principal)
        return principal if await self._still_valid(principal) else None
