"""Coalescer: what callers add while a send is in flight goes out together in the next send."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import pytest

from yardmaster.server.core.batching import Coalescer

WAIT_S = 5.0


class Wire:
    """A send that records each batch and can be held on the wire."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.open = asyncio.Event()
        self.open.set()
        self.fail = False

    async def send(self, items: Sequence[str]) -> None:
        self.batches.append(list(items))
        await self.open.wait()
        if self.fail:
            raise RuntimeError("wire broke")


async def test_a_lone_caller_sends_at_once() -> None:
    wire = Wire()
    out = Coalescer(wire.send, "test")
    await out.add(["a"])
    await out.add(["b", "c"])
    assert wire.batches == [["a"], ["b", "c"]]


async def test_adds_made_during_a_send_share_the_next_one_in_order() -> None:
    wire = Wire()
    out = Coalescer(wire.send, "test")
    wire.open.clear()
    first = asyncio.create_task(out.add(["1"]))
    await asyncio.sleep(0)
    later = [asyncio.create_task(out.add([f"{n}a", f"{n}b"])) for n in (2, 3, 4)]
    await asyncio.sleep(0)
    assert wire.batches == [["1"]]
    assert not any(t.done() for t in [first, *later])  # nobody is answered before its send
    wire.open.set()
    await asyncio.wait_for(asyncio.gather(first, *later), WAIT_S)
    assert wire.batches == [["1"], ["2a", "2b", "3a", "3b", "4a", "4b"]]


async def test_the_first_caller_is_not_held_up_by_later_batches() -> None:
    gates: list[asyncio.Event] = []

    async def send(items: Sequence[str]) -> None:
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()

    out = Coalescer(send, "test")
    first = asyncio.create_task(out.add(["1"]))
    await asyncio.sleep(0)
    second = asyncio.create_task(out.add(["2"]))
    await asyncio.sleep(0)
    gates[0].set()  # the first send is done; the second is then on the wire, and stays there
    await asyncio.wait_for(first, WAIT_S)
    await asyncio.sleep(0.01)
    assert len(gates) == 2 and not second.done()
    gates[1].set()
    await asyncio.wait_for(second, WAIT_S)
    await out.close()


async def test_a_failed_send_is_logged_and_its_callers_go_on(caplog: pytest.LogCaptureFixture) -> None:
    wire = Wire()
    wire.fail = True
    out = Coalescer(wire.send, "test")
    with caplog.at_level(logging.ERROR, logger="yardmaster.batching"):
        await out.add(["x"])
    assert "batched send failed" in caplog.text
    wire.fail = False
    await out.add(["y"])
    assert wire.batches == [["x"], ["y"]]
