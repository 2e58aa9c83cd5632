"""Who is calling: principals and what they may see."""

from __future__ import annotations

import time

import msgspec

from yardmaster.server.backends.base import Store
from yardmaster.server.backends.records import ApiKeyRecord, Role
from yardmaster.server.security import tokens


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    role: Role
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, owner: str) -> bool:
        return self.is_admin or owner == self.id


async def principal_for_api_key(store: Store, token: str) -> Principal | None:
    """The principal an API key stands for, or None (malformed, unknown, revoked or expired)."""
    if not tokens.well_formed(token, "api-key"):
        return None
    digest = tokens.token_hash(token)
    rec = await store.get_api_key_by_hash(digest)
    if rec is None or not tokens.digests_equal(rec.token_hash, digest):
        return None
    now = time.time()
    if not key_usable(rec, now):
        return None
    if rec.last_used_at is None or now - rec.last_used_at > 60:
        await store.touch_api_key(rec.id, now)
    return Principal(id=rec.owner, role=rec.role, key_id=rec.id)


def key_usable(rec: ApiKeyRecord, now: float) -> bool:
    return rec.revoked_at is None and (rec.expires_at is None or rec.expires_at > now)


async def still_valid(store: Store, principal: Principal) -> bool:
    """Whether the key a principal was made from (e.g. when a ticket was issued) still works."""
    if principal.key_id is None:
        return True
    now = time.time()
    return any(k.id == principal.key_id and key_usable(k, now) for k in await store.list_api_keys(owner=principal.id))


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
