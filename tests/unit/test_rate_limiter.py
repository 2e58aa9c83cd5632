"""The limiter service (security/rate_limits.RateLimiter) on a MemoryBroker, and the pure parts
around it: bucket names (addresses and login names hashed), the header fields, the class an
authenticated caller is charged to, and the one line the CLI prints for a 429."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from yardmaster.server import cli_commands as cli
from yardmaster.server.api.auth import user_rate_class
from yardmaster.server.backends.base import RateCheck, RateDecision
from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.sdk import RequestRefused
from yardmaster.server.security import rate_limits as rl
from yardmaster.server.security.principals import Principal
from yardmaster.server.settings import RatePolicy, load_settings
from tests.support.limits import RATES_OFF


class CountingBroker(MemoryBroker):
    """A MemoryBroker that counts its rate_limit round trips and how many checks each carried."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    async def rate_limit(self, checks: Sequence[RateCheck]) -> list[RateDecision]:
        self.calls.append(len(checks))
        await asyncio.sleep(0)  # a round trip: callers arriving meanwhile wait for the next one
        return await super().rate_limit(checks)


def limiter(env: dict[str, str]) -> tuple[rl.RateLimiter, CountingBroker, list[str]]:
    broker = CountingBroker()
    refused: list[str] = []
    return rl.RateLimiter(load_settings({**RATES_OFF, **env}), broker, refused=refused.append), broker, refused


async def test_exact_counts_then_refused_with_the_class_and_a_retry() -> None:
    rate, _, refused = limiter({"YM_RATE_API": "3/1m"})
    for left in (2, 1, 0):
        decision = await rate.check(rl.API, [(rl.USER, "alice")])
        assert decision is not None and decision.allowed and decision.remaining == left
    with pytest.raises(rl.RateLimited) as over:
        await rate.check(rl.API, [(rl.USER, "alice")])
    assert over.value.rate_class == "api" and over.value.policy == RatePolicy(3, 60.0)
    assert 1 <= over.value.retry_after_s <= 20  # one request's share of the minute
    assert refused == ["api"]
    assert (await rate.check(rl.API, [(rl.USER, "bob")])) is not None  # another bucket


async def test_a_class_turned_off_charges_nothing() -> None:
    rate, broker, _ = limiter({})
    assert await rate.check(rl.SUBMIT, [(rl.USER, "alice")]) is None
    assert broker.calls == []
    assert rate.headers(rl.SUBMIT, None) == {}


async def test_several_subjects_are_charged_all_or_none() -> None:
    rate, _, _ = limiter({"YM_RATE_HANDSHAKE": "2/1m"})
    await rate.check(rl.HANDSHAKE, [(rl.AGENT, "agt_1"), (rl.ADDRESS, "192.0.2.1")])
    await rate.check(rl.HANDSHAKE, [(rl.AGENT, "agt_2"), (rl.ADDRESS, "192.0.2.1")])
    with pytest.raises(rl.RateLimited):  # the address is full
        await rate.check(rl.HANDSHAKE, [(rl.AGENT, "agt_1"), (rl.ADDRESS, "192.0.2.1")])
    # The refused check charged nothing: agt_1 still has one handshake left from another address.
    assert await rate.check(rl.HANDSHAKE, [(rl.AGENT, "agt_1"), (rl.ADDRESS, "192.0.2.2")]) is not None


async def test_concurrent_callers_share_broker_round_trips() -> None:
    rate, broker, _ = limiter({"YM_RATE_API": "1000/1m"})
    decisions = await asyncio.gather(*(rate.check(rl.API, [(rl.USER, f"u{i}")]) for i in range(50)))
    assert all(d is not None and d.allowed for d in decisions)
    assert sum(broker.calls) == 50 and len(broker.calls) < 50
    await rate.close()


def test_addresses_and_login_names_are_hashed_in_bucket_names_ids_are_not() -> None:
    names = rl.bucket_names(rl.SIGN_IN, [(rl.ADDRESS, "203.0.113.9"), (rl.ACCOUNT, "alice"), (rl.USER, "usr_1")])
    assert names[0].startswith("sign-in:address:") and "203.0.113.9" not in names[0]
    assert names[1].startswith("sign-in:account:") and "alice" not in names[1]
    assert names[2] == "sign-in:user:usr_1"
    assert len(names[0].rsplit(":", 1)[1]) == 32
    assert rl.bucket_subject(rl.ACCOUNT, "alice") == rl.bucket_subject(rl.ACCOUNT, "alice")
    assert rl.bucket_subject(rl.ACCOUNT, "alice") != rl.bucket_subject(rl.ACCOUNT, "alicf")


def test_the_ratelimit_header_fields() -> None:
    headers = rl.rate_limit_headers("api", RatePolicy(1200, 60.0), RateDecision(True, 1199, 0, 50))
    assert headers == {"RateLimit-Policy": '"api";q=1200;w=60', "RateLimit": '"api";r=1199;t=1'}
    assert rl.retry_after_s(RateDecision(False, 0, 1, 1)) == 1
    assert rl.retry_after_s(RateDecision(False, 0, 2001, 3000)) == 3


def test_admins_api_calls_are_their_own_class_other_classes_stay() -> None:
    admin, user = Principal(id="root", role="admin"), Principal(id="alice", role="user")
    assert user_rate_class(rl.API, admin) == rl.ADMIN
    assert user_rate_class(rl.API, user) == rl.API
    assert user_rate_class(rl.SUBMIT, admin) == rl.SUBMIT
    assert user_rate_class(rl.SIGN_IN, admin) == rl.SIGN_IN


@pytest.mark.parametrize("exc, line", [
    (RequestRefused(429, "rate-limited", "rate limit submit (600/1m) reached; retry in 2 s", retry_after=2),
     "rate limited by the server (rate-limited): rate limit submit (600/1m) reached; retry in 2 s"),
    (RequestRefused(429, "quota-exceeded", "quota queued_jobs reached: at most 1000", retry_after=5),
     "quota exceeded (quota-exceeded): quota queued_jobs reached: at most 1000; retry in 5 s"),
    (RequestRefused(429, "something-else", "later", retry_after=1.2), "refused for now (something-else): later; retry in 2 s"),
])
def test_the_cli_line_of_a_429_names_the_code_and_when_to_retry(exc: RequestRefused, line: str) -> None:
    assert cli.error_line(exc, "http://127.0.0.1:8080") == line
    assert "retry in" in str(exc)
