"""/api/v1/cluster (admin): live replicas, the scheduler leader and epoch, agents per replica."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from yardmaster.server.api.auth import requires, runtime
from yardmaster.server.backends.keys import PRESENCE_REPLICA, SCHEDULER_LOCK
from yardmaster.server.core.presence import ReplicaPresence, decode_presence
from yardmaster.server.security.principals import Principal


@requires("agents:admin")
async def cluster(request: Request, principal: Principal) -> Response:
    rt = runtime(request)
    replicas = {
        replica: decode_presence(raw, ReplicaPresence)
        for replica, raw in (await rt.broker.list_presence(PRESENCE_REPLICA)).items()
    }
    leader, epoch = await rt.broker.lock_holder(SCHEDULER_LOCK)
    agents = await rt.agents.connected()
    by_replica: dict[str, list[str]] = {replica: [] for replica in replicas}
    for agent_id, replica in sorted(agents.items()):
        by_replica.setdefault(replica, []).append(agent_id)
    return JSONResponse(
        {
            "this_replica": rt.replica_id,
            "leader": leader,
            "epoch": epoch,
            "queue_depth": await rt.broker.queue_depth(),
            "replicas": [
                {
                    "id": replica,
                    "host": info.host if (info := replicas.get(replica)) else None,
                    "pid": info.pid if info else None,
                    "leader": replica == leader,
                    "agents": agent_ids,
                }
                for replica, agent_ids in sorted(by_replica.items())
            ],
        }
    )


routes = [Route("/api/v1/cluster", cluster, methods=["GET"])]
