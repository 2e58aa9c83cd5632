"""RedisBroker only: behaviour across a Redis outage and restart, the shared pub/sub connection,
Sentinel URLs and password redaction."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from yardmaster.server.backends import make_broker
from yardmaster.server.backends.base import BackendUnavailable, QueueEntry, RateCheck, Subscription
from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.backends.redis_broker import RedisBroker, redact_url
from tests.support.redis_plugin import RedisBrokerFactory
from tests.support.redis_server import RedisSentinel, RedisServer

pytestmark = pytest.mark.redis

BOUND_S = 10.0  # "does not hang": generous bound, not a speed assertion


async def next_message(sub: Subscription, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(anext(aiter(sub)), timeout)


async def until_delivered(broker: RedisBroker, sub: Subscription, channel: str, deadline_s: float = 20.0) -> bytes:
    """Publish until `sub` gets a message: the reader reconnects on its own schedule."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            await broker.publish(channel, b"ping-after-restart")
            return await next_message(sub, timeout=0.3)
        except (BackendUnavailable, asyncio.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def test_outage_and_restart(own_redis_server: RedisServer, redis_broker: RedisBrokerFactory) -> None:
    broker = redis_broker(own_redis_server.url)
    other = redis_broker(own_redis_server.url)  # same prefix: another replica
    await broker.start()
    await broker.enqueue_many([QueueEntry("job-a", "alice", 0), QueueEntry("job-b", "alice", 5)])
    assert await broker.admit_many([[QueueEntry("job-c", "bob")]], quota=1) == [True]
    assert (await broker.rate_limit([RateCheck(("api:user:alice",), 3, 600_000)]))[0].remaining == 2
    assert await broker.acquire_slot("client-sockets:alice", "s1", 1, 60_000)
    epoch_before = await broker.acquire_lock("leader", "replica-1", 60_000)
    assert epoch_before is not None
    sub = await broker.subscribe("events")
    await other.publish("events", b"before")
    assert await next_message(sub) == b"before"

    own_redis_server.stop()

    with pytest.raises(BackendUnavailable, match="^redis"):
        await asyncio.wait_for(broker.ping(), BOUND_S)
    outage_ops = (
        broker.peek(10),
        broker.enqueue_many([QueueEntry("job-d", "alice")]),
        broker.admit_many([[QueueEntry("job-d", "alice")]], quota=10),
        broker.remove("job-a"),
        broker.queue_depth(),
        broker.queued_count("alice"),
        broker.rate_limit([RateCheck(("api:user:alice",), 3, 600_000)]),
        broker.acquire_slot("client-sockets:alice", "s2", 2, 60_000),
        broker.count_slots("client-sockets:alice"),
    )
    for op in outage_ops:
        with pytest.raises(BackendUnavailable, match="^redis"):
            await asyncio.wait_for(op, BOUND_S)
    with pytest.raises(BackendUnavailable, match="^redis"):
        await asyncio.wait_for(other.publish("events", b"lost"), BOUND_S)
    with pytest.raises(BackendUnavailable, match="^redis"):
        await asyncio.wait_for(broker.subscribe("new-channel"), BOUND_S)
    # The existing subscription stays open through the outage (no message, no end).
    with pytest.raises(asyncio.TimeoutError):
        await next_message(sub, timeout=0.5)

    own_redis_server.start()  # same port and data dir: AOF brings the data back

    await asyncio.wait_for(broker.ping(), BOUND_S)
    assert await broker.peek(10) == ["job-b", "job-a", "job-c"]
    # Quotas, rate buckets and slots survived too (AOF), with the same counts as before.
    assert await broker.queued_count("alice") == 2
    assert await broker.admit_many([[QueueEntry("job-e", "bob")]], quota=1) == [False]
    assert (await other.rate_limit([RateCheck(("api:user:alice",), 3, 600_000)]))[0].remaining == 1
    assert not await other.acquire_slot("client-sockets:alice", "s2", 1, 60_000)
    assert await until_delivered(other, sub, "events") == b"ping-after-restart"
    await other.publish("events", b"after")
    # Drain extra pings from the retry loop, then the message published after them.
    while (msg := await next_message(sub)) == b"ping-after-restart":
        pass
    assert msg == b"after"
    # The lock and its epoch survived; the epoch keeps increasing.
    assert await broker.lock_holder("leader") == ("replica-1", epoch_before)
    assert await broker.release_lock("leader", "replica-1")
    epoch_after = await other.acquire_lock("leader", "replica-2", 60_000)
    assert epoch_after is not None and epoch_after > epoch_before
    assert await broker.acquire_lock("leader", "replica-1", 60_000) is None
    new_sub = await broker.subscribe("new-channel")
    await other.publish("new-channel", b"hello")
    assert await next_message(new_sub) == b"hello"
    await sub.close()
    await new_sub.close()


async def test_hung_redis_raises_instead_of_hanging(own_redis_server: RedisServer, redis_broker: RedisBrokerFactory) -> None:
    broker = redis_broker(own_redis_server.url)
    await broker.enqueue_many([QueueEntry("job-a", "alice")])
    sub = await broker.subscribe("events")
    own_redis_server.pause()
    try:
        hung_ops = (
            broker.ping(),
            broker.peek(1),
            broker.queue_depth(),
            broker.admit_many([[QueueEntry("job-b", "alice")]], quota=10),
            broker.rate_limit([RateCheck(("b",), 1, 1_000)]),
        )
        for op in hung_ops:
            with pytest.raises(BackendUnavailable, match="^redis"):
                await asyncio.wait_for(op, BOUND_S)
    finally:
        own_redis_server.resume()
    assert await broker.peek(1) == ["job-a"]
    assert await until_delivered(broker, sub, "events") == b"ping-after-restart"
    await sub.close()


async def test_start_and_ping_fail_fast_when_redis_is_absent(own_redis_server: RedisServer) -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{own_redis_server.port}/0"
    own_redis_server.stop()
    broker = RedisBroker(url, key_prefix="absent:")
    try:
        with pytest.raises(BackendUnavailable) as info:
            await asyncio.wait_for(broker.start(), BOUND_S)
        assert str(info.value).startswith("redis: ")
        assert "hunter2-secret" not in str(info.value)
        assert "hunter2-secret" not in repr(broker)
        assert "hunter2-secret" not in broker.url
    finally:
        await broker.close()


def test_redact_url() -> None:
    assert redact_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("redis+sentinel://:pw@h1:26379,h2:26380/0?master=m") == (
        "redis+sentinel://:***@h1:26379,h2:26380/0?master=m"
    )
    assert redact_url("unix:///run/redis.sock") == "unix:///run/redis.sock"


async def test_one_pubsub_connection_and_one_redis_subscription_per_channel(
    redis_broker: RedisBrokerFactory, raw_redis: aioredis.Redis
) -> None:
    name = f"rb-{uuid.uuid4().hex[:8]}"
    broker = redis_broker()
    prefix = broker._prefix
    await raw_redis.execute_command("CLIENT", "SETNAME", "raw")
    before = await _pubsub_clients(raw_redis)
    subs = [await broker.subscribe(f"{name}-{i % 20}") for i in range(60)]  # 3 local subs per channel
    assert await _pubsub_clients(raw_redis) == before + 1
    key = f"{prefix}ch:{name}-0"
    assert dict(await raw_redis.pubsub_numsub(key))[key.encode()] == 1
    await raw_redis.publish(key, b"fan-out")
    for sub in subs[0::20]:
        assert await next_message(sub) == b"fan-out"
    await subs[0].close()
    await subs[20].close()
    assert dict(await raw_redis.pubsub_numsub(key))[key.encode()] == 1
    await subs[40].close()
    await _eventually(lambda: _numsub(raw_redis, key), 0)
    for sub in subs:
        await sub.close()
    await _eventually(lambda: _pubsub_channels(raw_redis, f"{prefix}ch:{name}-*"), 0)


async def _numsub(client: aioredis.Redis, key: str) -> int:
    return int(dict(await client.pubsub_numsub(key))[key.encode()])


async def _pubsub_channels(client: aioredis.Redis, pattern: str) -> int:
    return len(await client.pubsub_channels(pattern))


async def _pubsub_clients(client: aioredis.Redis) -> int:
    clients = await client.client_list()
    return sum(1 for c in clients if int(c.get("sub", 0)) > 0 or "subscribe" in str(c.get("cmd", "")))


async def _eventually(probe: object, expected: int, deadline_s: float = 5.0) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        value = await probe()  # type: ignore[operator]
        if value == expected or time.monotonic() > deadline:
            assert value == expected
            return
        await asyncio.sleep(0.05)


async def test_sentinel_url(redis_server: RedisServer) -> None:
    with RedisSentinel(redis_server.port, master="ymmaster") as sentinel:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/0?master=ymmaster"
        broker = RedisBroker(url, key_prefix=f"sentinel-{uuid.uuid4().hex[:8]}:")
        try:
            await asyncio.wait_for(broker.start(), BOUND_S)
            await broker.enqueue_many([QueueEntry("j1", "alice")])
            assert await broker.peek(5) == ["j1"]
            sub = await broker.subscribe("c")
            await broker.publish("c", b"via-sentinel")
            assert await next_message(sub) == b"via-sentinel"
            await sub.close()
        finally:
            await broker.close()
        same = RedisBroker(f"redis://127.0.0.1:{sentinel.port}/0", sentinel_master="ymmaster", key_prefix="s2:")
        try:
            await asyncio.wait_for(same.ping(), BOUND_S)
        finally:
            await same.close()


async def test_unix_socket_url(redis_server: RedisServer, redis_broker: RedisBrokerFactory) -> None:
    tcp = redis_broker()
    unix = redis_broker(redis_server.unix_url)  # same prefix, same data
    await tcp.enqueue_many([QueueEntry("j1", "alice")])
    assert await unix.peek(5) == ["j1"]
    sub = await unix.subscribe("c")
    await tcp.publish("c", b"over-unix")
    assert await next_message(sub) == b"over-unix"
    await sub.close()


async def test_make_broker_selects_by_url(redis_url: str) -> None:
    assert isinstance(make_broker(None), MemoryBroker)
    broker = make_broker(redis_url)
    try:
        assert isinstance(broker, RedisBroker)
        await broker.ping()
    finally:
        await broker.close()
