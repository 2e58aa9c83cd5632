"""Rate limits: the classes, the refusal, and the IETF RateLimit header fields.

`RateLimiter` charges requests to Broker buckets (GCRA, security/gcra.py); the client channel's
per-socket message rate is local to the socket (channels/client_channel.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence

from yardmaster.server.backends.base import BackendUnavailable, Broker, RateCheck, RateDecision
from yardmaster.server.backends.keys import rate_bucket
from yardmaster.server.core.batching import Batcher
from yardmaster.server.settings import RatePolicy, Settings

log = logging.getLogger("yardmaster.rate_limits")

# The classes (YM_RATE_<CLASS>; settings.RATE_CLASSES lists them in this order).
UNAUTHENTICATED = "unauthenticated"
SIGN_IN = "sign-in"
SUBMIT = "submit"
SANDBOX_CREATE = "sandbox-create"
API = "api"
ADMIN = "admin"
HANDSHAKE = "handshake"
CLIENT_MESSAGES = "client-messages"


class RateLimited(Exception):
    def __init__(self, rate_class: str, policy: RatePolicy, decision: RateDecision) -> None:
        super().__init__(f"rate limit {rate_class} ({policy}) reached; retry in {retry_after_s(decision)} s")
        self.rate_class = rate_class
        self.policy = policy
        self.decision = decision

    @property
    def retry_after_s(self) -> int:
        return retry_after_s(self.decision)


def retry_after_s(decision: RateDecision) -> int:
    """Whole seconds for Retry-After: at least 1, rounded up."""
    return max(1, math.ceil(decision.retry_after_ms / 1000))


def rate_limit_headers(rate_class: str, policy: RatePolicy, decision: RateDecision) -> dict[str, str]:
    """RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers): the policy's quota
    `q` per window `w` seconds, what remains `r` and the seconds `t` until the bucket is full."""
    return {
        "RateLimit-Policy": f'"{rate_class}";q={policy.count};w={math.ceil(policy.period_s)}',
        "RateLimit": f'"{rate_class}";r={decision.remaining};t={math.ceil(decision.reset_ms / 1000)}',
    }


# ---- the limiter ------------------------------------------------------------------------------------

# Subject kinds whose values are names a person typed or an address: hashed in bucket names, so
# the Broker never holds them in clear. User and agent ids are opaque ids, kept as they are.
USER = "user"
AGENT = "agent"
ADDRESS = "address"
ACCOUNT = "account"
HASHED_KINDS = frozenset({ADDRESS, ACCOUNT})


def bucket_subject(kind: str, subject: str) -> str:
    if kind in HASHED_KINDS:
        return hashlib.sha256(subject.encode()).hexdigest()[:32]
    return subject


def bucket_names(rate_class: str, subjects: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(rate_bucket(rate_class, kind, bucket_subject(kind, subject)) for kind, subject in subjects)


class RateLimiter:
    """Charges a request to its class's buckets in the Broker (so every replica counts the same
    requests). Concurrent callers share one Broker round trip (core.batching.Batcher).

    While the Broker cannot be reached, requests are let through (and logged): the limits protect
    the service, and refusing everything would be the outage they are meant to prevent."""

    def __init__(self, settings: Settings, broker: Broker, refused: Callable[[str], object] | None = None) -> None:
        self._settings = settings
        self._batcher: Batcher[RateCheck, RateDecision] = Batcher(broker.rate_limit, "rate-limits")
        self._refused = refused  # told each refusal's class (the metric)
        self._unavailable_logged_at = -math.inf

    def policy(self, rate_class: str) -> RatePolicy | None:
        return self._settings.rate(rate_class)

    async def check(self, rate_class: str, subjects: Sequence[tuple[str, str]]) -> RateDecision | None:
        """Charge one request of `rate_class` to each (kind, subject) bucket, all or none. None
        when the class is off (or the Broker is down); raises RateLimited when refused."""
        policy = self._settings.rate(rate_class)
        if policy is None or not subjects:
            return None
        check = RateCheck(bucket_names(rate_class, subjects), policy.count, max(1, round(policy.period_s * 1000)))
        try:
            decision = await self._batcher.call(check)
        except BackendUnavailable as exc:
            now = time.monotonic()
            if now - self._unavailable_logged_at > UNAVAILABLE_LOG_EVERY_S:
                self._unavailable_logged_at = now
                log.warning("rate limits not enforced: the Broker is unavailable", extra={"reason": str(exc)})
            return None
        if not decision.allowed:
            if self._refused is not None:
                self._refused(rate_class)
            raise RateLimited(rate_class, policy, decision)
        return decision

    def headers(self, rate_class: str, decision: RateDecision | None) -> dict[str, str]:
        """The RateLimit header fields of an allowed request (none when it was not charged)."""
        policy = self._settings.rate(rate_class)
        if decision is None or policy is None:
            return {}
        return rate_limit_headers(rate_class, policy, decision)

    async def close(self) -> None:
        await self._batcher.close()


UNAVAILABLE_LOG_EVERY_S = 60.0
