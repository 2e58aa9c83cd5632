"""The client-socket quota of core/client_sockets.ClientSockets: Broker slots shared by every
replica's registry, freed at close, renewed while open, and this replica's own count while the
Broker (a real redis-server, stopped) cannot be reached."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.redis_server import RedisServer
from yardmaster.server.backends.keys import client_sockets_slots
from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.backends.redis_broker import RedisBroker
from yardmaster.server.core.client_sockets import ClientSockets
from yardmaster.server.security.principals import Principal

ALICE = Principal(id="alice", role="user", key_id="key_1")


class Link:
    def __init__(self, principal: Principal = ALICE) -> None:
        self.principal = principal

    def close(self, code: int, reason: str) -> None:
        pass


async def always_valid(principal: Principal) -> bool:
    return True


async def test_two_replicas_share_the_quota_and_a_close_frees_a_slot() -> None:
    broker = MemoryBroker()
    here, there = ClientSockets(broker, always_valid), ClientSockets(broker, always_valid)
    first, second = Link(), Link()
    assert await here.open(first, 2)
    assert await there.open(second, 2)
    assert not await there.open(Link(), 2)  # one here, one there: the user is at 2
    assert there.count("alice") == 1  # the refused socket was not registered
    await here.release(first)
    assert await broker.count_slots(client_sockets_slots("alice")) == 1
    assert await there.open(Link(), 2)
    assert await here.open(Link(), 0)  # 0: no quota


async def test_slots_expire_unless_renewed() -> None:
    broker = MemoryBroker()
    sockets = ClientSockets(broker, always_valid, slot_ttl_s=0.5)
    assert await sockets.open(Link(), 5)
    for _ in range(6):
        await asyncio.sleep(0.15)
        await sockets.renew_slots()
    assert await broker.count_slots(client_sockets_slots("alice")) == 1  # renewed past its first expiry
    gone = ClientSockets(broker, always_valid, slot_ttl_s=0.5)
    assert await gone.open(Link(Principal(id="bob", role="user")), 5)
    for _ in range(100):  # a replica that died renews nothing
        if await broker.count_slots(client_sockets_slots("bob")) == 0:
            break
        await asyncio.sleep(0.05)
    assert await broker.count_slots(client_sockets_slots("bob")) == 0


@pytest.mark.redis
async def test_while_the_broker_is_down_this_replicas_count_is_the_quota(own_redis_server: RedisServer) -> None:
    broker = RedisBroker(own_redis_server.url, key_prefix="quota:")
    await broker.start()
    try:
        sockets = ClientSockets(broker, always_valid)
        held = Link()
        assert await sockets.open(held, 2)
        own_redis_server.stop()
        assert await sockets.open(Link(), 2)  # counted here: one open, room for one more
        assert not await sockets.open(Link(), 2)
        await sockets.release(held)  # its slot cannot be freed now: it expires on its own
        assert sockets.count("alice") == 1
    finally:
        await broker.close()
