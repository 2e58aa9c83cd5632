"""How records look in API responses."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from yardmaster.server.backends.records import AgentRecord, JobRecord


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def job_view(job: JobRecord) -> dict[str, Any]:
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
        "spec": msgspec.to_builtins(job.spec),
        "created_at": rfc3339(job.created_at),
        "updated_at": rfc3339(job.updated_at),
        "assigned_at": rfc3339(job.assigned_at),
        "started_at": rfc3339(job.started_at),
        "finished_at": rfc3339(job.finished_at),
    }


def agent_view(agent: AgentRecord, connected: bool) -> dict[str, Any]:
    return {
        "id": agent.id,
        "name": agent.name,
        "labels": agent.labels,
        "capacity": agent.capacity,
        "connected": connected,
        "version": agent.version,
        "executor": agent.executor,
        "created_at": rfc3339(agent.created_at),
        "last_seen_at": rfc3339(agent.last_seen_at),
        "revoked_at": rfc3339(agent.revoked_at),
        "draining_since": rfc3339(agent.draining_since),
    }
