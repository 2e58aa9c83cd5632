"""The two state interfaces the core talks to. Every implementation passes the same contract
suite (tests/contract/).

Broker: fast, shared, mostly ephemeral coordination (queue, leader lock, presence, pub/sub). Store: durable records. Ownership-deciding changes are compare-and-set
in the Store; the Broker only speeds things up, it never decides correctness alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from yardmaster.server.backends.records import (
    AgentRecord,
    ApiKeyRecord,
    AppendResult,
    AuditRecord,
    JobRecord,
    LogEntry,
    RefreshTokenRecord,
    UserRecord,
)

@dataclass(frozen=True, slots=True)
class JobUpdate:
    """One compare-and-set of `Store.update_jobs`: the arguments of `Store.update_job`."""

    job_id: str
    expect_states: Collection[str]
    changes: Mapping[str, Any]
    expect_attempt: int | None = None
    expect_agent: str | None = None
    increments: Mapping[str, int] | None = None


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """A job in the Broker's queue: `owner` is whose quota it counts against, `group` whose
    turn it takes in the round-robin of its band (the owner, or one group for all under
    YM_FAIR_SHARE=false)."""

    job_id: str
    owner: str
    priority: int = 0
    group: str = ""

    @property
    def share(self) -> str:
        return self.group or self.owner


@dataclass(frozen=True, slots=True)
class RateCheck:
    """One request against rate-limit buckets: `limit` requests per `period_ms` (GCRA: a burst
    of `limit`, then one every period/limit), on every bucket in `buckets`."""

    buckets: tuple[str, ...]
    limit: int
    period_ms: int
    cost: int = 1

    def __post_init__(self) -> None:
        if not (1 <= self.cost <= self.limit and self.period_ms > 0 and self.buckets):
            raise ValueError("a rate check needs buckets, period_ms > 0 and 1 <= cost <= limit")


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    remaining: int  # requests the most used bucket still allows right now
    retry_after_ms: int  # 0 when allowed; otherwise when this request would be
    reset_ms: int  # until the most used bucket is full again


BAND_SIZE = 10**12  # tags per priority band


def priority_band(priority: int) -> int:
    """0 for the highest priority (1000) to 2000 for the lowest (-1000)."""
    return 1000 - max(-1000, min(1000, priority))


def queue_score(priority: int, tag: int) -> float:
    """Sorted-set score: higher priority first, then the fair-share tag. Exact in a double
    (2001 bands of 1e12 tags < 2**53)."""
    return float(priority_band(priority) * BAND_SIZE + tag)


class BackendUnavailable(Exception):
    """The Broker or Store cannot be reached right now. Message names the component."""


class Conflict(ValueError):
    """A unique field of a record is taken (a username, an email, an OIDC identity)."""

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} is already taken")
        self.field = field


class Subscription(Protocol):
    """Messages published on one channel after the subscription was made, in publish order."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class Broker(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise BackendUnavailable if the broker cannot be reached."""

    # -- job queue: one sorted set, fair across owners inside each priority band ----------------
    # Each entry's score is (band, tag): bands by priority, and inside a band a tag that makes
    # the set round-robin across fair-share groups (see `queue_score`). Ties go by job id, which
    # sorts by creation time. Every entry counts against its owner's queued-jobs quota.
    async def enqueue_many(self, entries: Sequence[QueueEntry], *, front: bool = False) -> None:
        """Add each entry not already queued (a queued one keeps its place), with no quota check,
        in one round trip. `front`: at the head of its band's current round (a job coming back
        after a lost lease), instead of behind its group's other entries."""

    async def admit_many(self, batches: Sequence[Sequence[QueueEntry]], quota: int) -> list[bool]:
        """Each batch (one submit) is added whole, or not at all when that would give one of its
        owners more than `quota` queued entries (0: no quota); in order, atomically across
        replicas, in one round trip. Entries already queued add nothing and count as added."""

    async def queued_count(self, owner: str) -> int:
        """How many entries of `owner` are queued."""

    async def peek(self, limit: int) -> list[str]:
        """Up to `limit` job ids in queue order, without removing them."""

    async def remove(self, job_id: str) -> bool:
        """Remove the job atomically; True only for the one caller that removed it."""

    async def remove_many(self, job_ids: Collection[str]) -> None:
        """`remove` each of them, in one round trip."""

    async def is_queued(self, job_id: str) -> bool: ...

    async def queue_depth(self) -> int: ...

    # -- leader lock with fencing epoch ----------------------------------------------------------
    async def acquire_lock(self, name: str, owner: str, ttl_ms: int) -> int | None:
        """SET NX PX; on success take and return a new fencing epoch (INCR), else None."""

    async def renew_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        """Extend the TTL only if `owner` still holds the lock."""

    async def release_lock(self, name: str, owner: str) -> bool:
        """Delete the lock only if `owner` holds it."""

    async def lock_holder(self, name: str) -> tuple[str | None, int]:
        """(current holder or None, latest epoch taken)."""

    async def raise_epoch(self, name: str, floor: int) -> int:
        """Make the epoch counter at least `floor` (it never goes down); return its value. For a
        Broker that lost its data: the Store's fence remembers epochs the Broker forgot."""

    # -- presence: key/value entries with TTLs, grouped by kind ---------------------------------
    async def set_presence(self, kind: str, member: str, value: str, ttl_ms: int) -> None: ...

    async def get_presence(self, kind: str, member: str) -> str | None: ...

    async def list_presence(self, kind: str) -> dict[str, str]: ...

    async def delete_presence(self, kind: str, member: str, if_value: str | None = None) -> bool:
        """Delete the entry; with `if_value`, only if it still holds that value."""

    # -- counters: integers with a TTL (throttling, rate limits) --------------------------------
    async def incr_counter(self, name: str, ttl_ms: int, by: int = 1) -> int:
        """Add `by` to the counter and return its value. A missing (or expired) counter starts
        at 0 and lives `ttl_ms` from then; adding does not extend its life."""

    async def get_counter(self, name: str) -> int:
        """The counter's value; 0 when missing or expired."""

    async def delete_counter(self, name: str) -> None: ...

    # -- rate limits (GCRA, see security/gcra.py) and slots (counted leases) --------------------
    async def rate_limit(self, checks: Sequence[RateCheck]) -> list[RateDecision]:
        """Each check in order, atomically, in one round trip: allowed only when every one of its
        buckets allows it, and then charged to all of them (a refused check charges none). Time is
        the Broker's own clock, so every replica sees the same buckets."""

    async def acquire_slot(self, name: str, member: str, limit: int, ttl_ms: int) -> bool:
        """Hold one of `limit` slots of `name` as `member` for `ttl_ms` (again: renewed); False
        when all are held. Slots not renewed in time free themselves (a replica that died)."""

    async def renew_slots(self, slots: Collection[tuple[str, str]], ttl_ms: int) -> None:
        """Extend each held (name, member) slot by `ttl_ms` from now; one round trip."""

    async def release_slot(self, name: str, member: str) -> None: ...

    async def count_slots(self, name: str) -> int:
        """How many slots of `name` are held now."""

    # -- pub/sub ----------------------------------------------------------------------------------
    async def publish(self, channel: str, data: bytes) -> None: ...

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """`publish` each (channel, data), in this order, in one round trip."""

    async def subscribe(self, channel: str) -> Subscription:
        """Subscribe; messages published after this call returns are delivered."""


