"""Rate limits: the classes, the refusal, and the IETF RateLimit header fields.

(The limiter service that charges requests to Broker buckets is built on this.)
"""

from __future__ import annotations

import math

from yardmaster.server.backends.base import RateDecision
from yardmaster.server.settings import RatePolicy

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
