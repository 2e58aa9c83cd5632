"""Login throttling (server/security/throttle.py): the back-off rule as a pure function, and the
counters on a real MemoryBroker with a clock the test moves (the Broker's own TTLs run on real
time; the wait is decided by the failure times the counters hold)."""

from __future__ import annotations

import pytest

from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.security.throttle import FREE_FAILURES, MAX_WAIT_S, LoginThrottle, backoff_s, retry_after_s


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def throttle(clock: Clock) -> LoginThrottle:
    return LoginThrottle(MemoryBroker(), clock=clock)


# ---- the rule ---------------------------------------------------------------------------------------


def test_five_failures_are_free_then_the_wait_doubles_up_to_fifteen_minutes() -> None:
    assert [backoff_s(n) for n in range(FREE_FAILURES)] == [0.0] * 5
    assert [backoff_s(n) for n in range(5, 11)] == [1, 2, 4, 8, 16, 32]
    assert backoff_s(14) == 512 and backoff_s(15) == MAX_WAIT_S == 900
    assert backoff_s(10_000) == MAX_WAIT_S


def test_the_wait_counts_from_the_last_failure_in_whole_seconds() -> None:
    assert retry_after_s(4, 100.0, 100.0) == 0
    assert retry_after_s(7, 100.0, 100.0) == 4
    assert retry_after_s(7, 100.0, 102.5) == 2  # 1.5 s left: rounded up
    assert retry_after_s(7, 100.0, 104.0) == 0
    assert retry_after_s(7, None, 100.0) == 0  # no recorded failure: nothing to wait for


# ---- on the Broker --------------------------------------------------------------------------------------


async def fail(throttle: LoginThrottle, login: str, address: str | None, times: int) -> None:
    for _ in range(times):
        await throttle.failed(login, address)


async def test_an_account_is_throttled_after_five_failures_and_freed_when_the_wait_is_over(
    throttle: LoginThrottle, clock: Clock
) -> None:
    await fail(throttle, "alice", "10.0.0.1", 4)
    assert await throttle.retry_after("alice", "10.0.0.2") == 0
    await fail(throttle, "alice", "10.0.0.1", 1)
    assert await throttle.retry_after("alice", "10.0.0.2") == 1  # another address: the account counts
    clock.now += 1
    assert await throttle.retry_after("alice", "10.0.0.2") == 0
    await fail(throttle, "alice", "10.0.0.2", 1)
    assert await throttle.retry_after("ALICE", "10.0.0.3") == 2  # the login is compared casefolded
    clock.now += 2
    await fail(throttle, "alice", "10.0.0.3", 1)
    assert await throttle.retry_after("alice", None) == 4


async def test_an_address_trying_many_accounts_is_throttled_on_a_new_one_too(throttle: LoginThrottle) -> None:
    for name in ("a1", "a2", "a3", "a4", "a5"):
        await fail(throttle, name, "10.0.0.9", 1)
    assert await throttle.retry_after("someone-new", "10.0.0.9") == 1
    assert await throttle.retry_after("someone-new", "10.0.0.8") == 0


async def test_a_success_clears_the_account_count_but_not_the_address_count(throttle: LoginThrottle, clock: Clock) -> None:
    await fail(throttle, "bob", "10.0.0.1", 6)
    clock.now += 10
    await throttle.succeeded("Bob", "bob@example.test")
    await fail(throttle, "bob", "10.0.0.2", 4)
    assert await throttle.retry_after("bob", "10.0.0.2") == 0  # the count started over
    await fail(throttle, "bob", "10.0.0.2", 1)
    assert await throttle.retry_after("bob", "10.0.0.2") == 1
    await fail(throttle, "carol", "10.0.0.1", 1)  # 10.0.0.1's seventh failure
    assert await throttle.retry_after("dave", "10.0.0.1") == 4


async def test_the_longest_wait_of_account_and_address_applies(throttle: LoginThrottle, clock: Clock) -> None:
    await fail(throttle, "erin", "10.0.0.1", 8)  # both at 8 failures: 8 s
    await fail(throttle, "frank", "10.0.0.1", 1)  # the address at 9: 16 s
    assert await throttle.retry_after("erin", "10.0.0.1") == 16
    assert await throttle.retry_after("erin", "10.0.0.2") == 8
