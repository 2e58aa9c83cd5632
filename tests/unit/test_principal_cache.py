"""The API-key principal cache: freshness, key expiry, the bound, and invalidation on revocation
(directly, and as a revocation reaches another replica's ClientSockets over the Broker)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.backends.records import ApiKeyRecord, UserRecord
from yardmaster.server.backends.sqlite_store import SqliteStore
from yardmaster.server.core.client_sockets import ClientSockets, Revocation
from yardmaster.server.security import tokens
from yardmaster.server.security.principals import Principal, PrincipalCache, principal_for_api_key
from yardmaster.server.security.scopes import ROLE_SCOPES

NOW = 1_750_000_000.0
ALICE_1 = Principal(id="alice", role="user", scopes=ROLE_SCOPES["user"], key_id="key_1")
ALICE_2 = Principal(id="alice", role="user", key_id="key_2")
BOB = Principal(id="bob", role="user", key_id="key_3")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def filled(cache: PrincipalCache, *principals: Principal) -> PrincipalCache:
    for p in principals:
        cache.put(f"hash-{p.key_id}", p, None, cache.generation)
    return cache


def test_an_entry_is_trusted_for_ttl_s_only() -> None:
    clock = Clock()
    cache = filled(PrincipalCache(ttl_s=5, clock=clock), ALICE_1)
    clock.now += 4.9
    assert cache.get("hash-key_1", NOW) == ALICE_1
    clock.now += 0.2
    assert cache.get("hash-key_1", NOW) is None
    assert len(cache) == 0


def test_an_entry_never_outlives_its_keys_expiry() -> None:
    cache = PrincipalCache(ttl_s=60, clock=Clock())
    cache.put("hash-key_1", ALICE_1, NOW + 1, cache.generation)
    assert cache.get("hash-key_1", NOW) == ALICE_1
    assert cache.get("hash-key_1", NOW + 1) is None


def test_the_oldest_entry_makes_room() -> None:
    cache = filled(PrincipalCache(ttl_s=60, max_entries=2, clock=Clock()), ALICE_1, ALICE_2, BOB)
    assert len(cache) == 2
    assert cache.get("hash-key_1", NOW) is None
    assert cache.get("hash-key_2", NOW) == ALICE_2 and cache.get("hash-key_3", NOW) == BOB


def test_forget_drops_one_key_or_every_key_of_a_principal() -> None:
    cache = filled(PrincipalCache(ttl_s=60, clock=Clock()), ALICE_1, ALICE_2, BOB)
    assert cache.forget("alice", "key_1") == 1
    assert cache.get("hash-key_1", NOW) is None and cache.get("hash-key_2", NOW) == ALICE_2
    assert cache.forget("alice") == 1
    assert cache.get("hash-key_2", NOW) is None and cache.get("hash-key_3", NOW) == BOB


def test_a_lookup_that_began_before_a_revocation_is_not_cached() -> None:
    cache = PrincipalCache(ttl_s=60, clock=Clock())
    began = cache.generation
    cache.forget("alice", "key_1")  # revoked while the lookup read the Store
    cache.put("hash-key_1", ALICE_1, None, began)
    assert cache.get("hash-key_1", NOW) is None


def test_ttl_zero_caches_nothing() -> None:
    cache = filled(PrincipalCache(ttl_s=0, clock=Clock()), ALICE_1)
    assert len(cache) == 0


class CountingStore(SqliteStore):
    """A real SqliteStore that counts key lookups."""

    lookups = 0

    async def get_api_key_by_hash(self, token_hash: str) -> ApiKeyRecord | None:
        self.lookups += 1
        return await super().get_api_key_by_hash(token_hash)


async def test_a_cached_key_skips_the_store_until_its_revocation_is_heard(tmp_path: Path) -> None:
    store = CountingStore(str(tmp_path / "keys.db"))
    await store.start()
    token = tokens.new_token("api-key")
    await store.create_user(UserRecord(id="alice", username="alice", created_at=time.time()))
    await store.put_api_key(
        ApiKeyRecord(id="key_1", token_hash=tokens.token_hash(token), hint=tokens.hint(token), name="a",
                     owner="alice", role="user", created_at=time.time())
    )
    broker = MemoryBroker()
    here_cache, there_cache = PrincipalCache(ttl_s=300), PrincipalCache(ttl_s=300)

    async def valid(_: Principal) -> bool:
        return True

    def forgetting(cache: PrincipalCache) -> ClientSockets:
        return ClientSockets(broker, valid, on_revocation=lambda r: cache.forget(r.principal_id, r.key_id))

    here, there = forgetting(here_cache), forgetting(there_cache)  # two replicas over one Broker
    await here.start()
    await there.start()
    try:
        for cache in (here_cache, there_cache, here_cache, there_cache):
            assert await principal_for_api_key(store, token, cache) == ALICE_1
        assert store.lookups == 2  # once per replica
        await store.revoke_api_key("key_1", time.time())
        assert await principal_for_api_key(store, token, there_cache) == ALICE_1  # the cache's point
        await here.revoke(Revocation(principal_id="alice", key_id="key_1"))
        # Refused on the revoking replica as soon as revoke() returns, on the other once it hears.
        assert await principal_for_api_key(store, token, here_cache) is None
        async with asyncio.timeout(5):
            while await principal_for_api_key(store, token, there_cache) is not None:
                await asyncio.sleep(0.01)
        assert len(here_cache) == len(there_cache) == 0
    finally:
        await here.close()
        await there.close()
        await store.close()
