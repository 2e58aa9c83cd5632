"""/api/v1/audit (users:admin): the audit trail, newest first, filtered and paged by cursor."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from yardmaster.server.api.auth import requires, runtime
from yardmaster.server.api.errors import ApiError
from yardmaster.server.api.jobs import int_param
from yardmaster.server.api.views import rfc3339
from yardmaster.server.backends.records import AuditRecord
from yardmaster.server.security.principals import Principal

MAX_PAGE = 1000
DEFAULT_PAGE = 100
_TEXT_LIMIT = 200  # actor, action and cursor are ids and names, never long
_ACTION = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


def audit_view(rec: AuditRecord) -> dict[str, Any]:
    return {
        "id": rec.id,
        "at": rfc3339(rec.at),
        "action": rec.action,
        "actor": rec.actor,
        "target": rec.target,
        "client_address": rec.client_address,
        "details": rec.details,
    }


def parse_since(raw: str) -> float:
    """Unix seconds, or an RFC 3339 time with a zone ("2025-01-31T12:00:00Z"); ValueError else."""
    try:
        value = float(raw)
    except ValueError:
        when = datetime.fromisoformat(raw.strip())
        if when.tzinfo is None:
            raise ValueError("an RFC 3339 time needs a zone (Z or ±hh:mm)") from None
        return when.astimezone(UTC).timestamp()
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _text_param(request: Request, name: str) -> str | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not raw or len(raw) > _TEXT_LIMIT:
        raise ApiError(422, "invalid-parameter", f"{name} must be 1 to {_TEXT_LIMIT} characters", field=name)
    return raw


@requires("users:admin")
async def list_audit(request: Request, principal: Principal) -> Response:
    action = _text_param(request, "action")
    if action is not None and not _ACTION.match(action):
        raise ApiError(
            422, "invalid-parameter", "action is an action name (key.created) or a prefix ending in '.' (key.)", field="action"
        )
    since_raw = request.query_params.get("since")
    since = None
    if since_raw is not None:
        try:
            since = parse_since(since_raw)
        except ValueError:
            raise ApiError(
                422, "invalid-parameter", "since must be unix seconds or an RFC 3339 time (2025-01-31T12:00:00Z)", field="since"
            ) from None
    limit = int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    entries = await runtime(request).audit.list(
        actor=_text_param(request, "actor"), action=action, since=since, before=_text_param(request, "before"), limit=limit
    )
    return JSONResponse(
        {"entries": [audit_view(e) for e in entries], "next": entries[-1].id if len(entries) == limit else None}
    )


routes = [Route("/api/v1/audit", list_audit, methods=["GET"])]