class Store(Protocol):
    async def start(self) -> None:
        """Connect, create tables/indexes, migrate."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise BackendUnavailable if the store cannot be reached."""

    # -- API keys ------------------------------------------------------------------------------------
    async def put_api_key(self, rec: ApiKeyRecord) -> None: ...

    async def get_api_key_by_hash(self, token_hash: str) -> ApiKeyRecord | None: ...

    async def list_api_keys(self, owner: str | None = None) -> list[ApiKeyRecord]: ...

    async def revoke_api_key(self, key_id: str, at: float) -> ApiKeyRecord | None: ...

    async def touch_api_key(self, key_id: str, at: float) -> None: ...

    # -- users -------------------------------------------------------------------------------------------
    async def create_user(self, rec: UserRecord) -> None:
        """Raises Conflict naming the field ("username", "email", "oidc_subject") already taken;
        username and email compare casefolded."""

    async def get_user(self, user_id: str) -> UserRecord | None: ...

    async def find_user(self, login: str) -> UserRecord | None:
        """The user whose username or email is `login`, compared casefolded."""

    async def get_user_by_identity(self, issuer: str, subject: str) -> UserRecord | None: ...

    async def list_users(self, *, limit: int = 100, after: str | None = None) -> list[UserRecord]:
        """By id, ascending; `after` is the last id of the previous page."""

    async def update_user(self, user_id: str, changes: Mapping[str, Any]) -> UserRecord | None:
        """Apply validated changes; None if unknown; Conflict as in create_user."""

    async def delete_user(self, user_id: str) -> bool: ...

    # -- refresh tokens ------------------------------------------------------------------------------
    async def put_refresh_token(self, rec: RefreshTokenRecord) -> None: ...

    async def spend_refresh_token(self, token_hash: str, at: float) -> RefreshTokenRecord | None:
        """Atomically mark the token used at `at` if it is neither used nor revoked. Returns the
        record as it was before this call (so a caller sees an earlier use or a revocation), or
        None for an unknown token. Exactly one of two concurrent callers sees used_at None."""

    async def revoke_refresh_tokens(self, at: float, *, family_id: str | None = None, user_id: str | None = None) -> int:
        """Revoke every unrevoked token of a family or of a user (one of the two); how many."""

    # -- audit trail (append-only) -------------------------------------------------------------------
    async def append_audit(self, rec: AuditRecord) -> None: ...

    async def list_audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        before: str | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Newest first; `before` is the last id of the previous page; `action` matches exactly
        or, ending in ".", as a prefix ("key." matches "key.created")."""

    # -- agents -----------------------------------------------------------------------------------------
    async def put_agent(self, rec: AgentRecord) -> None: ...

    async def get_agent(self, agent_id: str) -> AgentRecord | None: ...

    async def get_agent_by_token_hash(self, token_hash: str) -> AgentRecord | None: ...

    async def list_agents(self) -> list[AgentRecord]: ...

    async def update_agent(self, agent_id: str, changes: Mapping[str, Any]) -> AgentRecord | None: ...

    async def revoke_agent(self, agent_id: str, at: float) -> AgentRecord | None:
        """Set revoked_at (once); None if unknown."""

    # -- jobs ---------------------------------------------------------------------------------------------
    async def create_job(self, rec: JobRecord) -> None: ...

    async def create_jobs(self, recs: Collection[JobRecord]) -> None:
        """Create all of them in one transaction (a batch submit): all or none."""

    async def get_job(self, job_id: str) -> JobRecord | None: ...

    async def get_jobs(self, job_ids: Collection[str]) -> dict[str, JobRecord]:
        """The jobs among `job_ids` that exist, by id, in one round trip."""

    async def list_jobs(
        self,
        *,
        owner: str | None = None,
        states: Collection[str] | None = None,
        agent_id: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> list[JobRecord]:
        """Newest first (ids sort by creation time); `before` is the last id of the previous page."""

    async def update_job(
        self,
        job_id: str,
        *,
        expect_states: Collection[str],
        expect_attempt: int | None = None,
        expect_agent: str | None = None,
        fence_epoch: int | None = None,
        changes: Mapping[str, Any],
        increments: Mapping[str, int] | None = None,
    ) -> JobRecord | None:
        """Compare-and-set: apply `changes` (and add `increments` to integer fields) only if the
        job is in one of `expect_states` (and at `expect_attempt` and on `expect_agent`, when
        given), so a caller need not read the job first. With `fence_epoch`, the change also fails when a higher
        epoch has been recorded by `advance_fence` or an earlier fenced change, and records this
        epoch otherwise. Returns the updated record, or None when nothing changed."""

    async def update_jobs(self, updates: Sequence[JobUpdate], *, fence_epoch: int | None = None) -> list[JobRecord | None]:
        """Each update as `update_job` would make it, in order (a later one sees what the earlier
        ones changed), in one round trip; the updated record or None for each. Each succeeds or
        fails alone, except that with `fence_epoch` all of them fail when a higher epoch exists."""

    async def advance_fence(self, epoch: int) -> int:
        """Record that leader `epoch` exists; returns the highest epoch recorded."""

    async def jobs_with_expired_leases(self, now: float, limit: int = 100) -> list[JobRecord]:
        """Jobs in a leased state whose lease_expires_at is before `now`."""

    async def jobs_past_deadline(self, now: float, limit: int = 100) -> list[JobRecord]:
        """Jobs in a leased state whose deadline is before `now`."""

    async def count_jobs_by_state(self) -> dict[str, int]:
        """How many jobs are in each state (states with none may be absent)."""

    async def active_job_counts(self) -> dict[str, int]:
        """Per agent id, how many jobs are in a leased state on it (slots in use)."""

    async def active_jobs_by_owner(self) -> dict[str, int]:
        """Per owner, how many of their jobs are in a leased state (running-jobs quota)."""

    async def count_jobs(self, *, owner: str, states: Collection[str]) -> int:
        """How many of `owner`'s jobs are in one of `states`."""

    async def renew_leases(self, agent_id: str, jobs: Collection[tuple[str, int]], until: float) -> list[str]:
        """Extend the lease of each (job, attempt) leased to `agent_id`; return the renewed ids."""

    # -- logs ---------------------------------------------------------------------------------------------
    async def append_log(
        self, job_id: str, attempt: int, seq: int, stream: str, data: bytes, ts: float, cap_bytes: int = 0
    ) -> AppendResult:
        """Store the chunk only if `seq` is the next contiguous seq of (job, attempt): assigns the
        next per-job offset atomically. Duplicates and gaps store nothing; either way the result
        carries the highest contiguous seq stored. With `cap_bytes`, the job's stored output is
        kept to that size: head and tail, the middle dropped (see backends/logcap.py)."""

    async def log_dropped_bytes(self, job_id: str) -> int:
        """How many bytes of the job's output the log cap dropped (0 if none)."""

    async def read_logs(self, job_id: str, from_offset: int = 0, limit: int = 1000) -> list[LogEntry]: ...

    async def acked_seq(self, job_id: str, attempt: int) -> int:
        """Highest contiguous seq stored for (job, attempt); -1 when none."""

    async def next_log_offset(self, job_id: str) -> int: ...
