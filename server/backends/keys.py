"""Every Broker name in one place: lock names, presence kinds, pub/sub channels, and the Redis key
layout they map to. Nothing else builds a Broker key or channel name by hand.

Channels (pub/sub):
  job:<job id>          log and job-state events of one job (client-channel `job:<id>` topics)
  jobs:<owner>          job-state events of one owner's jobs (the `jobs` topic of a user)
  jobs:*                job-state events of every job (the `jobs` topic of an admin)
  replica:<replica id>  commands for the agent sockets one replica holds
  principals            revocations: every replica closes the sockets of a revoked key
"""

from __future__ import annotations

# ---- logical names, the same for every Broker ----------------------------------------------

SCHEDULER_LOCK = "scheduler"

PRESENCE_AGENT = "agent"  # agent id -> AgentPresence (which replica holds its socket)
PRESENCE_REPLICA = "replica"  # replica id -> ReplicaPresence (host and pid)
PRESENCE_TICKET = "ws-ticket"  # sha256(ticket) -> the principal the ticket stands for
PRESENCE_OIDC_STATE = "oidc-state"  # sha256(state + browser binding) -> an OIDC sign-in under way

ALL_JOBS_CHANNEL = "jobs:*"
PRINCIPALS_CHANNEL = "principals"


def job_channel(job_id: str) -> str:
    return f"job:{job_id}"


def owner_channel(owner: str) -> str:
    return f"jobs:{owner}"


def replica_channel(replica_id: str) -> str:
    return f"replica:{replica_id}"


# Counters (values with a TTL) of sign-in: `subject` is a hash of a login name or client address.


def login_failures_counter(kind: str, subject: str) -> str:
    """Failed sign-ins of one account or address (`kind`) in the current window."""
    return f"login-failures:{kind}:{subject}"


def login_failed_at_counter(kind: str, subject: str, failure: int) -> str:
    """When (ms since the epoch) the `failure`-th failure in the window happened; it lives as
    long as the back-off after it."""
    return f"login-failed-at:{kind}:{subject}:{failure}"


def denied_token_counter(jti: str) -> str:
    """A logged-out access token's id, until the token expires."""
    return f"denied-token:{jti}"


def rate_bucket(rate_class: str, kind: str, subject: str) -> str:
    """A rate-limit bucket: `rate_class` (security/rate_limits.py) counted per `kind` ("user",
    "agent", "address", "account", …) of `subject` (an id, or a hash of an address or login)."""
    return f"{rate_class}:{kind}:{subject}"


def client_sockets_slots(user_id: str) -> str:
    """The client sockets a user holds open, across replicas (one slot per socket)."""
    return f"client-sockets:{user_id}"


# ---- the Redis key layout (RedisBroker), all under one prefix ---------------------------------

DEFAULT_REDIS_PREFIX = "ym:"


class RedisKeys:
    """queue (sorted set) with queue-owners (job -> owner), queue-counts (owner -> entries),
    queue-last:<group> (band -> the group's last tag) and queue-band-max (band -> highest tag);
    lock:<name>, epoch:<name>, presence:<kind>:<member>, presence-index:<kind>, counter:<name>,
    rate:<bucket> (a GCRA TAT), slots:<name> (sorted set, member -> expiry), and channels
    ch:<channel>. Epoch keys have no TTL: fencing needs them to survive."""

    def __init__(self, prefix: str = DEFAULT_REDIS_PREFIX) -> None:
        self.prefix = prefix
        self.queue = f"{prefix}queue"
        self.queue_owners = f"{prefix}queue-owners"
        self.queue_counts = f"{prefix}queue-counts"
        self.queue_band_max = f"{prefix}queue-band-max"

    def queue_last(self, group: str) -> str:
        return f"{self.prefix}queue-last:{group}"

    def rate(self, bucket: str) -> str:
        return f"{self.prefix}rate:{bucket}"

    def slots(self, name: str) -> str:
        return f"{self.prefix}slots:{name}"

    def lock(self, name: str) -> str:
        return f"{self.prefix}lock:{name}"

    def epoch(self, name: str) -> str:
        return f"{self.prefix}epoch:{name}"

    def presence(self, kind: str, member: str = "") -> str:
        return f"{self.prefix}presence:{kind}:{member}"

    def presence_index(self, kind: str) -> str:
        return f"{self.prefix}presence-index:{kind}"

    def counter(self, name: str) -> str:
        return f"{self.prefix}counter:{name}"

    def channel(self, channel: str) -> str:
        return f"{self.prefix}ch:{channel}"
