"""JobFeed: the no-gap/no-duplicate bookkeeping shared by the client channel and the SDK follower."""

from __future__ import annotations

from typing import Any

import pytest

from yardmaster.protocol.feed import Deliver, FetchHistory, JobFeed, Overflow, Skipped


def run(feed: JobFeed[str], steps: list[tuple[str, Any]]) -> list[object]:
    """Apply ("live", offset) / ("history", ([offsets], complete)) / ("release", None) /
    ("truncated", offset) steps; return every action, with Deliver shown as its offset."""
    out: list[object] = []
    for kind, arg in steps:
        if kind == "live":
            actions = feed.live(arg, f"e{arg}", size=10)
        elif kind == "history":
            offsets, complete = arg
            actions = feed.history([(o, f"e{o}") for o in offsets], complete=complete)
        elif kind == "release":
            actions = feed.release()
        elif kind == "start":
            actions = feed.start()
        else:
            actions = feed.truncated(arg)
        out += [a.offset if isinstance(a, Deliver) else a for a in actions]
    return out


TABLE: list[tuple[str, int | None, list[tuple[str, Any]], list[object]]] = [
    ("live in order", 0, [("live", 0), ("live", 1), ("live", 2)], [0, 1, 2]),
    ("live duplicates dropped", 0, [("live", 0), ("live", 0), ("live", 1), ("live", 0)], [0, 1]),
    ("live-only feed takes what comes", None, [("live", 7), ("live", 8), ("live", 8)], [7, 8]),
    (
        "a missing live event is filled from history, later live held until release",
        0,
        [("live", 0), ("live", 2), ("live", 3), ("history", ([1, 2], True)), ("release", None), ("live", 4)],
        [0, FetchHistory(1), 1, 2, 3, 4],
    ),
    (
        "resume from an offset: history first, live held meanwhile, no duplicate",
        5,
        [("start", None), ("live", 9), ("history", ([5, 6, 7], False)), ("history", ([8, 9], True)), ("release", None)],
        [FetchHistory(5), 5, 6, 7, FetchHistory(8), 8, 9],
    ),
    (
        "a range dropped by the log cap is announced before the entry after it",
        0,
        [("start", None), ("history", ([0, 1, 40, 41], True)), ("release", None), ("live", 42)],
        [FetchHistory(0), 0, 1, Skipped(40), 40, 41, 42],
    ),
    (
        "history entries before the start offset are ignored",
        3,
        [("start", None), ("history", ([1, 2, 3], True)), ("release", None)],
        [FetchHistory(3), 3],
    ),
    (
        "a held live event that is still ahead after history starts another catch-up",
        0,
        [("live", 5), ("history", ([0, 1], True)), ("release", None)],
        [FetchHistory(0), 0, 1, FetchHistory(2)],
    ),
    (
        "the server's truncated moves the feed forward, once",
        0,
        [("live", 0), ("truncated", 10), ("truncated", 10), ("truncated", 3), ("live", 10)],
        [0, Skipped(10), 10],
    ),
]


@pytest.mark.parametrize(("name", "start", "steps", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_job_feed(name: str, start: int | None, steps: list[tuple[str, Any]], expected: list[object]) -> None:
    assert run(JobFeed(next_offset=start), steps) == expected


def test_held_events_are_bounded_in_bytes() -> None:
    feed: JobFeed[str] = JobFeed(next_offset=0, hold_limit_bytes=25)
    assert feed.start() == [FetchHistory(0)]
    assert feed.live(3, "a", size=10) == []
    assert feed.live(4, "b", size=10) == []
    assert feed.live(5, "c", size=10) == [Overflow()]


def test_released_items_carry_their_payload() -> None:
    feed: JobFeed[str] = JobFeed(next_offset=0)
    feed.start()
    feed.live(1, "live-one")
    assert feed.history([(0, "stored-zero")], complete=True) == [Deliver(0, "stored-zero")]
    assert feed.release() == [Deliver(1, "live-one")]
    assert feed.next_offset == 2 and not feed.catching_up
