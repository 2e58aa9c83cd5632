"""Who is calling: principals and what they may see."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import msgspec

from yardmaster.server.backends.base import Store
from yardmaster.server.backends.records import ApiKeyRecord, Role, UserRecord
from yardmaster.server.security import scopes as scope_rules
from yardmaster.server.security import tokens

Credential = Literal["api-key", "access-token"]


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who is calling: a user (`id`), with their role now and the scopes of the credential used.
    `key_id` names the API key, `token_id` the access token's `jti` (with its expiry), so that
    revoking either reaches the sockets and tickets made with it."""

    id: str
    role: Role
    scopes: frozenset[str] = frozenset()
    credential: Credential = "api-key"
    key_id: str | None = None
    token_id: str | None = None
    token_issued_at: float | None = None
    token_expires_at: float | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may(self, scope: str) -> bool:
        return scope in self.scopes

    def may_see(self, owner: str) -> bool:
        """Whether a resource of `owner` is visible: one's own, or anyone's for an admin."""
        return self.is_admin or owner == self.id


TOUCH_EVERY_S = 60.0  # a key's last_used_at is written at most this often


class _Cached(msgspec.Struct, frozen=True):
    principal: Principal
    key_expires_at: float | None  # wall clock
    fresh_until: float  # monotonic clock


class PrincipalCache:
    """The API-key principals this replica looked up lately, by token hash, so that a request
    does not read the Store. An entry is trusted for `ttl_s` and never past its key's expiry;
    the oldest entry makes room for a new one. `forget` drops a revoked key's entries at once
    (every replica calls it when the revocation reaches it over the Broker); `ttl_s` bounds how
    long a revocation missed meanwhile (a Broker outage) is not seen. Unknown keys are not
    cached: a new key works at once."""

    def __init__(self, ttl_s: float = 5.0, max_entries: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, _Cached] = {}  # in insertion order: oldest first
        self._generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def generation(self) -> int:
        """Changes with every `forget`: a lookup that started before one must not be cached."""
        return self._generation

    def get(self, digest: str, now: float) -> Principal | None:
        """The cached principal of a token hash, if still fresh and its key unexpired at `now`."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry.fresh_until <= self._clock() or (entry.key_expires_at is not None and entry.key_expires_at <= now):
            del self._entries[digest]
            return None
        return entry.principal

    def put(self, digest: str, principal: Principal, key_expires_at: float | None, generation: int) -> None:
        """Cache a lookup that began at `generation` (ignored if a revocation came since)."""
        if self.ttl_s <= 0 or generation != self._generation:
            return
        self._entries.pop(digest, None)
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[digest] = _Cached(principal, key_expires_at, self._clock() + self.ttl_s)

    def forget(self, principal_id: str, key_id: str | None = None) -> int:
        """Drop the entries of one key, or (no key id) of every key of a principal; how many."""
        self._generation += 1
        gone = [
            digest
            for digest, entry in self._entries.items()
            if entry.principal.id == principal_id and (key_id is None or entry.principal.key_id == key_id)
        ]
        for digest in gone:
            del self._entries[digest]
        return len(gone)


async def principal_for_api_key(store: Store, token: str, cache: PrincipalCache | None = None) -> Principal | None:
    """The principal an API key stands for, or None (malformed, unknown, revoked or expired)."""
    if not tokens.well_formed(token, "api-key"):
        return None
    digest = tokens.token_hash(token)
    now = time.time()
    if cache is not None and (cached := cache.get(digest, now)) is not None:
        return cached
    generation = cache.generation if cache is not None else 0
    rec = await store.get_api_key_by_hash(digest)
    if rec is None or not tokens.digests_equal(rec.token_hash, digest):
        return None
    if not key_usable(rec, now):
        return None
    user = await store.get_user(rec.owner)
    if user is None or user.disabled_at is not None:
        return None  # a disabled or deleted user's keys stop working with them
    # Only on a Store read: with the cache, last_used_at is at most TOUCH_EVERY_S + ttl_s old.
    if rec.last_used_at is None or now - rec.last_used_at > TOUCH_EVERY_S:
        await store.touch_api_key(rec.id, now)
    principal = principal_for_key(rec, user)
    if cache is not None:
        cache.put(digest, principal, rec.expires_at, generation)
    return principal


def principal_for_key(rec: ApiKeyRecord, user: UserRecord) -> Principal:
    """A key acts as its user with the user's role now, never beyond the key's own scopes."""
    return Principal(
        id=user.id, role=user.role, scopes=scope_rules.effective(user.role, rec.scopes), credential="api-key", key_id=rec.id
    )


def session_current(user: UserRecord, token_issued_at: float | None) -> bool:
    """Whether an access token issued at `token_issued_at` outlived a sign-out of every session
    of its user (a password change); True for credentials that are not access tokens."""
    cutoff = user.sessions_valid_after
    return token_issued_at is None or cutoff is None or token_issued_at >= cutoff


def key_usable(rec: ApiKeyRecord, now: float) -> bool:
    return rec.revoked_at is None and (rec.expires_at is None or rec.expires_at > now)


async def still_valid(store: Store, principal: Principal) -> bool:
    """Whether the credential a principal was made from (e.g. when a ticket was issued) still
    works as far as the Store knows: its user is enabled, its key unrevoked and unexpired, its
    access token unexpired. (A logged-out access token's denylist lives in the Broker.)"""
    user = await store.get_user(principal.id)
    if user is None or user.disabled_at is not None:
        return False
    now = time.time()
    if principal.token_expires_at is not None and principal.token_expires_at <= now:
        return False
    if not session_current(user, principal.token_issued_at):
        return False
    if principal.key_id is None:
        return True
    return any(k.id == principal.key_id and key_usable(k, now) for k in await store.list_api_keys(owner=principal.id))


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
