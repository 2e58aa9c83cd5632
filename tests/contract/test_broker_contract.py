"""The Broker contract: every implementation must pass these same tests."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from yardmaster.server.backends.base import Broker, QueueEntry, RateCheck, Subscription
from yardmaster.server.backends.memory_broker import MemoryBroker, SubscriptionDropped
from tests.support.redis_plugin import RedisBrokerFactory

BrokerFactory = Callable[..., Awaitable[Broker]]


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
def entry(job_id: str, owner: str = "alice", priority: int = 0, group: str = "") -> QueueEntry:
    return QueueEntry(job_id, owner, priority, group)


def jobs(owner: str, n: int, priority: int = 0, start: int = 0) -> list[QueueEntry]:
    """`n` entries of `owner`, ids sorting in creation order (as real job ids do)."""
    return [entry(f"{owner}-{i:04d}", owner, priority) for i in range(start, start + n)]


def ids(entries: list[QueueEntry]) -> list[str]:
    return [e.job_id for e in entries]


async def test_priority_bands_come_first_then_fifo_inside_one_owner(broker: Broker) -> None:
    await broker.enqueue_many([entry("low-1", priority=-5), entry("mid-1")])
    await broker.enqueue_many([entry("top", priority=1000), entry("high-1", priority=10), entry("mid-2")])
    await broker.enqueue_many([entry("bottom", priority=-1000), entry("high-2", priority=10), entry("low-2", priority=-5)])
    await broker.enqueue_many([entry("beyond", priority=5000), entry("below", priority=-5000)])  # clamped
    assert await broker.peek(20) == [
        "top", "beyond", "high-1", "high-2", "mid-1", "mid-2", "low-1", "low-2", "bottom", "below"
    ]
    assert await broker.peek(2) == ["top", "beyond"]
    assert await broker.peek(0) == []
    assert await broker.queue_depth() == 10


async def test_one_owner_is_fifo_across_calls_and_batches(broker: Broker) -> None:
    first = jobs("alice", 1000)
    await broker.enqueue_many(first)
    await broker.enqueue_many([])  # nothing to add: not an error
    later = jobs("alice", 5, start=1000)
    for e in later:
        await broker.enqueue_many([e])
    assert await broker.peek(2000) == ids(first + later)
    assert await broker.queued_count("alice") == 1005


async def test_fair_share_alternates_owners_inside_a_band(broker: Broker) -> None:
    a, b = jobs("a", 1000), jobs("b", 10)
    await broker.enqueue_many(a)
    await broker.enqueue_many(b)
    head = await broker.peek(20)
    assert set(ids(b)) <= set(head)  # B's 10 are not behind A's 1,000
    assert head == [job for pair in zip(ids(a), ids(b)) for job in pair]  # A1 B1 A2 B2 …
    assert (await broker.peek(1010))[20:] == ids(a)[10:]
    # A group's own order holds whatever the interleaving.
    await broker.enqueue_many(jobs("b", 1, start=10))
    assert (await broker.peek(22))[20:] == ["a-0010", "b-0010"]


async def test_a_group_sharing_one_tag_round_is_one_share(broker: Broker) -> None:
    """YM_FAIR_SHARE=false: every entry in one group, so the queue is plain FIFO in a band."""
    a = [entry(f"a-{i}", "a", group="all") for i in range(5)]
    b = [entry(f"b-{i}", "b", group="all") for i in range(2)]
    await broker.enqueue_many(a)
    await broker.enqueue_many(b)
    assert await broker.peek(10) == ids(a + b)
    assert await broker.queued_count("a") == 5 and await broker.queued_count("b") == 2


async def test_a_late_group_joins_the_current_round(broker: Broker) -> None:
    a = jobs("a", 1000)
    await broker.enqueue_many(a)
    await broker.remove_many(ids(a[:500]))  # the head half was taken
    await broker.enqueue_many([entry("c-0000", "c")])
    head = await broker.peek(3)
    assert "c-0000" in head[:2]  # among the head, not after A's 500 left (no credit, no debt)
    assert await broker.queue_depth() == 501


async def test_a_group_that_emptied_starts_afresh(broker: Broker) -> None:
    await broker.enqueue_many(jobs("b", 10))
    await broker.enqueue_many(jobs("a", 3))
    await broker.remove_many(ids(jobs("b", 10)))  # all of B's were taken: its round is forgotten
    assert await broker.queued_count("b") == 0
    await broker.enqueue_many([entry("b-0010", "b")])
    assert await broker.peek(10) == ["a-0000", "b-0010", "a-0001", "a-0002"]


async def test_front_goes_to_the_head_of_the_current_round(broker: Broker) -> None:
    a = jobs("a", 10)
    await broker.enqueue_many(a)
    await broker.remove_many(ids(a[:3]))  # taken
    await broker.enqueue_many([a[1]], front=True)  # its lease lapsed: back at the head
    assert await broker.peek(2) == ["a-0001", "a-0003"]
    await broker.enqueue_many([entry("z-0000", "z")], front=True)
    assert "z-0000" in (await broker.peek(3))[:3]  # the head's round, whoever owns it
    await broker.enqueue_many([entry("a-0010", "a")])  # a front entry does not move A's own round
    assert (await broker.peek(20))[-1] == "a-0010"
    assert await broker.queued_count("a") == 9 and await broker.queued_count("z") == 1


async def test_enqueue_of_a_queued_job_keeps_its_place_and_count(broker: Broker) -> None:
    await broker.enqueue_many([entry("a"), entry("b")])
    await broker.enqueue_many([entry("a", priority=100), entry("a")], front=True)
    await broker.enqueue_many([entry("c"), entry("c")])  # twice in one call: once
    assert await broker.peek(10) == ["a", "b", "c"]
    assert await broker.queue_depth() == 3
    assert await broker.queued_count("alice") == 3


async def test_admit_many_holds_the_quota_exactly_and_refuses_a_batch_whole(broker: Broker) -> None:
    e = jobs("alice", 7)
    assert await broker.admit_many([e[0:2], e[2:4], e[4:6]], quota=5) == [True, True, False]
    assert not await broker.is_queued("alice-0004") and not await broker.is_queued("alice-0005")
    assert await broker.queued_count("alice") == 4
    assert await broker.admit_many([[e[4]], [e[5]]], quota=5) == [True, False]
    assert await broker.queued_count("alice") == 5
    # A batch with another owner's entries is refused whole when one of its owners is full.
    mixed = [entry("bob-0000", "bob"), e[6]]
    assert await broker.admit_many([mixed], quota=5) == [False]
    assert not await broker.is_queued("bob-0000")
    assert await broker.admit_many([[entry("bob-0000", "bob")]], quota=5) == [True]
    assert await broker.admit_many([], quota=5) == []
    assert await broker.peek(10) == ["alice-0000", "bob-0000", *ids(e[1:5])]  # bob joins the first round


async def test_admit_many_counts_queued_entries_as_added(broker: Broker) -> None:
    e = jobs("alice", 4)
    assert await broker.admit_many([e[:3]], quota=3) == [True]
    assert await broker.admit_many([e[:2], [e[2], e[2]]], quota=3) == [True, True]  # nothing new
    assert await broker.admit_many([[e[0], e[3]]], quota=3) == [False]
    assert await broker.queued_count("alice") == 3 and not await broker.is_queued("alice-0003")


async def test_admit_many_with_quota_zero_has_no_quota(broker: Broker) -> None:
    e = jobs("alice", 50)
    assert await broker.admit_many([e[:25], e[25:]], quota=0) == [True, True]
    assert await broker.queued_count("alice") == 50


async def test_queued_count_follows_remove_and_enqueue(broker: Broker) -> None:
    e = jobs("alice", 6)
    assert await broker.queued_count("alice") == 0
    assert await broker.admit_many([e[:5]], quota=5) == [True]
    assert await broker.remove("alice-0000")
    assert not await broker.remove("alice-0000")
    await broker.remove_many(["alice-0001", "alice-0002", "never-queued"])
    await broker.remove_many([])  # nothing to remove: not an error
    assert await broker.queued_count("alice") == 2
    assert await broker.admit_many([e[:3]], quota=5) == [True]
    assert await broker.queued_count("alice") == 5
    await broker.enqueue_many(e)  # no quota check (requeues, reconciliation)
    assert await broker.queued_count("alice") == 6
    await broker.remove_many(ids(e))
    assert await broker.queued_count("alice") == 0 and await broker.queue_depth() == 0


async def test_peek_does_not_remove_and_depth_and_is_queued(broker: Broker) -> None:
    assert await broker.queue_depth() == 0
    assert not await broker.is_queued("x")
    await broker.enqueue_many([entry("x", priority=1), entry("y", priority=1)])
    assert await broker.peek(1) == ["x"]
    assert await broker.peek(1) == ["x"]
    assert await broker.queue_depth() == 2
    assert await broker.is_queued("x")
    assert await broker.remove("x")
    assert not await broker.is_queued("x")
    assert not await broker.remove("x")
    assert await broker.queue_depth() == 1


async def test_remove_wins_exactly_once_under_concurrency(broker: Broker) -> None:
    await broker.enqueue_many([entry("contended")])
    results = await asyncio.gather(*(broker.remove("contended") for _ in range(20)))
    assert results.count(True) == 1
    assert await broker.queue_depth() == 0
    assert await broker.queued_count("alice") == 0


# -- rate limits ------------------------------------------------------------------------------------
def check(*buckets: str, limit: int, period_ms: int, cost: int = 1) -> RateCheck:
    return RateCheck(tuple(buckets), limit, period_ms, cost)


async def test_rate_limit_allows_exactly_the_burst_then_refuses_until_the_window(broker: Broker) -> None:
    five = check("api:user:u1", limit=5, period_ms=400)
    decisions = [(await broker.rate_limit([five]))[0] for _ in range(5)]
    assert [d.allowed for d in decisions] == [True] * 5
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0]
    assert all(d.retry_after_ms == 0 and 0 < d.reset_ms <= 400 for d in decisions)
    refused = (await broker.rate_limit([five]))[0]
    assert not refused.allowed and refused.remaining == 0
    assert 1 <= refused.retry_after_ms <= 80  # one request every period/limit
    assert 0 < refused.reset_ms <= 400
    assert (await broker.rate_limit([check("api:user:u2", limit=5, period_ms=400)]))[0].remaining == 4
    await asyncio.sleep(0.45)
    again = (await broker.rate_limit([five]))[0]
    assert again.allowed and again.remaining == 4  # full again after the period


async def test_rate_limit_cost_counts_several_requests(broker: Broker) -> None:
    heavy = check("b", limit=5, period_ms=10_000, cost=3)
    first = (await broker.rate_limit([heavy]))[0]
    assert first.allowed and first.remaining == 2
    refused = (await broker.rate_limit([heavy]))[0]
    assert not refused.allowed and 1_000 < refused.retry_after_ms <= 2_000
    assert (await broker.rate_limit([check("b", limit=5, period_ms=10_000, cost=2)]))[0].allowed


async def test_rate_limit_is_all_or_none_across_a_checks_buckets(broker: Broker) -> None:
    narrow = check("narrow", limit=5, period_ms=10_000)
    both = check("narrow", "wide", limit=5, period_ms=10_000)
    wide = check("wide", limit=5, period_ms=10_000)
    assert all(d.allowed for d in await broker.rate_limit([narrow, narrow, narrow]))
    assert [(await broker.rate_limit([both]))[0].allowed for _ in range(3)] == [True, True, False]
    # The refused check charged neither bucket: "wide" holds exactly two requests.
    assert [d.remaining for d in await broker.rate_limit([wide, wide])] == [2, 1]


async def test_rate_limit_checks_in_one_call_go_in_order(broker: Broker) -> None:
    two = check("ordered", limit=2, period_ms=10_000)
    decisions = await broker.rate_limit([two, two, two, check("other", limit=2, period_ms=10_000)])
    assert [d.allowed for d in decisions] == [True, True, False, True]
    assert [d.remaining for d in decisions] == [1, 0, 0, 1]
    assert decisions[2].retry_after_ms > 0 and decisions[0].retry_after_ms == 0
    assert await broker.rate_limit([]) == []


# -- slots ------------------------------------------------------------------------------------------
async def test_slots_hold_a_limit_and_reacquire_is_idempotent(broker: Broker) -> None:
    assert await broker.count_slots("sockets") == 0
    assert await broker.acquire_slot("sockets", "s1", 2, 10_000)
    assert await broker.acquire_slot("sockets", "s2", 2, 10_000)
    assert not await broker.acquire_slot("sockets", "s3", 2, 10_000)
    assert await broker.acquire_slot("sockets", "s1", 2, 10_000)  # already held: renewed
    assert await broker.count_slots("sockets") == 2
    assert await broker.acquire_slot("other", "s3", 2, 10_000)  # names are independent
    await broker.release_slot("sockets", "s1")
    await broker.release_slot("sockets", "never-held")
    assert await broker.count_slots("sockets") == 1
    assert await broker.acquire_slot("sockets", "s3", 2, 10_000)
    assert not await broker.acquire_slot("sockets", "s4", 2, 10_000)


async def test_an_expired_slot_frees_itself_and_renew_keeps_one(broker: Broker) -> None:
    assert await broker.acquire_slot("s", "dies", 2, 200)
    assert await broker.acquire_slot("s", "lives", 2, 500)
    assert not await broker.acquire_slot("s", "third", 2, 10_000)
    await asyncio.sleep(0.3)
    await broker.renew_slots([("s", "lives"), ("s", "ghost"), ("none", "x")], 1_000)  # only held ones
    await broker.renew_slots([], 1_000)
    await asyncio.sleep(0.35)  # "dies" expired; "lives" would have without the renewal
    assert await broker.count_slots("s") == 1
    assert await broker.count_slots("none") == 0
    assert await broker.acquire_slot("s", "third", 2, 10_000)
    assert not await broker.acquire_slot("s", "ghost", 2, 10_000)


# -- atomicity across replicas -----------------------------------------------------------------------
@pytest.fixture
async def replicas(make_broker: BrokerFactory, redis_factory: RedisBrokerFactory | None) -> list[Broker]:
    """Three brokers on one state: three RedisBrokers on one redis-server and key prefix, or one
    MemoryBroker three times (it has one process)."""
    if redis_factory is None:
        return [await make_broker()] * 3
    return [await make_broker() for _ in range(3)]


async def test_concurrent_admissions_across_replicas_hold_the_quota(replicas: list[Broker]) -> None:
    calls = [
        broker.admit_many([[entry(f"j-{r}-{i:02d}", "alice")]], quota=40)
        for i in range(50)
        for r, broker in enumerate(replicas)
    ]
    results = await asyncio.gather(*calls)
    assert sum(r == [True] for r in results) == 40
    assert await replicas[0].queued_count("alice") == 40
    assert await replicas[1].queue_depth() == 40


async def test_concurrent_rate_limits_across_replicas_allow_exactly_the_limit(replicas: list[Broker]) -> None:
    one = check("submit:user:alice", limit=30, period_ms=600_000)  # no refill while the calls run
    results = await asyncio.gather(*(broker.rate_limit([one]) for _ in range(30) for broker in replicas))
    assert sum(r[0].allowed for r in results) == 30


async def test_concurrent_slot_acquisitions_across_replicas_hold_the_limit(replicas: list[Broker]) -> None:
    calls = [broker.acquire_slot("client-sockets:alice", f"sock-{r}-{i}", 7, 10_000) for i in range(20) for r, broker in enumerate(replicas)]
    assert sum(await asyncio.gather(*calls)) == 7
    assert await replicas[2].count_slots("client-sockets:alice") == 7


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
