"""API keys: creation with scopes, listing and revocation. Revoking a key refuses it from then on
(HTTP, tickets issued with it) and closes its open client-channel sockets on every replica with 4001.

A new key's scopes never exceed what the credential that made it may do: the user's role now and,
when that credential is itself a scoped key, that key's scopes (a key cannot mint a stronger one)."""

from __future__ import annotations

import time
from collections.abc import Iterable

import msgspec

from yardmaster.server.backends.base import Store
from yardmaster.server.backends.records import ApiKeyRecord
from yardmaster.server.core.client_sockets import ClientSockets, Revocation
from yardmaster.server.core.ids import new_id
from yardmaster.server.security import scopes as scope_rules
from yardmaster.server.security import tokens
from yardmaster.server.security.principals import Principal

DAY_S = 86_400.0


class ScopeNotGrantable(ValueError):
    """A requested scope is beyond the user's role or the calling credential's scopes."""


def grantable(principal: Principal, requested: Iterable[str] | None) -> list[str]:
    """The scopes a new key of `principal` gets: all the caller's own (None), or the requested
    ones, sorted and unique. ScopeError for an unknown scope; ScopeNotGrantable for one beyond the
    user's role or beyond the calling credential (a key cannot mint a stronger key)."""
    if requested is None:
        return sorted(principal.scopes)
    wanted = sorted(set(requested))
    for scope in wanted:
        if scope not in scope_rules.ALL_SCOPES:
            raise scope_rules.ScopeError(f"unknown scope {scope[:40]!r}; scopes are {', '.join(sorted(scope_rules.ALL_SCOPES))}")
    for scope in wanted:
        if scope not in scope_rules.ROLE_SCOPES[principal.role]:
            raise ScopeNotGrantable(f"scope {scope!r} is beyond the {principal.role} role")
        if not principal.may(scope):
            raise ScopeNotGrantable(f"this credential lacks the {scope} scope, so it cannot grant it")
    return wanted


class RevokeOutcome(msgspec.Struct, frozen=True):
    key: ApiKeyRecord
    newly: bool  # False: it had been revoked before (its first revoked_at stays)


class KeyService:
    def __init__(self, store: Store, sockets: ClientSockets) -> None:
        self._store = store
        self._sockets = sockets

    async def create(
        self, principal: Principal, name: str, scopes: list[str], expires_in_days: int | None = None
    ) -> tuple[str, ApiKeyRecord]:
        """A new key of the principal's user with `scopes` (already checked by `grantable`):
        (the token, shown once; its record). Scopes are stored as a list even when they are all
        of the role, so promoting the user later does not widen the key."""
        token = tokens.new_token("api-key")
        now = time.time()
        rec = ApiKeyRecord(
            id=new_id("key"),
            token_hash=tokens.token_hash(token),
            hint=tokens.hint(token),
            name=name,
            owner=principal.id,
            role=principal.role,
            scopes=scopes,
            created_at=now,
            expires_at=None if expires_in_days is None else now + expires_in_days * DAY_S,
        )
        await self._store.put_api_key(rec)
        return token, rec

    async def list(self, owner: str | None = None) -> list[ApiKeyRecord]:
        return await self._store.list_api_keys(owner=owner)

    async def find(self, key_id: str, owner: str | None = None) -> ApiKeyRecord | None:
        """The key `key_id` (of `owner`, when given), or None."""
        return next((k for k in await self._store.list_api_keys(owner=owner) if k.id == key_id), None)

    async def revoke(self, key_id: str) -> ApiKeyRecord | None:
        """Revoke the key (once: revoking it again keeps the first time); None if unknown."""
        outcome = await self.revoke_once(key_id)
        return outcome.key if outcome is not None else None

    async def revoke_once(self, key_id: str) -> RevokeOutcome | None:
        """Like `revoke`, also saying whether this call is the one that revoked it."""
        at = time.time()
        rec = await self._store.revoke_api_key(key_id, at)
        if rec is None:
            return None
        # Also for a key revoked before: a replica that missed the first message closes now.
        await self._sockets.revoke(Revocation(principal_id=rec.owner, key_id=rec.id))
        return RevokeOutcome(rec, newly=rec.revoked_at == at)
