"""The client-channel sockets open on this replica, by principal, and the revocations that close them.

A revocation (of one API key, or of every key of a principal) is published on the Broker's
`principals` channel, and every replica closes its matching sockets with 4001. One missed while
the subscription is being made again (a Broker outage) is caught by a sweep that re-checks, in
the Store, the keys of the sockets still open.

The quota of open sockets per user (YM_QUOTA_CLIENT_SOCKETS) holds across replicas: each socket
holds a Broker slot (`keys.client_sockets_slots(user)`) that this replica renews while the socket
is open and releases at its close; a replica that dies leaves slots that expire after SLOT_TTL_S.
While the Broker is down, a handshake is counted against this replica's sockets only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.backends.base import BackendUnavailable, Broker
from yardmaster.server.backends.keys import PRINCIPALS_CHANNEL, client_sockets_slots
from yardmaster.server.core.ids import new_id
from yardmaster.server.core.subscriptions import read_forever
from yardmaster.server.security.principals import Principal

log = logging.getLogger("yardmaster.client_sockets")

SWEEP_S = 30.0
SLOT_TTL_S = 60.0
SLOT_RENEW_S = 20.0
REVOKED_REASON = "credential revoked"


class ClientLink(Protocol):
    """What a client channel connection offers the core."""

    principal: Principal

    def close(self, code: int, reason: str) -> None: ...


class Revocation(msgspec.Struct, kw_only=True, frozen=True):
    """Close the sockets of one principal: those of one API key (`key_id`), of one access token
    (`token_id`), of every access token (`access_tokens`: every session signed out, API keys
    kept), or, with none of these, all of them."""

    principal_id: str
    key_id: str | None = None
    token_id: str | None = None
    access_tokens: bool = False

    def matches(self, principal: Principal) -> bool:
        if principal.id != self.principal_id:
            return False
        if self.key_id is not None and principal.key_id != self.key_id:
            return False
        if self.token_id is not None and principal.token_id != self.token_id:
            return False
        return not self.access_tokens or principal.credential == "access-token"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Revocation)

StillValid = Callable[[Principal], Awaitable[bool]]
OnRevocation = Callable[[Revocation], object]


class ClientSockets:
    def __init__(
        self, broker: Broker, still_valid: StillValid, sweep_s: float = SWEEP_S, on_revocation: OnRevocation | None = None,
        slot_ttl_s: float = SLOT_TTL_S, slot_renew_s: float = SLOT_RENEW_S,
    ) -> None:
        self._broker = broker
        self._still_valid = still_valid
        # Also told of every revocation, this replica's own at once: e.g. the API-key cache.
        self._on_revocation = on_revocation
        self._sweep_s = sweep_s
        self._by_principal: dict[str, set[ClientLink]] = {}
        self._slots: dict[ClientLink, str] = {}  # sockets holding a Broker slot: their member name
        self._slot_ttl_ms = int(slot_ttl_s * 1000)
        self._slot_renew_s = slot_renew_s
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        subscription = await self._broker.subscribe(PRINCIPALS_CHANNEL)
        self._tasks = [
            asyncio.create_task(
                read_forever(self._broker, PRINCIPALS_CHANNEL, subscription, self._handle), name="client-revocations"
            ),
            asyncio.create_task(_every(self._sweep_s, self.sweep, "revocation sweep"), name="client-revocation-sweep"),
            asyncio.create_task(_every(self._slot_renew_s, self.renew_slots, "renewing client-socket slots"),
                                name="client-socket-slots"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    # ---- the registry ---------------------------------------------------------------------------

    def try_add(self, link: ClientLink, limit: int) -> bool:
        """Register `link` unless its principal already has `limit` sockets here. Checking and
        adding in one step (no await between) keeps concurrent handshakes under the cap."""
        links = self._by_principal.setdefault(link.principal.id, set())
        if len(links) >= limit:
            if not links:
                del self._by_principal[link.principal.id]
            return False
        links.add(link)
        return True

    async def open(self, link: ClientLink, quota: int) -> bool:
        """Register `link` unless its user already has `quota` sockets open on all replicas
        (0: no quota). Falls back to this replica's count while the Broker is down."""
        if quota <= 0:
            return self.try_add(link, 1 << 62)
        member = new_id("sock")
        name = client_sockets_slots(link.principal.id)
        try:
            held = await self._broker.acquire_slot(name, member, quota, self._slot_ttl_ms)
        except BackendUnavailable as exc:
            log.warning("client-socket quota counted on this replica only", extra={"reason": str(exc)})
            return self.try_add(link, quota)
        if not held:
            return False
        if not self.try_add(link, quota):  # over it here, with sockets admitted while the Broker was down
            await self._release_slot(name, member)
            return False
        self._slots[link] = member
        return True

    async def release(self, link: ClientLink) -> None:
        """Unregister a closed socket and free its slot."""
        self.remove(link)
        member = self._slots.pop(link, None)
        if member is not None:
            await self._release_slot(client_sockets_slots(link.principal.id), member)

    async def _release_slot(self, name: str, member: str) -> None:
        try:
            await self._broker.release_slot(name, member)
        except BackendUnavailable:
            pass  # it expires on its own

    async def renew_slots(self) -> None:
        held = [(client_sockets_slots(link.principal.id), member) for link, member in self._slots.items()]
        if held:
            await self._broker.renew_slots(held, self._slot_ttl_ms)

    def remove(self, link: ClientLink) -> None:
        links = self._by_principal.get(link.principal.id)
        if links is not None:
            links.discard(link)
            if not links:
                del self._by_principal[link.principal.id]

    def count(self, principal_id: str) -> int:
        return len(self._by_principal.get(principal_id, ()))

    # ---- revocation -------------------------------------------------------------------------------

    async def revoke(self, revocation: Revocation) -> None:
        """Close the matching sockets on every replica (this one included)."""
        if self._on_revocation is not None:
            self._on_revocation(revocation)  # before the publish returns, not when it comes back
        try:
            await self._broker.publish(PRINCIPALS_CHANNEL, _encoder.encode(revocation))
        except BackendUnavailable as exc:
            # The other replicas' sweeps find the revoked key in the Store.
            log.warning("revocation not published", extra={"reason": str(exc)})
            self.close_matching(revocation)

    def close_matching(self, revocation: Revocation) -> int:
        links = [link for link in self._by_principal.get(revocation.principal_id, ()) if revocation.matches(link.principal)]
        for link in links:
            link.close(CloseCode.REVOKED, REVOKED_REASON)
        return len(links)

    async def _handle(self, data: bytes) -> None:
        revocation = _decoder.decode(data)
        if self._on_revocation is not None:
            self._on_revocation(revocation)
        self.close_matching(revocation)

    async def sweep(self) -> int:
        """Close the sockets whose credential no longer works; how many were closed."""
        principals = {link.principal for links in self._by_principal.values() for link in links}
        closed = 0
        for principal in principals:
            if not await self._still_valid(principal):
                closed += self.close_matching(
                    Revocation(principal_id=principal.id, key_id=principal.key_id, token_id=principal.token_id)
                )
        return closed


async def _every(seconds: float, work: Callable[[], Awaitable[object]], what: str) -> None:
    """Run `work` every `seconds`, for ever. While state is unreachable it is tried again next
    time (a missed sweep is caught by the next; slots live three renewals)."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await work()
        except BackendUnavailable:
            pass
        except Exception:
            log.exception("%s failed", what)
