"""The per-job log cap, as pure bookkeeping both Stores share.

A job's stored output is kept to `cap` bytes: the head (the first cap/2 bytes, so the start of
the output, where errors of set-up usually are, is never lost) and the tail (the newest output),
with the middle dropped oldest-first. The dropped range is one contiguous run of offsets, which
readers see as a jump in offsets (the client channel sends `truncated`, the text log a marker).
"""

from __future__ import annotations

import msgspec


class LogStats(msgspec.Struct, kw_only=True):
    total_bytes: int = 0  # bytes stored now
    head_bytes: int = 0
    head_end: int | None = None  # last offset of the head, once the head is full
    dropped_bytes: int = 0


def account(stats: LogStats, offset: int, size: int, cap: int) -> LogStats:
    """Stats after storing one entry of `size` bytes at `offset`."""
    total = stats.total_bytes + size
    head_bytes, head_end = stats.head_bytes, stats.head_end
    if head_end is None:
        head_bytes += size
        if cap > 0 and head_bytes >= cap // 2:
            head_end = offset
    return msgspec.structs.replace(stats, total_bytes=total, head_bytes=head_bytes, head_end=head_end)


def excess(stats: LogStats, cap: int) -> int:
    """How many bytes must go for the job to fit its cap (0 = none, or no cap)."""
    return stats.total_bytes - cap if cap > 0 and stats.total_bytes > cap else 0


def choose_drops(candidates: list[tuple[int, int]], need: int, newest_offset: int) -> list[tuple[int, int]]:
    """From (offset, size) entries after the head, oldest first, the ones to delete to free
    `need` bytes. The newest entry is never dropped (it carries the acked seq)."""
    chosen: list[tuple[int, int]] = []
    freed = 0
    for offset, size in candidates:
        if freed >= need or offset >= newest_offset:
            break
        chosen.append((offset, size))
        freed += size
    return chosen


def dropped(stats: LogStats, drops: list[tuple[int, int]]) -> LogStats:
    freed = sum(size for _, size in drops)
    return msgspec.structs.replace(
        stats, total_bytes=stats.total_bytes - freed, dropped_bytes=stats.dropped_bytes + freed
    )
