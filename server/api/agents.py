"""/api/v1/agents: list, register (token shown once), revoke."""

from __future__ import annotations

import time
from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from yardmaster.protocol import messages as m
from yardmaster.protocol.jobs import Label, validation_field
from yardmaster.server.api.auth import read_body, require_admin, require_principal, runtime
from yardmaster.server.api.errors import ApiError
from yardmaster.server.api.views import agent_view
from yardmaster.server.backends.records import AgentRecord
from yardmaster.server.core.ids import new_id
from yardmaster.server.security import tokens


class AgentCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    labels: list[Label] = []
    capacity: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 2


async def list_agents(request: Request) -> Response:
    await require_principal(request)
    rt = runtime(request)
    connected = await rt.agents.connected()
    agents = await rt.store.list_agents()
    return JSONResponse({"agents": [agent_view(a, a.id in connected) for a in agents]})


async def create_agent(request: Request) -> Response:
    await require_admin(request)
    rt = runtime(request)
    body = await read_body(request, rt.settings.max_request_body_bytes)
    try:
        spec = msgspec.json.decode(body, type=AgentCreate)
    except msgspec.ValidationError as exc:
        raise ApiError(422, "invalid-agent", str(exc), field=validation_field(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(422, "invalid-agent", str(exc)) from None
    token = tokens.new_token("agent")
    agent = AgentRecord(
        id=new_id("agt"),
        name=spec.name,
        token_hash=tokens.token_hash(token),
        labels=sorted(set(spec.labels)),
        capacity=spec.capacity,
        created_at=time.time(),
    )
    await rt.store.put_agent(agent)
    return JSONResponse(
        {"id": agent.id, "name": agent.name, "labels": agent.labels, "capacity": agent.capacity, "token": token},
        status_code=201,
    )


async def revoke_agent(request: Request) -> Response:
    await require_admin(request)
    rt = runtime(request)
    agent = await rt.store.revoke_agent(request.path_params["agent_id"], time.time())
    if agent is None:
        raise ApiError(404, "not-found", "no such agent")
    await rt.agents.revoke(agent.id)  # closes its live socket (4001) wherever it is
    return JSONResponse(agent_view(agent, False))


async def drain_agent(request: Request) -> Response:
    """Ask the agent to finish its running jobs, take no new ones, and disconnect."""
    await require_admin(request)
    rt = runtime(request)
    agent = await rt.store.update_agent(request.path_params["agent_id"], {"draining_since": time.time()})
    if agent is None:
        raise ApiError(404, "not-found", "no such agent")
    connected = await rt.agents.send_to_agent(agent.id, m.Drain(reason="drain requested by an admin"))
    return JSONResponse(agent_view(agent, connected), status_code=202)


routes = [
    Route("/api/v1/agents", list_agents, methods=["GET"]),
    Route("/api/v1/agents", create_agent, methods=["POST"]),
    Route("/api/v1/agents/{agent_id}", revoke_agent, methods=["DELETE"]),
    Route("/api/v1/agents/{agent_id}/drain", drain_agent, methods=["POST"]),
]
