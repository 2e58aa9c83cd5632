"""Ids sort by creation, also within one millisecond."""

from __future__ import annotations

from yardmaster.server.core.ids import new_id


def test_ids_made_one_after_another_sort_in_that_order() -> None:
    ids = [new_id("job") for _ in range(5000)]  # many fall in the same millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == len("job_") + 26 for i in ids)
