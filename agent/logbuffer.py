"""Per (job, attempt) buffer of log chunks: coalesces output, numbers chunks, keeps them until acked.

Pure: no I/O and no asyncio. The runner uses `has_room()` for backpressure (it stops reading
the job's output while the buffer is full) and `flush()` on a timer for coalescing.
"""

from __future__ import annotations

from collections import deque

from yardmaster.protocol.codec import MAX_LOG_CHUNK_BYTES
from yardmaster.protocol.messages import LogChunk, Stream

DEFAULT_LIMIT_BYTES = 8 * 1024 * 1024
DEFAULT_COALESCE_BYTES = 32 * 1024


class LogBuffer:
    def __init__(
        self,
        job_id: str,
        attempt: int,
        *,
        limit_bytes: int = DEFAULT_LIMIT_BYTES,
        coalesce_bytes: int = DEFAULT_COALESCE_BYTES,
        chunk_bytes: int = MAX_LOG_CHUNK_BYTES,
    ) -> None:
        if not 0 < coalesce_bytes <= chunk_bytes <= MAX_LOG_CHUNK_BYTES:
            raise ValueError("need 0 < coalesce_bytes <= chunk_bytes <= MAX_LOG_CHUNK_BYTES")
        self.job_id = job_id
        self.attempt = attempt
        self.limit_bytes = limit_bytes
        self._coalesce = coalesce_bytes
        self._chunk = chunk_bytes
        self._chunks: deque[LogChunk] = deque()
        self._held = 0  # bytes in unacked chunks
        self._pending = bytearray()
        self._pending_stream: Stream | None = None
        self._pending_ts = 0.0
        self.next_seq = 0
        self.acked_seq = -1

    @property
    def last_seq(self) -> int:
        """Highest seq produced so far (-1: none)."""
        return self.next_seq - 1

    @property
    def used_bytes(self) -> int:
        return self._held + len(self._pending)

    @property
    def pending_since(self) -> float | None:
        """Timestamp of the oldest output not yet cut into a chunk."""
        return self._pending_ts if self._pending else None

    def has_room(self) -> bool:
        return self.used_bytes < self.limit_bytes

    def add(self, stream: Stream, data: bytes, ts: float) -> list[LogChunk]:
        """Take output; return the chunks that became complete (to be sent now)."""
        out: list[LogChunk] = []
        if not data:
            return out
        if self._pending and self._pending_stream != stream:
            out.extend(self.flush())  # keep the order between stdout and stderr
        if not self._pending:
            self._pending_ts = ts
            self._pending_stream = stream
        self._pending += data
        while len(self._pending) >= self._coalesce:
            out.append(self._cut(self._chunk))
        return out

    def flush(self) -> list[LogChunk]:
        """Cut everything pending into chunks."""
        out: list[LogChunk] = []
        while self._pending:
            out.append(self._cut(self._chunk))
        return out

    def _cut(self, size: int) -> LogChunk:
        assert self._pending_stream is not None
        data = bytes(self._pending[:size])
        del self._pending[:size]
        chunk = LogChunk(
            job_id=self.job_id, attempt=self.attempt, seq=self.next_seq,
            stream=self._pending_stream, data=data, ts=self._pending_ts,
        )
        self.next_seq += 1
        self._chunks.append(chunk)
        self._held += len(data)
        return chunk

    def ack(self, seq: int) -> int:
        """The server stored everything up to `seq`: forget those chunks. Returns bytes freed."""
        freed = 0
        seq = min(seq, self.last_seq)
        if seq <= self.acked_seq:
            return 0
        self.acked_seq = seq
        while self._chunks and self._chunks[0].seq <= seq:
            freed += len(self._chunks.popleft().data)
        self._held -= freed
        return freed

    def unacked(self) -> list[LogChunk]:
        """Every chunk not yet acked, in seq order (for a re-send)."""
        return list(self._chunks)

    @property
    def empty(self) -> bool:
        return not self._chunks and not self._pending

    def clear(self) -> None:
        """Drop everything (the attempt is no longer ours)."""
        self._chunks.clear()
        self._pending.clear()
        self._held = 0
