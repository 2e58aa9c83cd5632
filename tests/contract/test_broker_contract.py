"""The Broker contract: every implementation must pass these same tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from yardmaster.server.backends.base import Broker, Subscription
from yardmaster.server.backends.memory_broker import MemoryBroker, SubscriptionDropped
from tests.support.redis_plugin import RedisBrokerFactory

BrokerFactory = Callable[..., Awaitable[Broker]]
T0 = 1_750_000_000.0  # an enqueued_at well after the queue epoch


@pytest.fixture(params=["memory", "redis"])
def redis_factory(request: pytest.FixtureRequest) -> RedisBrokerFactory | None:
    """None for the memory implementation; else the redis_broker factory (resolved here, in a
    sync fixture, because an async fixture cannot request another one dynamically)."""
    if request.param == "redis":
        factory: RedisBrokerFactory = request.getfixturevalue("redis_broker")
        return factory
    return None


@pytest.fixture
async def make_broker(redis_factory: RedisBrokerFactory | None) -> AsyncIterator[BrokerFactory]:
    made: list[Broker] = []

    async def make(**kwargs: Any) -> Broker:
        broker: Broker
        if redis_factory is None:
            broker = MemoryBroker(**kwargs)
            made.append(broker)
        else:
            broker = redis_factory(**kwargs)  # closed by the redis_broker fixture
        await broker.start()
        return broker

    yield make
    for broker in made:
        await broker.close()


@pytest.fixture
async def broker(make_broker: BrokerFactory) -> Broker:
    return await make_broker()


async def next_message(sub: Subscription, timeout: float = 5.0) -> bytes:
    return await asyncio.wait_for(anext(aiter(sub)), timeout)


async def no_message(sub: Subscription, wait: float = 0.2) -> None:
    with pytest.raises((asyncio.TimeoutError, StopAsyncIteration)):
        await asyncio.wait_for(anext(aiter(sub)), wait)


# -- queue ------------------------------------------------------------------------------------------
async def test_queue_orders_by_priority_then_fifo(broker: Broker) -> None:
    await broker.enqueue("low-1", -5, T0 + 1)
    await broker.enqueue("mid-2", 0, T0 + 2)
    await broker.enqueue("high-3", 10, T0 + 3)
    await broker.enqueue("mid-1", 0, T0 + 1)
    await broker.enqueue("high-4", 10, T0 + 4)
    await broker.enqueue("low-0", -5, T0)
    assert await broker.peek(10) == ["high-3", "high-4", "mid-1", "mid-2", "low-0", "low-1"]
    assert await broker.peek(2) == ["high-3", "high-4"]
    assert await broker.peek(0) == []


async def test_requeued_job_keeps_its_position(broker: Broker) -> None:
    for i in range(4):
        await broker.enqueue(f"job-{i}", 0, T0 + i)
    assert await broker.remove("job-1")
    await broker.enqueue("job-9", 0, T0 + 9)
    await broker.enqueue("job-1", 0, T0 + 1)  # requeued with its original enqueued_at
    assert await broker.peek(10) == ["job-0", "job-1", "job-2", "job-3", "job-9"]


async def test_enqueue_is_idempotent(broker: Broker) -> None:
    await broker.enqueue("a", 0, T0)
    await broker.enqueue("b", 0, T0 + 1)
    await broker.enqueue("a", 100, T0 + 50)  # already queued: keeps its position
    assert await broker.peek(10) == ["a", "b"]
    assert await broker.queue_depth() == 2


async def test_enqueue_many_is_enqueue_for_each_item(broker: Broker) -> None:
    await broker.enqueue("queued-before", 0, T0 + 5)
    await broker.enqueue_many([])  # nothing to add: not an error
    await broker.enqueue_many(
        [("mid-2", 0, T0 + 2), ("high-9", 10, T0 + 9), ("queued-before", 100, T0), ("mid-1", 0, T0 + 1)]
    )
    # Priority then FIFO, as one by one; the job already queued keeps its position.
    assert await broker.peek(10) == ["high-9", "mid-1", "mid-2", "queued-before"]
    assert await broker.queue_depth() == 4
    many = [(f"bulk-{i:04d}", 0, T0 + 100 + i) for i in range(1000)]
    await broker.enqueue_many(many)
    assert await broker.queue_depth() == 1004
    assert (await broker.peek(1004))[4:] == [job_id for job_id, _, _ in many]


async def test_peek_does_not_remove_and_depth_and_is_queued(broker: Broker) -> None:
    assert await broker.queue_depth() == 0
    assert not await broker.is_queued("x")
    await broker.enqueue("x", 1, T0)
    await broker.enqueue("y", 1, T0 + 1)
    assert await broker.peek(1) == ["x"]
    assert await broker.peek(1) == ["x"]
    assert await broker.queue_depth() == 2
    assert await broker.is_queued("x")
    assert await broker.remove("x")
    assert not await broker.is_queued("x")
    assert not await broker.remove("x")
    assert await broker.queue_depth() == 1


async def test_remove_wins_exactly_once_under_concurrency(broker: Broker) -> None:
    await broker.enqueue("contended", 0, T0)
    results = await asyncio.gather(*(broker.remove("contended") for _ in range(20)))
    assert results.count(True) == 1
    assert await broker.queue_depth() == 0


async def test_remove_many_removes_each_listed_job(broker: Broker) -> None:
    for i in range(5):
        await broker.enqueue(f"job-{i}", 0, T0 + i)
    await broker.remove_many([])  # nothing to remove: not an error
    await broker.remove_many(["job-1", "job-3", "never-queued"])
    assert await broker.peek(10) == ["job-0", "job-2", "job-4"]
    assert not await broker.remove("job-3")


# -- leader lock ------------------------------------------------------------------------------------
async def test_lock_acquire_renew_release_by_owner_only(broker: Broker) -> None:
    epoch = await broker.acquire_lock("leader", "a", 5_000)
    assert epoch is not None and epoch >= 1
    assert await broker.acquire_lock("leader", "b", 5_000) is None
    assert await broker.lock_holder("leader") == ("a", epoch)
    assert not await broker.renew_lock("leader", "b", 5_000)
    assert await broker.renew_lock("leader", "a", 5_000)
    assert not await broker.release_lock("leader", "b")
    assert await broker.lock_holder("leader") == ("a", epoch)
    assert await broker.release_lock("leader", "a")
    assert not await broker.release_lock("leader", "a")
    assert await broker.lock_holder("leader") == (None, epoch)
    assert not await broker.renew_lock("leader", "a", 5_000)


async def test_lock_expiry_lets_another_acquire_with_a_higher_epoch(broker: Broker) -> None:
    assert await broker.lock_holder("sched") == (None, 0)
    first = await broker.acquire_lock("sched", "a", 200)
    assert first is not None
    await asyncio.sleep(0.35)
    assert await broker.lock_holder("sched") == (None, first)
    assert not await broker.renew_lock("sched", "a", 200)  # expired: no longer the owner
    second = await broker.acquire_lock("sched", "b", 5_000)
    assert second is not None and second > first
    assert not await broker.release_lock("sched", "a")
    assert await broker.release_lock("sched", "b")
    third = await broker.acquire_lock("sched", "a", 5_000)
    assert third is not None and third > second


async def test_raise_epoch_only_moves_the_epoch_up(broker: Broker) -> None:
    assert await broker.acquire_lock("sched", "a", 5_000) == 1
    assert await broker.raise_epoch("sched", 10) == 10
    assert await broker.raise_epoch("sched", 3) == 10
    assert await broker.release_lock("sched", "a")
    assert await broker.acquire_lock("sched", "b", 5_000) == 11


async def test_locks_are_independent_by_name(broker: Broker) -> None:
    assert await broker.acquire_lock("one", "a", 5_000) == 1
    assert await broker.acquire_lock("two", "b", 5_000) == 1
    assert await broker.lock_holder("two") == ("b", 1)


# -- presence -------------------------------------------------------------------------------------------
async def test_presence_set_get_list(broker: Broker) -> None:
    assert await broker.get_presence("agent", "a1") is None
    assert await broker.list_presence("agent") == {}
    await broker.set_presence("agent", "a1", "replica-1", 5_000)
    await broker.set_presence("agent", "a2", "replica-2", 5_000)
    await broker.set_presence("viewer", "v1", "replica-1", 5_000)
    await broker.set_presence("agent", "a1", "replica-3", 5_000)  # overwrite
    assert await broker.get_presence("agent", "a1") == "replica-3"
    assert await broker.list_presence("agent") == {"a1": "replica-3", "a2": "replica-2"}
    assert await broker.list_presence("viewer") == {"v1": "replica-1"}


async def test_presence_expires(broker: Broker) -> None:
    await broker.set_presence("agent", "short", "r1", 200)
    await broker.set_presence("agent", "long", "r1", 5_000)
    await broker.set_presence("agent", "refreshed", "r1", 200)
    await broker.set_presence("agent", "refreshed", "r2", 5_000)
    await asyncio.sleep(0.35)
    assert await broker.get_presence("agent", "short") is None
    assert await broker.list_presence("agent") == {"long": "r1", "refreshed": "r2"}


async def test_presence_delete_with_if_value(broker: Broker) -> None:
    await broker.set_presence("agent", "a1", "replica-1", 5_000)
    assert not await broker.delete_presence("agent", "a1", if_value="replica-2")
    assert await broker.get_presence("agent", "a1") == "replica-1"
    assert await broker.delete_presence("agent", "a1", if_value="replica-1")
    assert await broker.get_presence("agent", "a1") is None
    assert await broker.list_presence("agent") == {}
    assert not await broker.delete_presence("agent", "a1")
    await broker.set_presence("agent", "a2", "x", 5_000)
    assert await broker.delete_presence("agent", "a2")
    assert await broker.list_presence("agent") == {}


# -- pub/sub ---------------------------------------------------------------------------------------------
async def test_counter_counts_and_expires_from_its_first_increment(broker: Broker) -> None:
    assert await broker.get_counter("c") == 0
    assert await broker.incr_counter("c", ttl_ms=300) == 1
    assert await broker.incr_counter("c", ttl_ms=300, by=4) == 5
    assert await broker.get_counter("c") == 5 and await broker.get_counter("other") == 0
    await asyncio.sleep(0.2)
    assert await broker.incr_counter("c", ttl_ms=300) == 6  # adding does not extend its life
    await asyncio.sleep(0.2)
    assert await broker.get_counter("c") == 0
    assert await broker.incr_counter("c", ttl_ms=300) == 1  # a new life after expiry


async def test_counter_delete_and_concurrent_increments(broker: Broker) -> None:
    values = await asyncio.gather(*(broker.incr_counter("n", ttl_ms=10_000) for _ in range(50)))
    assert sorted(values) == list(range(1, 51))  # every increment counted once
    await broker.delete_counter("n")
    assert await broker.get_counter("n") == 0


async def test_publish_reaches_every_subscriber_in_order(broker: Broker) -> None:
    subs = [await broker.subscribe("job:1") for _ in range(3)]
    for i in range(50):
        await broker.publish("job:1", f"m{i}".encode())
    for sub in subs:
        assert [await next_message(sub) for _ in range(50)] == [f"m{i}".encode() for i in range(50)]
        await sub.close()


async def test_publish_many_delivers_each_message_in_order(broker: Broker) -> None:
    a = await broker.subscribe("many-a")
    b = await broker.subscribe("many-b")
    await broker.publish_many([])  # nothing to send: not an error
    await broker.publish_many([("many-a", b"1"), ("many-b", b"2"), ("many-a", b"3"), ("nobody-listens", b"4")])
    await broker.publish("many-a", b"5")
    assert [await next_message(a) for _ in range(3)] == [b"1", b"3", b"5"]
    assert await next_message(b) == b"2"
    await no_message(b)
    await a.close()
    await b.close()


async def test_publish_many_of_thousands_keeps_their_order_and_bytes(broker: Broker) -> None:
    sub = await broker.subscribe("bulk")
    sent = [("bulk", f"m{i}".encode() + bytes([0, 255, i % 256])) for i in range(2500)]
    await broker.publish_many(sent)
    assert [await next_message(sub) for _ in sent] == [data for _, data in sent]
    await sub.close()


async def test_message_published_right_after_subscribe_is_delivered(broker: Broker) -> None:
    for i in range(5):
        channel = f"fresh-{i}-{uuid.uuid4().hex}"
        sub = await broker.subscribe(channel)
        await broker.publish(channel, b"first")
        assert await next_message(sub) == b"first"
        await sub.close()


async def test_no_delivery_after_close(broker: Broker) -> None:
    kept = await broker.subscribe("events")
    closed = await broker.subscribe("events")
    await broker.publish("events", b"before")
    await closed.close()
    await broker.publish("events", b"after")
    assert [await next_message(kept), await next_message(kept)] == [b"before", b"after"]
    with pytest.raises(StopAsyncIteration):
        await next_message(closed)
    await closed.close()  # idempotent
    await kept.close()
    # A channel whose last subscriber left can be subscribed again.
    again = await broker.subscribe("events")
    await broker.publish("events", b"again")
    assert await next_message(again) == b"again"
    await again.close()


async def test_channels_are_isolated(broker: Broker) -> None:
    a = await broker.subscribe("chan-a")
    b = await broker.subscribe("chan-b")
    await broker.publish("chan-a", b"for-a")
    await broker.publish("chan-b", b"for-b")
    assert await next_message(a) == b"for-a"
    assert await next_message(b) == b"for-b"
    await no_message(a)
    await no_message(b)
    await a.close()
    await b.close()


async def test_iteration_ends_when_subscription_closes_while_waiting(broker: Broker) -> None:
    sub = await broker.subscribe("idle")
    waiter = asyncio.create_task(next_message(sub))
    await asyncio.sleep(0.05)
    await sub.close()
    with pytest.raises(StopAsyncIteration):
        await waiter


async def test_closing_the_broker_ends_its_subscriptions(make_broker: BrokerFactory) -> None:
    broker = await make_broker()
    sub = await broker.subscribe("any")
    waiter = asyncio.create_task(next_message(sub))
    await asyncio.sleep(0.05)
    await broker.close()
    with pytest.raises(StopAsyncIteration):
        await waiter


async def test_slow_subscriber_is_dropped_without_blocking_publishers(make_broker: BrokerFactory) -> None:
    broker = await make_broker(subscription_buffer=5)
    slow = await broker.subscribe("firehose")
    fast = await broker.subscribe("firehose")
    for i in range(4):
        await broker.publish("firehose", f"{i}".encode())
    assert [await next_message(fast) for _ in range(4)] == [b"0", b"1", b"2", b"3"]
    for i in range(4, 8):
        await broker.publish("firehose", f"{i}".encode())
    assert [await next_message(fast) for _ in range(4)] == [b"4", b"5", b"6", b"7"]
    with pytest.raises(SubscriptionDropped):
        async for _ in slow:
            pass
    await broker.publish("firehose", b"8")
    assert await next_message(fast) == b"8"
    await fast.close()
