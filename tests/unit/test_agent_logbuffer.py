from __future__ import annotations

import pytest

from yardmaster.agent.logbuffer import LogBuffer
from yardmaster.protocol.codec import MAX_LOG_CHUNK_BYTES


def test_small_writes_are_coalesced_until_flush() -> None:
    buf = LogBuffer("j", 1)
    assert buf.add("stdout", b"a\n", 1.0) == []
    assert buf.add("stdout", b"b\n", 1.01) == []
    assert buf.pending_since == 1.0
    [chunk] = buf.flush()
    assert (chunk.seq, chunk.stream, chunk.data, chunk.ts) == (0, "stdout", b"a\nb\n", 1.0)
    assert buf.pending_since is None
    assert buf.last_seq == 0


def test_stream_switch_cuts_a_chunk_to_keep_order() -> None:
    buf = LogBuffer("j", 1)
    buf.add("stdout", b"o1", 1.0)
    out = buf.add("stderr", b"e1", 1.1)
    out += buf.add("stdout", b"o2", 1.2)
    out += buf.flush()
    assert [(c.seq, c.stream, c.data) for c in out] == [(0, "stdout", b"o1"), (1, "stderr", b"e1"), (2, "stdout", b"o2")]


def test_big_output_is_split_at_the_chunk_limit() -> None:
    buf = LogBuffer("j", 3)
    data = bytes(range(256)) * 1000  # 256000 bytes
    chunks = buf.add("stdout", data, 0.0) + buf.flush()
    assert all(len(c.data) <= MAX_LOG_CHUNK_BYTES for c in chunks)
    assert b"".join(c.data for c in chunks) == data
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert all(c.attempt == 3 and c.job_id == "j" for c in chunks)


def test_ack_frees_space_and_unacked_keeps_the_rest_in_order() -> None:
    buf = LogBuffer("j", 1, limit_bytes=100, coalesce_bytes=10, chunk_bytes=10)
    buf.add("stdout", b"x" * 100, 0.0)
    assert not buf.has_room()
    assert [c.seq for c in buf.unacked()] == list(range(10))
    assert buf.ack(3) == 40
    assert buf.has_room()
    assert [c.seq for c in buf.unacked()] == list(range(4, 10))
    assert buf.ack(2) == 0  # old acks change nothing
    assert buf.ack(99) == 60  # beyond what exists: clamps to the last seq
    assert buf.acked_seq == 9 and buf.empty


def test_pending_bytes_count_towards_the_limit() -> None:
    buf = LogBuffer("j", 1, limit_bytes=8, coalesce_bytes=16, chunk_bytes=16)
    buf.add("stdout", b"12345678", 0.0)
    assert buf.used_bytes == 8 and not buf.has_room()


def test_clear_drops_everything() -> None:
    buf = LogBuffer("j", 1)
    buf.add("stdout", b"x" * 40000, 0.0)
    buf.add("stdout", b"y", 0.0)
    buf.clear()
    assert buf.empty and buf.used_bytes == 0 and buf.unacked() == []


def test_rejects_chunks_bigger_than_the_wire_allows() -> None:
    with pytest.raises(ValueError):
        LogBuffer("j", 1, chunk_bytes=MAX_LOG_CHUNK_BYTES + 1)
