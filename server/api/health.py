"""/healthz, /readyz, /metrics and /api/v1/ws-tickets."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from yardmaster.protocol.jobs import JOB_STATES
from yardmaster.server.api.auth import public, requires, runtime
from yardmaster.server.backends.base import BackendUnavailable
from yardmaster.server.security.principals import Principal
from yardmaster.server.security.scopes import AUTHENTICATED

log = logging.getLogger("yardmaster.health")

PROBE_TIMEOUT_S = 2.0


@public(rate=None)  # probes are never refused
async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


@public(rate=None)
async def readyz(request: Request) -> Response:
    rt = runtime(request)
    failing: dict[str, str] = {}
    for name, probe in (("broker", rt.broker.ping), ("store", rt.store.ping)):
        try:
            await asyncio.wait_for(probe(), timeout=PROBE_TIMEOUT_S)
        except TimeoutError:
            failing[name] = "timed out"
        except (BackendUnavailable, OSError) as exc:
            # /readyz is open to anyone: the cause (paths, addresses, driver text) goes to the log only.
            log.warning("readiness probe: %s unavailable: %s", name, exc)
            failing[name] = "unavailable"
    kinds = {"broker": "redis" if rt.settings.redis_url else "memory", "store": "mongodb" if rt.settings.mongodb_url else "sqlite"}
    if failing:
        return JSONResponse(
            {"status": "unavailable", "failing": {f"{k} ({kinds[k]})": v for k, v in failing.items()}},
            status_code=503,
        )
    return JSONResponse({"status": "ready", "leader": rt.scheduler.is_leader})


@public(rate=None)
async def metrics(request: Request) -> Response:
    rt = runtime(request)
    try:
        counts = await rt.store.count_jobs_by_state()
        for state in JOB_STATES:
            rt.metrics.jobs.labels(state).set(counts.get(state, 0))
        rt.metrics.queue_depth.set(await rt.broker.queue_depth())
    except BackendUnavailable:
        pass  # scrape what we have; /readyz says what is down
    return Response(rt.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@requires(AUTHENTICATED)
async def ws_ticket(request: Request, principal: Principal) -> Response:
    rt = runtime(request)
    ticket = await rt.tickets.issue(principal)
    return JSONResponse({"ticket": ticket, "expires_in": rt.tickets.ttl_s}, status_code=201)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/api/v1/ws-tickets", ws_ticket, methods=["POST"]),
]
