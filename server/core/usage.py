"""A user's usage of their quotas and the limits that apply to them (GET /api/v1/users/me).

Each count is read where its quota is enforced: queued jobs from the Broker's queue (the Store
when the Broker is down), running jobs from the Store, client sockets from the Broker's slots.
"""

from __future__ import annotations

import msgspec

from yardmaster.protocol.jobs import LEASED_STATES
from yardmaster.server.backends.base import BackendUnavailable, Broker, Store
from yardmaster.server.backends.keys import client_sockets_slots
from yardmaster.server.backends.records import Role
from yardmaster.server.security.rate_limits import ADMIN, API, UNAUTHENTICATED
from yardmaster.server.settings import RATE_CLASSES, Settings

_LEASED = sorted(LEASED_STATES)


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    queued_jobs: int
    running_jobs: int
    client_sockets: int | None  # None: the Broker cannot be reached right now
    sandboxes: int


class RateView(msgspec.Struct, frozen=True, kw_only=True):
    count: int
    period_s: float


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """0 is no quota; a rate class that is off is None."""

    queued_jobs: int
    running_jobs: int
    client_sockets: int
    subscriptions_per_socket: int
    sandboxes: int
    rates: dict[str, RateView | None]


async def usage_of(broker: Broker, store: Store, user_id: str) -> Usage:
    try:
        queued = await broker.queued_count(user_id)
    except BackendUnavailable:
        queued = await store.count_jobs(owner=user_id, states=["queued"])
    try:
        sockets: int | None = await broker.count_slots(client_sockets_slots(user_id))
    except BackendUnavailable:
        sockets = None
    running = await store.count_jobs(owner=user_id, states=_LEASED)
    return Usage(queued_jobs=queued, running_jobs=running, client_sockets=sockets, sandboxes=0)  # sandboxes: issue 10


def limits_for(settings: Settings, role: Role) -> Limits:
    """The classes a signed-in user is charged to: admins are charged "admin" where users are
    charged "api"; "unauthenticated" is per client address, never per user."""
    skipped = {UNAUTHENTICATED, API if role == "admin" else ADMIN}
    rates: dict[str, RateView | None] = {}
    for rate_class in RATE_CLASSES:
        if rate_class in skipped:
            continue
        policy = settings.rate(rate_class)
        rates[rate_class] = None if policy is None else RateView(count=policy.count, period_s=policy.period_s)
    return Limits(
        queued_jobs=settings.quota_queued_jobs,
        running_jobs=settings.quota_running_jobs,
        client_sockets=settings.quota_client_sockets,
        subscriptions_per_socket=settings.quota_subscriptions,
        sandboxes=settings.sandbox_max_active,
        rates=rates,
    )
