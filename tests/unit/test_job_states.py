"""The job state machine: every legal move and every illegal one."""

from __future__ import annotations

import itertools

import pytest

from yardmaster.protocol.jobs import JOB_STATES, TERMINAL_STATES, IllegalTransition, JobEvent, can_transition, sources_of, transition

LEGAL = {
    ("queued", JobEvent.ASSIGN): "assigned",
    ("queued", JobEvent.CANCEL): "cancelled",
    ("assigned", JobEvent.ACCEPT): "running",
    ("assigned", JobEvent.REJECT): "queued",
    ("assigned", JobEvent.LEASE_LOST_RETRY): "queued",
    ("assigned", JobEvent.LEASE_LOST_FINAL): "lost",
    ("assigned", JobEvent.CANCEL): "cancelling",
    ("assigned", JobEvent.CANCELLED): "cancelled",
    ("assigned", JobEvent.SUCCEED): "succeeded",
    ("assigned", JobEvent.FAIL): "failed",
    ("assigned", JobEvent.TIME_OUT): "timed-out",
    ("running", JobEvent.LEASE_LOST_RETRY): "queued",
    ("running", JobEvent.LEASE_LOST_FINAL): "lost",
    ("running", JobEvent.CANCEL): "cancelling",
    ("running", JobEvent.CANCELLED): "cancelled",
    ("running", JobEvent.SUCCEED): "succeeded",
    ("running", JobEvent.FAIL): "failed",
    ("running", JobEvent.TIME_OUT): "timed-out",
    ("cancelling", JobEvent.CANCELLED): "cancelled",
    ("cancelling", JobEvent.LEASE_LOST_RETRY): "cancelled",
    ("cancelling", JobEvent.LEASE_LOST_FINAL): "cancelled",
    ("cancelling", JobEvent.SUCCEED): "succeeded",
    ("cancelling", JobEvent.FAIL): "failed",
    ("cancelling", JobEvent.TIME_OUT): "timed-out",
}


@pytest.mark.parametrize(("move", "target"), LEGAL.items(), ids=lambda v: str(v))
def test_every_legal_move(move: tuple[str, JobEvent], target: str) -> None:
    state, event = move
    assert transition(state, event) == target
    assert can_transition(state, event)


ILLEGAL = [pair for pair in itertools.product(JOB_STATES, JobEvent) if pair not in LEGAL]


@pytest.mark.parametrize(("state", "event"), ILLEGAL, ids=lambda v: getattr(v, "value", v))
def test_every_illegal_move_is_refused(state: str, event: JobEvent) -> None:
    with pytest.raises(IllegalTransition):
        transition(state, event)
    assert not can_transition(state, event)


def test_terminal_states_are_final() -> None:
    for state, event in itertools.product(TERMINAL_STATES, JobEvent):
        assert not can_transition(state, event)


def test_sources_of_is_what_compare_and_set_expects() -> None:
    assert sources_of(JobEvent.ASSIGN) == {"queued"}
    assert sources_of(JobEvent.TIME_OUT) == {"assigned", "running", "cancelling"}
    assert sources_of(JobEvent.CANCEL) == {"queued", "assigned", "running"}
