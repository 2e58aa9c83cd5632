"""Throttling of failed sign-ins, per account and per client address, on Broker counters (so
every replica counts the same failures).

In a window of WINDOW_S from the first failure, FREE_FAILURES failures cost nothing; after the
n-th (n >= FREE_FAILURES) the next attempt must wait 2^(n - FREE_FAILURES) seconds (at most
MAX_WAIT_S) from that failure. The account is the login as typed, casefolded, whether or not
such a user exists, so the answer never tells. A successful sign-in clears its account's count
(not its address's: one address trying many accounts stays throttled).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from typing import Final

from yardmaster.server.backends.base import Broker
from yardmaster.server.backends.keys import login_failed_at_counter, login_failures_counter

WINDOW_S: Final = 15 * 60
FREE_FAILURES: Final = 5
MAX_WAIT_S: Final = 15 * 60


# ---- the rule (pure) ------------------------------------------------------------------------------


def backoff_s(failures: int) -> float:
    """How long after the `failures`-th failure of a window the next attempt must wait."""
    if failures < FREE_FAILURES:
        return 0.0
    return float(min(2 ** min(failures - FREE_FAILURES, 32), MAX_WAIT_S))


def retry_after_s(failures: int, last_failure_at: float | None, now: float) -> int:
    """Whole seconds still to wait (0: go ahead), given the failures so far and when the last was."""
    if last_failure_at is None:
        return 0
    wait = last_failure_at + backoff_s(failures) - now
    return math.ceil(wait) if wait > 0 else 0


# ---- the counters -----------------------------------------------------------------------------------


def _subject(value: str) -> str:
    # Counter names stay short and free of odd characters, and hold no login name in clear.
    return hashlib.sha256(value.encode()).hexdigest()[:32]


class LoginThrottle:
    def __init__(self, broker: Broker, clock: Callable[[], float] = time.time) -> None:
        self._broker = broker
        self._clock = clock

    def _subjects(self, login: str, address: str | None) -> Iterable[tuple[str, str]]:
        yield "account", _subject(login.casefold())
        if address:
            yield "address", _subject(address)

    async def retry_after(self, login: str, address: str | None) -> int:
        """Seconds the caller must wait before trying `login` from `address` (0: may try now)."""
        now = self._clock()
        wait = 0
        for kind, subject in self._subjects(login, address):
            failures = await self._broker.get_counter(login_failures_counter(kind, subject))
            if failures < FREE_FAILURES:
                continue
            at_ms = await self._broker.get_counter(login_failed_at_counter(kind, subject, failures))
            # A missing timestamp has outlived its back-off: nothing to wait for.
            wait = max(wait, retry_after_s(failures, at_ms / 1000 if at_ms else None, now))
        return wait

    async def failed(self, login: str, address: str | None) -> None:
        now = self._clock()
        for kind, subject in self._subjects(login, address):
            failures = await self._broker.incr_counter(login_failures_counter(kind, subject), WINDOW_S * 1000)
            if failures < FREE_FAILURES:
                continue
            at = login_failed_at_counter(kind, subject, failures)
            # The counter's value is the time of the failure, and it lives as long as the
            # back-off. (Deleted first: one of an earlier window may linger under this name.)
            await self._broker.delete_counter(at)
            await self._broker.incr_counter(at, max(1, math.ceil(backoff_s(failures) * 1000)), by=int(now * 1000))

    async def succeeded(self, *logins: str) -> None:
        """Clear the accounts' counts: the login as typed, and the user's other names for it."""
        for subject in {_subject(login.casefold()) for login in logins}:
            failures = await self._broker.get_counter(login_failures_counter("account", subject))
            if failures == 0:
                continue
            await self._broker.delete_counter(login_failures_counter("account", subject))
            if failures >= FREE_FAILURES:
                await self._broker.delete_counter(login_failed_at_counter("account", subject, failures))
