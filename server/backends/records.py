"""Durable records, the same msgspec Structs in every Store implementation."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from yardmaster.protocol.jobs import JobSpec, JobState
from yardmaster.protocol.messages import Stream

Role = Literal["admin", "user"]


class ApiKeyRecord(msgspec.Struct, kw_only=True):
    id: str
    token_hash: str  # hex SHA-256 of the whole token; the token itself is never stored
    hint: str  # prefix and last 4 characters, for listings ("ym_key_...Ab3x")
    name: str
    owner: str  # id of the user the key acts as
    role: Role  # the owner's role when the key was made; what the key may do is scopes ∩ the owner's role now
    scopes: list[str] | None = None  # None: every scope of the role (keys made before scopes existed)
    created_at: float
    expires_at: float | None = None
    last_used_at: float | None = None
    revoked_at: float | None = None


class UserRecord(msgspec.Struct, kw_only=True):
    """An account. `username` and `email` are unique case-insensitively (the Store compares
    their casefolded forms). `password_hash` is an Argon2id hash, None for a user who signs in
    only through OIDC (or the bootstrap admin before a password is set)."""

    id: str
    username: str
    email: str | None = None
    first_name: str = ""
    last_name: str = ""
    image_url: str | None = None
    phone: str | None = None
    metadata: dict[str, Any] = {}
    role: Role = "user"
    password_hash: str | None = None
    oidc_issuer: str | None = None
    oidc_subject: str | None = None
    created_at: float
    last_login_at: float | None = None
    disabled_at: float | None = None  # None: enabled
    # Access tokens issued (iat) before this are refused: set when a password change signs every
    # session out.
    sessions_valid_after: float | None = None


class RefreshTokenRecord(msgspec.Struct, kw_only=True):
    """One refresh token of a sign-in session. Every refresh spends the token and issues the next
    one of the same `family_id`; presenting a spent token again revokes the whole family."""

    id: str
    family_id: str
    user_id: str
    token_hash: str  # hex SHA-256; the token itself is never stored
    created_at: float
    expires_at: float
    used_at: float | None = None
    revoked_at: float | None = None


class AuditRecord(msgspec.Struct, kw_only=True):
    """One entry of the append-only audit trail. `details` never holds a secret."""

    id: str  # sorts by time (core.ids.new_id)
    at: float
    action: str  # e.g. "login.succeeded", "key.created", "user.disabled"
    actor: str | None = None  # user id, None when unknown (a failed sign-in)
    target: str | None = None  # id of the user, key, agent or job acted on
    client_address: str | None = None
    details: dict[str, Any] = {}


class AgentRecord(msgspec.Struct, kw_only=True):
    """`labels` and `capacity` are the registration (POST/PATCH /api/v1/agents), which decides;
    `declared_*` are what the agent's last hello asked for. What placement uses is derived from
    both (core.agent_registry.grant_of): the agent never chooses its own work."""

    id: str
    name: str
    token_hash: str
    labels: list[str] = []
    capacity: int = 1
    declared_labels: list[str] = []  # valid labels of the last hello
    declared_capacity: int | None = None  # None: the agent never said hello
    created_at: float
    revoked_at: float | None = None
    last_seen_at: float | None = None
    version: str | None = None
    executor: str | None = None
    draining_since: float | None = None  # asked to drain: no new jobs until it connects afresh


class JobRecord(msgspec.Struct, kw_only=True):
    id: str
    owner: str
    spec: JobSpec
    state: JobState
    attempt: int = 0  # 0 until the first assignment; each assignment takes the next number
    runs: int = 0  # attempts an agent accepted: what max_attempts counts (rejects do not)
    priority: int = 0
    agent_id: str | None = None
    epoch: int = 0  # leader epoch of the last fenced change
    exit_code: int | None = None
    error: str | None = None
    cancel_reason: str | None = None
    created_at: float
    updated_at: float
    enqueued_at: float  # FIFO position within a priority; kept across re-queues
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    lease_expires_at: float | None = None
    deadline: float | None = None  # unix time by which the running attempt must finish


class LogEntry(msgspec.Struct, kw_only=True):
    job_id: str
    offset: int  # per job, monotonic across attempts, assigned by the Store
    attempt: int
    seq: int  # per (job, attempt), from the agent
    stream: Stream
    data: bytes
    ts: float


class AppendResult(msgspec.Struct, kw_only=True):
    entry: LogEntry | None  # None: not stored (duplicate, gap, or unknown job)
    acked_seq: int  # highest contiguous seq stored for (job, attempt)
