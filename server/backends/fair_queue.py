"""Fair share inside a priority band, as tags: the rule both Brokers apply when a job is queued
(RedisBroker in Lua, with the same arithmetic).

A band's entries sort by tag (then by job id, i.e. creation time). Each fair-share group (an
owner) takes the tag after its own last one, but never one behind the band's current round, which
is where the band's head is. So a group's jobs keep their order, and the groups alternate: with
A's 1,000 jobs queued and B's 10 queued after them, tags go A1 B1 A2 B2 … and B's 10th job is the
20th assignment. A group that queues after a pause joins the current round, with no credit saved
up. This is start-time fair queuing with one unit of cost per job.
"""

from __future__ import annotations


def next_tag(head_tag: int | None, band_max: int, last_tag: int, front: bool) -> int:
    """The tag of a job joining a band whose head has `head_tag` (None: the band is empty, and
    `band_max` is the highest tag it ever gave), from a group whose last tag is `last_tag`.
    `front`: a job that was already taken once (its lease lapsed) goes to the head's round."""
    current = head_tag - 1 if head_tag is not None else band_max
    if front:
        return current + 1
    return max(last_tag, current) + 1
