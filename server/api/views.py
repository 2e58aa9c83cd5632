"""How records look in API responses."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from yardmaster.server.backends.records import AgentRecord, JobRecord
from yardmaster.server.core.agent_registry import grant_of
from yardmaster.server.security.principals import Principal


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


MASKED = "***"


def job_view(job: JobRecord, viewer: Principal | None = None) -> dict[str, Any]:
    """A job as the API shows it. Env values can be secrets: only `viewer` who submitted the job
    sees them; anyone else, and every listing (viewer None), sees the names with "***"."""
    spec = msgspec.to_builtins(job.spec)
    if viewer is None or viewer.id != job.owner:
        spec["env"] = dict.fromkeys(job.spec.env, MASKED)
    return {
        "id": job.id,
        "owner": job.owner,
        "state": job.state,
        "attempt": job.attempt,
        "runs": job.runs,
        "max_attempts": job.spec.max_attempts,
        "priority": job.priority,
        "agent_id": job.agent_id,
        "exit_code": job.exit_code,
        "error": job.error,
        "cancel_reason": job.cancel_reason,
        "spec": spec,
        "created_at": rfc3339(job.created_at),
        "updated_at": rfc3339(job.updated_at),
        "assigned_at": rfc3339(job.assigned_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
    }


def agent_view(agent: AgentRecord, connected: bool) -> dict[str, Any]:
    """`labels`/`capacity` are the effective ones (what placement uses); `registered_*` are the
    admin's, `declared_*` what the agent's last hello asked for (null capacity: never connected)."""
    grant = grant_of(agent)
    return {
        "id": agent.id,
        "name": agent.name,
        "labels": grant.labels,
        "capacity": grant.capacity,
        "registered_labels": agent.labels,
        "registered_capacity": agent.capacity,
        "declared_labels": agent.declared_labels,
        "declared_capacity": agent.declared_capacity,
        "connected": connected,
        "version": agent.version,
        "executor": agent.executor,
        "created_at": rfc3339(agent.created_at),
        "last_seen_at": rfc3339(agent.last_seen_at),
        "revoked_at": rfc3339(agent.revoked_at),
        "draining_since": rfc3339(agent.draining_since),
    }
