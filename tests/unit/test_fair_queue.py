"""The fair-share tag of a queued job (backends/fair_queue.py): pure."""

from __future__ import annotations

from yardmaster.server.backends.fair_queue import next_tag


def test_an_empty_band_continues_after_the_highest_tag_it_gave() -> None:
    assert next_tag(None, band_max=0, last_tag=0, front=False) == 1
    assert next_tag(None, band_max=40, last_tag=0, front=False) == 41
    assert next_tag(None, band_max=40, last_tag=55, front=False) == 56  # its own backlog first
    assert next_tag(None, band_max=40, last_tag=55, front=True) == 41


def test_a_group_with_a_backlog_takes_the_tag_after_its_own_last() -> None:
    assert next_tag(1, band_max=1_000, last_tag=1_000, front=False) == 1_001
    assert next_tag(1, band_max=1_000, last_tag=3, front=False) == 4


def test_a_late_joiner_joins_the_current_round_without_credit() -> None:
    # The head is at tag 501: a group that queued nothing lately, or long ago, takes 501.
    assert next_tag(501, band_max=1_000, last_tag=0, front=False) == 501
    assert next_tag(501, band_max=1_000, last_tag=120, front=False) == 501
    assert next_tag(501, band_max=1_000, last_tag=501, front=False) == 502


def test_front_takes_the_heads_round_whatever_the_groups_backlog() -> None:
    assert next_tag(501, band_max=1_000, last_tag=900, front=True) == 501
    assert next_tag(1, band_max=1, last_tag=0, front=True) == 1


def test_two_groups_alternate() -> None:
    """A's 4 jobs then B's 2, as a Broker assigns them: A1 B1 A2 B2 A3 A4."""
    band_max, head, last = 0, None, {"a": 0, "b": 0}
    order: list[tuple[int, str]] = []
    for group in "aaaabb":
        tag = next_tag(head, band_max, last[group], front=False)
        last[group], band_max = tag, max(band_max, tag)
        head = tag if head is None else min(head, tag)
        order.append((tag, group))
    assert [g for _, g in sorted(order)] == list("ababaa")
