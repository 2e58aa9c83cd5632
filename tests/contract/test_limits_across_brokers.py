"""RedisBroker against MemoryBroker on the issue-9 operations: the same random sequence of queue
operations gives the same queue on both (the Lua tag arithmetic is MemoryBroker's), and the
Redis keys behind the queue, rate buckets and slots clean up after themselves."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from yardmaster.server.backends.base import BAND_SIZE, Broker, QueueEntry, RateCheck, priority_band
from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.backends.redis_broker import RedisBroker
from tests.support.redis_plugin import RedisBrokerFactory
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.redis

OWNERS = ("ann", "bob", "cyd", "dee")
PRIORITIES = (1000, 10, 0, 0, 0, -1000)


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def state(broker: Broker) -> tuple[list[str], dict[str, int]]:
    return await broker.peek(10_000), {o: await broker.queued_count(o) for o in OWNERS}


@pytest.mark.parametrize("seed", range(10))
async def test_random_queue_operations_give_the_same_queue(seed: int, redis_broker: RedisBrokerFactory) -> None:
    rng = random.Random(seed)
    memory, redis = MemoryBroker(), redis_broker()
    made = 0
    queued: list[str] = []
    fair = seed % 3 != 0  # some runs as YM_FAIR_SHARE=false: one group for everyone

    def new_entries(n: int) -> list[QueueEntry]:
        nonlocal made
        out = []
        for _ in range(n):
            owner = rng.choice(OWNERS)
            out.append(QueueEntry(f"job-{made:05d}", owner, rng.choice(PRIORITIES), "" if fair else "all"))
            made += 1
        return out

    for _ in range(150):
        op = rng.random()
        if op < 0.35:
            batches = [new_entries(rng.randint(1, 6)) for _ in range(rng.randint(1, 3))]
            quota = rng.choice((0, 5, 12))
            got = await memory.admit_many(batches, quota)
            assert await redis.admit_many(batches, quota) == got
        elif op < 0.55:
            entries = new_entries(rng.randint(0, 8))
            again = [QueueEntry(j, "ann") for j in rng.sample(queued, min(2, len(queued)))]  # already queued
            front = rng.random() < 0.3
            await memory.enqueue_many(entries + again, front=front)
            await redis.enqueue_many(entries + again, front=front)
        elif op < 0.8 and queued:
            taken = (await memory.peek(rng.randint(1, 6)))[: rng.randint(1, 6)]
            await memory.remove_many(taken)
            await redis.remove_many(taken)
            if rng.random() < 0.5 and taken:  # some come back (a lapsed lease)
                back = [QueueEntry(j, rng.choice(OWNERS), rng.choice(PRIORITIES)) for j in taken[:2]]
                await memory.enqueue_many(back, front=True)
                await redis.enqueue_many(back, front=True)
        elif queued:
            victim = rng.choice(queued)
            assert await redis.remove(victim) == await memory.remove(victim)
        queued = await memory.peek(10_000)
        assert await state(redis) == await state(memory)
    assert await redis.queue_depth() == await memory.queue_depth()


async def test_scores_are_exact_in_the_lowest_band(redis_broker: RedisBrokerFactory, raw_redis: aioredis.Redis) -> None:
    broker = redis_broker()
    await broker.enqueue_many([QueueEntry(f"j{i}", "ann", -1000) for i in range(3)])
    scores = await raw_redis.zrange(f"{broker._prefix}queue", 0, -1, withscores=True)
    low = priority_band(-1000) * BAND_SIZE
    assert [(m.decode(), int(s) - low) for m, s in scores] == [("j0", 1), ("j1", 2), ("j2", 3)]
    assert all(s == int(s) for _, s in scores)


async def test_an_emptied_queue_leaves_only_its_band_history(redis_broker: RedisBrokerFactory, raw_redis: aioredis.Redis) -> None:
    broker = redis_broker()
    prefix = broker._prefix
    entries = [QueueEntry(f"j{i}", OWNERS[i % 2], 0) for i in range(6)]
    assert await broker.admit_many([entries], quota=3) == [True]
    assert await raw_redis.exists(f"{prefix}queue-last:ann", f"{prefix}queue-last:bob") == 2
    await broker.remove_many([e.job_id for e in entries])
    keys = sorted(k.decode() for k in await raw_redis.keys(f"{prefix}*"))
    assert keys == [f"{prefix}queue-band-max"]  # counts, owners and each group's last tags gone


async def test_rate_buckets_and_slots_expire_in_redis(redis_broker: RedisBrokerFactory, raw_redis: aioredis.Redis) -> None:
    broker: RedisBroker = redis_broker()
    prefix = broker._prefix
    await broker.rate_limit([RateCheck(("api:user:ann",), 10, 60_000), RateCheck(("api:user:ann",), 10, 60_000, cost=4)])
    assert 29_000 <= await raw_redis.pttl(f"{prefix}rate:api:user:ann") <= 30_000  # until the bucket is full
    assert await broker.acquire_slot("client-sockets:ann", "s1", 2, 5_000)
    assert await broker.acquire_slot("client-sockets:ann", "s2", 2, 20_000)
    assert await broker.acquire_slot("client-sockets:ann", "s1", 2, 1_000)
    assert 19_000 <= await raw_redis.pttl(f"{prefix}slots:client-sockets:ann") <= 20_000  # the longest member
    await broker.release_slot("client-sockets:ann", "s1")
    await broker.release_slot("client-sockets:ann", "s2")
    assert not await raw_redis.exists(f"{prefix}slots:client-sockets:ann")
