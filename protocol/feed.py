"""One reader's view of one job's log, by offset: no gap, no duplicate. Sans-I/O.

Log entries reach a reader from two sources: history (stored entries, read page by page) and
live events (published as they are stored). `JobFeed` takes both in and says what to do: deliver
an entry, tell the reader that the log cap dropped a range, fetch history from an offset, or give
up because the reader holds too much. The server's client channel and the Python client's
follower both drive one; neither keeps offset bookkeeping of its own.

Rules:
* Entries are delivered in offset order, each once. `next_offset` is the next one expected.
* A live entry below `next_offset` was already delivered: dropped. One above it means a live
  event went missing: the feed starts catching up (fetch history from `next_offset`) and holds
  live entries until the caller says history is done (`release`), so live entries never
  overtake history.
* In history, a jump in offsets is a range the log cap dropped: `Skipped(offset)` comes first.
* Held entries are bounded in bytes; past the bound the feed answers `Overflow`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Deliver(Generic[T]):
    offset: int
    item: T


@dataclass(frozen=True, slots=True)
class Skipped:
    """History before `offset` (back to the previous next offset) is gone: say so, then go on."""

    offset: int


@dataclass(frozen=True, slots=True)
class FetchHistory:
    """Read stored entries from `from_offset` on and pass them to `history`."""

    from_offset: int


@dataclass(frozen=True, slots=True)
class Overflow:
    """The reader holds more than its bound while catching up: close it (it resumes by offset)."""


Action = Deliver[T] | Skipped | FetchHistory | Overflow


@dataclass(slots=True)
class JobFeed(Generic[T]):
    """`next_offset` None: live only, starting with whatever comes next."""

    next_offset: int | None = None
    hold_limit_bytes: int | None = None
    catching_up: bool = False
    _held: list[tuple[int, T, int]] = field(default_factory=list)
    _held_bytes: int = 0

    def start(self) -> list[Action[T]]:
        """A subscription that named a start offset first reads history from there."""
        if self.next_offset is None:
            return []
        self.catching_up = True
        return [FetchHistory(self.next_offset)]

    def begin_at(self, offset: int) -> None:
        """For a live-only feed: the offset the next stored entry gets, once known."""
        if self.next_offset is None:
            self.next_offset = offset

    def live(self, offset: int, item: T, size: int = 0) -> list[Action[T]]:
        if self.catching_up:
            return self._hold(offset, item, size)
        if self.next_offset is not None:
            if offset < self.next_offset:
                return []  # delivered already (from history, or twice by the broker)
            if offset > self.next_offset:
                # A live event went missing: fill the hole from history, hold this one meanwhile.
                self.catching_up = True
                return [*self._hold(offset, item, size), FetchHistory(self.next_offset)]
        self.next_offset = offset + 1
        return [Deliver(offset, item)]

    def history(self, entries: Iterable[tuple[int, T]], *, complete: bool) -> list[Action[T]]:
        """A page of stored entries in offset order; `complete` when it was the last page.
        After a complete page, the caller sends what it got and then calls `release`."""
        actions: list[Action[T]] = []
        for offset, item in entries:
            expected = self.next_offset or 0
            if offset < expected:
                continue
            if offset > expected:
                actions.append(Skipped(offset))
            actions.append(Deliver(offset, item))
            self.next_offset = offset + 1
        if not complete:
            actions.append(FetchHistory(self.next_offset or 0))
        return actions

    def truncated(self, offset: int) -> list[Action[T]]:
        """The server says history before `offset` is gone."""
        if self.next_offset is not None and offset <= self.next_offset:
            return []
        self.next_offset = offset
        return [Skipped(offset)]

    def release(self) -> list[Action[T]]:
        """History has been sent: live entries held meanwhile go out (or start another catch-up)."""
        held, self._held, self._held_bytes = self._held, [], 0
        self.catching_up = False
        actions: list[Action[T]] = []
        for offset, item, size in held:
            actions += self.live(offset, item, size)
        return actions

    def _hold(self, offset: int, item: T, size: int) -> list[Action[T]]:
        self._held_bytes += size
        if self.hold_limit_bytes is not None and self._held_bytes > self.hold_limit_bytes:
            return [Overflow()]
        self._held.append((offset, item, size))
        return []
