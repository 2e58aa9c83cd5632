"""The audit trail: who did what to whom, from where. Append-only; `details` never holds a
secret (callers pass names and ids, never tokens, passwords or hashes)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from yardmaster.server.backends.base import BackendUnavailable, Store
from yardmaster.server.backends.records import AuditRecord
from yardmaster.server.core.ids import new_id

log = logging.getLogger("yardmaster.audit")


class AuditLog:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def record(
        self,
        action: str,
        *,
        actor: str | None,
        target: str | None = None,
        client_address: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        rec = AuditRecord(
            id=new_id("aud"),
            at=time.time(),
            action=action,
            actor=actor,
            target=target,
            client_address=client_address,
            details=dict(details or {}),
        )
        try:
            await self._store.append_audit(rec)
        except BackendUnavailable:
            # The action itself happened (or was refused); losing its trail entry is logged loudly.
            log.error("audit entry not stored: store unavailable", extra={"action": action, "actor": actor, "target": target})
            raise
        return rec

    async def list(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        before: str | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        return await self._store.list_audit(actor=actor, action=action, since=since, before=before, limit=limit)
