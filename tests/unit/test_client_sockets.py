"""The per-replica registry of client sockets: the cap per principal, and revocations published on
the Broker (MemoryBroker here) or found by the sweep."""

from __future__ import annotations

import asyncio

from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.core.client_sockets import ClientSockets, Revocation
from yardmaster.server.security.principals import Principal


class Link:
    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.closed_with: int | None = None

    def close(self, code: int, reason: str) -> None:
        self.closed_with = code


async def always_valid(principal: Principal) -> bool:
    return True


ALICE_1 = Principal(id="alice", role="user", key_id="key_1")
ALICE_2 = Principal(id="alice", role="user", key_id="key_2")
BOB = Principal(id="bob", role="user", key_id="key_3")


def test_the_cap_counts_open_sockets_per_principal() -> None:
    sockets = ClientSockets(MemoryBroker(), always_valid)
    alice = [Link(ALICE_1), Link(ALICE_2)]
    assert all(sockets.try_add(link, 2) for link in alice)
    assert not sockets.try_add(Link(ALICE_1), 2)
    assert sockets.try_add(Link(BOB), 2)
    sockets.remove(alice[0])
    assert sockets.count("alice") == 1 and sockets.try_add(Link(ALICE_1), 2)


async def test_a_published_revocation_closes_the_matching_sockets_only() -> None:
    broker = MemoryBroker()
    here, there = ClientSockets(broker, always_valid), ClientSockets(broker, always_valid)
    await here.start()
    await there.start()
    try:
        a1, a2, bob = Link(ALICE_1), Link(ALICE_2), Link(BOB)
        for link in (a1, a2, bob):
            there.try_add(link, 10)
        await here.revoke(Revocation(principal_id="alice", key_id="key_1"))
        for _ in range(100):
            if a1.closed_with is not None:
                break
            await asyncio.sleep(0.01)
        assert a1.closed_with == CloseCode.REVOKED
        assert a2.closed_with is None and bob.closed_with is None
        assert there.close_matching(Revocation(principal_id="alice")) == 2  # every key of the principal
        assert a2.closed_with == CloseCode.REVOKED and bob.closed_with is None
    finally:
        await here.close()
        await there.close()


async def test_the_sweep_closes_sockets_whose_key_no_longer_works() -> None:
    revoked = {"key_2"}

    async def still_valid(principal: Principal) -> bool:
        return principal.key_id not in revoked

    sockets = ClientSockets(MemoryBroker(), still_valid)
    a1, a2 = Link(ALICE_1), Link(ALICE_2)
    sockets.try_add(a1, 10)
    sockets.try_add(a2, 10)
    assert await sockets.sweep() == 1
    assert a2.closed_with == CloseCode.REVOKED and a1.closed_with is None


ALICE_TOKEN_1 = Principal(id="alice", role="user", credential="access-token", token_id="jti_1")
ALICE_TOKEN_2 = Principal(id="alice", role="user", credential="access-token", token_id="jti_2")


def test_revocations_of_one_token_or_of_every_session_spare_the_rest() -> None:
    sockets = ClientSockets(MemoryBroker(), always_valid)
    links = {p: Link(p) for p in (ALICE_1, ALICE_2, ALICE_TOKEN_1, ALICE_TOKEN_2, BOB)}
    for link in links.values():
        sockets.try_add(link, 10)
    assert sockets.close_matching(Revocation(principal_id="alice", token_id="jti_1")) == 1  # a logout
    assert links[ALICE_TOKEN_1].closed_with == CloseCode.REVOKED and links[ALICE_TOKEN_2].closed_with is None
    assert sockets.close_matching(Revocation(principal_id="alice", access_tokens=True)) == 2  # a password change
    assert links[ALICE_TOKEN_2].closed_with == CloseCode.REVOKED
    assert links[ALICE_1].closed_with is None and links[ALICE_2].closed_with is None and links[BOB].closed_with is None


async def test_the_sweep_closes_only_the_sockets_of_an_expired_access_token() -> None:
    async def still_valid(principal: Principal) -> bool:
        return principal.token_id != "jti_1"

    sockets = ClientSockets(MemoryBroker(), still_valid)
    expired, live, by_key = Link(ALICE_TOKEN_1), Link(ALICE_TOKEN_2), Link(ALICE_1)
    for link in (expired, live, by_key):
        sockets.try_add(link, 10)
    assert await sockets.sweep() == 1
    assert expired.closed_with == CloseCode.REVOKED and live.closed_with is None and by_key.closed_with is None
