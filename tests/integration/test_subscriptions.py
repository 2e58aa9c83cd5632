"""read_forever keeps a subscription alive: a dropped one is made again (real MemoryBroker)."""

from __future__ import annotations

import asyncio

from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.core.subscriptions import read_forever


async def test_a_dropped_subscription_is_made_again_and_closed_on_cancel() -> None:
    broker = MemoryBroker(subscription_buffer=4)
    got: list[bytes] = []
    release = asyncio.Event()

    async def handle(data: bytes) -> None:
        got.append(data)
        await release.wait()  # a slow handler: the subscription falls behind and is dropped

    first = await broker.subscribe("ch")
    reader = asyncio.create_task(read_forever(broker, "ch", first, handle))
    await broker.publish("ch", b"m0")
    while not got:
        await asyncio.sleep(0.01)
    for i in range(1, 20):  # overflow the 4-message buffer while the handler is stuck on m0
        await broker.publish("ch", f"m{i}".encode())
    release.set()

    async def delivered_after_drop() -> None:
        while b"after" not in got:
            await broker.publish("ch", b"after")
            await asyncio.sleep(0.02)

    await asyncio.wait_for(delivered_after_drop(), timeout=5)
    assert got[0] == b"m0" and b"m19" not in got  # the overflow was dropped, not delivered late
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    count = len(got)
    await broker.publish("ch", b"after-cancel")
    await asyncio.sleep(0.05)
    assert len(got) == count  # the reader's subscription was closed with it
