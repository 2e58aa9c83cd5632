"""build_app(settings) -> Starlette. The lifespan starts and stops one replica's Runtime."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import WebSocketRoute
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from yardmaster.server.api import agents, cluster, health, jobs, keys
from yardmaster.server.api import auth_routes
from yardmaster.server.api import audit as audit_routes
from yardmaster.server.api import users as user_routes
from yardmaster.server.api import oidc_routes
from yardmaster.server.api.errors import EXCEPTION_HANDLERS
from yardmaster.server.backends import make_broker
from yardmaster.server.backends.base import Broker, Store
from yardmaster.server.backends.stores import make_store
from yardmaster.server.channels.agent_channel import agent_endpoint
from yardmaster.server.channels.client_channel import client_endpoint
from yardmaster.server.observability.middleware import HostCheckMiddleware, RequestContextMiddleware, trusted_host_policy
from yardmaster.server.runtime import Runtime
from yardmaster.server.settings import Settings

log = logging.getLogger("yardmaster.app")


# Full collections scan every tracked object; with 1,000 client sockets they took ~110 ms, long
# enough to set the log fan-out's p99. What exists once the replica has started (modules,
# classes, the runtime: ~50k objects) lives as long as the process, so the server (not tests,
# whose apps come and go) moves it out of the collector's sight, and runs young collections every
# 10,000 net allocations instead of 700: fewer passes while thousands of sockets connect.
GC_GEN0_THRESHOLD = 10_000


def freeze_startup_objects() -> None:
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def build_app(
    settings: Settings, *, broker: Broker | None = None, store: Store | None = None, tune_gc: bool = False
) -> Starlette:
    runtime = Runtime(
        settings,
        broker if broker is not None else make_broker(settings.redis_url),
        store if store is not None else make_store(settings.mongodb_url, settings.data_dir),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        if tune_gc:
            freeze_startup_objects()
        if runtime.admin_key_created:
            # Printed once, on first start; also in $YM_DATA_DIR/admin-key (0600). Never logged.
            print(
                f"\nYardmaster admin API key (shown once; also saved to {settings.data_dir}/admin-key):\n"
                f"  {runtime.admin_key_created}\n",
                flush=True,
            )
        try:
            yield
        finally:
            await runtime.stop()

    routes = [
        *health.routes,
        *jobs.routes,
        *agents.routes,
        *cluster.routes,
        *keys.routes,
        *auth_routes.routes,
        *audit_routes.routes,
        *user_routes.routes,
        *oidc_routes.routes,
        WebSocketRoute("/ws/agent", agent_endpoint),
        WebSocketRoute("/ws/client", client_endpoint),
    ]
    hosts, any_ip_address = trusted_host_policy(settings)
    # Against DNS rebinding: a page on a foreign name that resolves to us has that name in Host.
    middleware = [
        Middleware(RequestContextMiddleware),
        Middleware(HostCheckMiddleware, allowed_hosts=hosts, any_ip_address=any_ip_address),
    ]
    if settings.trusted_proxies:
        # First, so that everything after it (HSTS by scheme, rate limits and audit by address)
        # sees the client a trusted proxy forwarded: the first untrusted hop of X-Forwarded-For,
        # counted from the right, and X-Forwarded-Proto. From any other peer both are ignored.
        middleware.insert(0, Middleware(ProxyHeadersMiddleware, trusted_hosts=list(settings.trusted_proxies)))
    if settings.allowed_origins:
        # Starlette's CORS middleware does not cover WebSockets: the client channel checks Origin itself.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.allowed_origins),
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "X-Request-ID", "X-CSRF-Token"],
                # Session cookies on cross-origin calls from the listed origins (never with "*").
                allow_credentials="*" not in settings.allowed_origins,
                expose_headers=["X-Request-ID", "X-Next-Offset"],
            )
        )
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)  # type: ignore[arg-type]
    app.state.runtime = runtime
    return app
