"""API keys: listing and revocation. Revoking a key refuses it from then on (HTTP, tickets issued
with it) and closes its open client-channel sockets on every replica with 4001."""

from __future__ import annotations

import time

from yardmaster.server.backends.base import Store
from yardmaster.server.backends.records import ApiKeyRecord
from yardmaster.server.core.client_sockets import ClientSockets, Revocation


class KeyService:
    def __init__(self, store: Store, sockets: ClientSockets) -> None:
        self._store = store
        self._sockets = sockets

    async def list(self, owner: str | None = None) -> list[ApiKeyRecord]:
        return await self._store.list_api_keys(owner=owner)

    async def revoke(self, key_id: str) -> ApiKeyRecord | None:
        """Revoke the key (once: revoking it again keeps the first time); None if unknown."""
        rec = await self._store.revoke_api_key(key_id, time.time())
        if rec is not None:
            # Also for a key revoked before: a replica that missed the first message closes now.
            await self._sockets.revoke(Revocation(principal_id=rec.owner, key_id=rec.id))
        return rec
