"""/api/v1/agents: list, register (token shown once), update, drain, revoke. Translation only:
the decisions are core.agent_registry's."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from yardmaster.protocol.jobs import Label
from yardmaster.server.api.auth import client_address, read_struct, requires, runtime
from yardmaster.server.api.errors import ApiError
from yardmaster.server.api.views import agent_view
from yardmaster.server.core.agent_registry import MAX_CAPACITY, MAX_LABELS, AgentNotFound
from yardmaster.server.security.principals import Principal

Labels = Annotated[list[Label], msgspec.Meta(max_length=MAX_LABELS)]
Capacity = Annotated[int, msgspec.Meta(ge=0, le=MAX_CAPACITY)]


class AgentCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")]
    labels: Labels = []
    capacity: Capacity = 2


class AgentUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """PATCH body: a field left out is unchanged; `"labels": []` clears the registered labels."""

    labels: Labels | msgspec.UnsetType = msgspec.UNSET
    capacity: Capacity | msgspec.UnsetType = msgspec.UNSET


def _not_found() -> ApiError:
    return ApiError(404, "not-found", "no such agent")


async def _audit(request: Request, principal: Principal, action: str, agent_id: str, details: dict[str, Any]) -> None:
    await runtime(request).audit.record(
        action, actor=principal.id, target=agent_id, client_address=client_address(request), details=details
    )


@requires("jobs:read")
async def list_agents(request: Request, principal: Principal) -> Response:
    agents = await runtime(request).agent_registry.list_agents()
    return JSONResponse({"agents": [agent_view(agent, connected) for agent, connected in agents]})


@requires("agents:admin")
async def create_agent(request: Request, principal: Principal) -> Response:
    spec = await read_struct(request, AgentCreate, "invalid-agent")
    agent, token = await runtime(request).agent_registry.create(spec.name, spec.labels, spec.capacity)
    details = {"name": agent.name, "labels": agent.labels, "capacity": agent.capacity}
    await _audit(request, principal, "agent.created", agent.id, details)
    return JSONResponse(
        {"id": agent.id, "name": agent.name, "labels": agent.labels, "capacity": agent.capacity, "token": token},
        status_code=201,
    )


@requires("agents:admin")
async def update_agent(request: Request, principal: Principal) -> Response:
    """Change an agent's registered labels and capacity. A connected agent whose grant changes is
    made to reconnect (close 1001), so that its welcome carries the new grant."""
    change = await read_struct(request, AgentUpdate, "invalid-agent")
    try:
        agent, connected = await runtime(request).agent_registry.update(
            request.path_params["agent_id"],
            labels=None if change.labels is msgspec.UNSET else change.labels,
            capacity=None if change.capacity is msgspec.UNSET else change.capacity,
        )
    except AgentNotFound:
        raise _not_found() from None
    changed = {k: v for k, v in msgspec.structs.asdict(change).items() if v is not msgspec.UNSET}
    await _audit(request, principal, "agent.updated", agent.id, {"name": agent.name, **changed})
    return JSONResponse(agent_view(agent, connected))


@requires("agents:admin")
async def revoke_agent(request: Request, principal: Principal) -> Response:
    try:
        agent = await runtime(request).agent_registry.revoke(request.path_params["agent_id"])
    except AgentNotFound:
        raise _not_found() from None
    await _audit(request, principal, "agent.revoked", agent.id, {"name": agent.name})
    return JSONResponse(agent_view(agent, False))


@requires("agents:admin")
async def drain_agent(request: Request, principal: Principal) -> Response:
    """Ask the agent to finish its running jobs, take no new ones, and disconnect."""
    try:
        agent, connected = await runtime(request).agent_registry.drain(request.path_params["agent_id"])
    except AgentNotFound:
        raise _not_found() from None
    await _audit(request, principal, "agent.drained", agent.id, {"name": agent.name, "connected": connected})
    return JSONResponse(agent_view(agent, connected), status_code=202)


routes = [
    Route("/api/v1/agents", list_agents, methods=["GET"]),
    Route("/api/v1/agents", create_agent, methods=["POST"]),
    Route("/api/v1/agents/{agent_id}", update_agent, methods=["PATCH"]),
    Route("/api/v1/agents/{agent_id}", revoke_agent, methods=["DELETE"]),
    Route("/api/v1/agents/{agent_id}/drain", drain_agent, methods=["POST"]),
]
