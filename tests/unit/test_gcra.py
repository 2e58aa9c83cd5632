"""GCRA, the rate limiter's arithmetic (security/gcra.py): pure, on a clock the test sets."""

from __future__ import annotations

from yardmaster.server.security.gcra import Verdict, combine, gcra

T = 1_750_000_000_000.123  # ms since the epoch, with a fraction, as Redis TIME gives


def burst(n: int, limit: int, period_ms: float, now: float = T, cost: int = 1) -> tuple[list[Verdict], float | None]:
    verdicts: list[Verdict] = []
    tat: float | None = None
    for _ in range(n):
        v = gcra(tat, now, limit, period_ms, cost)
        verdicts.append(v)
        if v.allowed:
            tat = v.tat_ms
    return verdicts, tat


def test_a_burst_of_limit_then_a_refusal_with_its_retry() -> None:
    verdicts, tat = burst(6, limit=5, period_ms=1_000)
    assert [v.allowed for v in verdicts] == [True] * 5 + [False]
    assert [v.remaining for v in verdicts] == [4, 3, 2, 1, 0, 0]
    assert [v.reset_ms for v in verdicts[:5]] == [200, 400, 600, 800, 1_000]
    assert all(v.retry_after_ms == 0 for v in verdicts[:5])
    refused = verdicts[5]
    assert refused.retry_after_ms == 200 and refused.reset_ms == 1_000
    assert refused.tat_ms == tat  # a refusal charges nothing


def test_one_request_replenishes_per_interval() -> None:
    _, tat = burst(5, limit=5, period_ms=1_000)
    assert not gcra(tat, T + 199, 5, 1_000).allowed
    assert gcra(tat, T + 199, 5, 1_000).retry_after_ms == 1
    after = gcra(tat, T + 200, 5, 1_000)
    assert after.allowed and after.remaining == 0 and after.reset_ms == 1_000
    assert not gcra(after.tat_ms, T + 200, 5, 1_000).allowed
    later = gcra(tat, T + 600, 5, 1_000)  # three intervals: three requests, this one of them
    assert later.allowed and later.remaining == 2


def test_a_bucket_is_full_again_one_period_after_its_last_use() -> None:
    _, tat = burst(5, limit=5, period_ms=1_000)
    assert tat == T + 1_000
    fresh = gcra(tat, T + 1_000, 5, 1_000)
    assert fresh.allowed and fresh.remaining == 4 and fresh.reset_ms == 200
    assert gcra(None, T, 5, 1_000) == gcra(T - 50, T, 5, 1_000)  # a TAT in the past is no TAT


def test_three_per_second_is_exact_despite_floats() -> None:
    verdicts, tat = burst(4, limit=3, period_ms=1_000)
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert [v.remaining for v in verdicts[:3]] == [2, 1, 0]
    assert verdicts[2].reset_ms == 1_000 and verdicts[3].retry_after_ms == 334
    assert tat is not None
    again = gcra(tat, T + 1_000 / 3, 3, 1_000)  # exactly one interval later: one more
    assert again.allowed and again.remaining == 0
    assert gcra(tat, T + 1_000, 3, 1_000).remaining == 2  # full after the period, not 1 short


def test_a_cost_above_one_takes_several_requests() -> None:
    first = gcra(None, T, 5, 1_000, cost=3)
    assert first.allowed and first.remaining == 2 and first.reset_ms == 600
    second = gcra(first.tat_ms, T, 5, 1_000, cost=3)
    assert not second.allowed and second.retry_after_ms == 200 and second.remaining == 2
    assert gcra(first.tat_ms, T, 5, 1_000, cost=2).allowed
    assert gcra(first.tat_ms, T + 200, 5, 1_000, cost=3).allowed


def test_combine_takes_the_most_constrained_bucket() -> None:
    ok_a = Verdict(True, T, remaining=3, retry_after_ms=0, reset_ms=400)
    ok_b = Verdict(True, T, remaining=1, retry_after_ms=0, reset_ms=900)
    no_c = Verdict(False, T, remaining=0, retry_after_ms=250, reset_ms=700)
    no_d = Verdict(False, T, remaining=0, retry_after_ms=90, reset_ms=100)
    assert combine([ok_a, ok_b]) == (True, 1, 0, 900)
    assert combine([ok_a, no_c, no_d]) == (False, 0, 250, 700)
    assert combine([no_d]) == (False, 0, 90, 100)
