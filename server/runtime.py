"""One replica's components, wired together; started and stopped by the app's lifespan."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from yardmaster.server.backends.base import BackendUnavailable, Broker, Store
from yardmaster.server.backends.keys import PRESENCE_REPLICA
from yardmaster.server.core.admission import AdmissionPolicy
from yardmaster.server.core.agent_registry import AgentRegistry
from yardmaster.server.core.agents import AgentHub
from yardmaster.server.core.presence import ReplicaPresence, encode_presence
from yardmaster.server.core.client_sockets import ClientSockets
from yardmaster.server.core.events import EventPublisher, TopicHub
from yardmaster.server.core.ids import new_id
from yardmaster.server.core.jobs import JobService, JobTimings, QueuePolicy
from yardmaster.server.core.scheduler import Scheduler, SchedulerPolicy, SchedulerTimings
from yardmaster.server.observability.metrics import Metrics
from yardmaster.server.security.bootstrap import ensure_admin_key
from yardmaster.server.security.rate_limits import RateLimiter
from yardmaster.server.security.tickets import TicketService
from yardmaster.server.security.principals import Principal, PrincipalCache, still_valid
from yardmaster.server.core.keys import KeyService
from yardmaster.server.core.audit import AuditLog
from yardmaster.server.core.users import UserService
from yardmaster.server.security.sessions import SessionService
from yardmaster.server.security.oidc import OidcService
from yardmaster.server.settings import Settings
from yardmaster.protocol.close_codes import CloseCode

log = logging.getLogger("yardmaster.runtime")


class Runtime:
    def __init__(self, settings: Settings, broker: Broker, store: Store) -> None:
        s = settings
        self.settings = s
        self.broker = broker
        self.store = store
        self.replica_id = s.replica_id or new_id("rep")
        self.metrics = Metrics()
        self.limiter = RateLimiter(s, broker, refused=lambda rate_class: self.metrics.rate_limited.labels(rate_class).inc())
        self.events = EventPublisher(broker)
        self.topics = TopicHub(broker, self.metrics.client_messages_out)
        self.tickets = TicketService(broker, self.credential_still_valid, s.ws_ticket_ttl_s)
        self.principal_cache = PrincipalCache(s.api_key_cache_s)
        self.client_sockets = ClientSockets(
            broker, self.credential_still_valid, on_revocation=lambda r: self.principal_cache.forget(r.principal_id, r.key_id)
        )
        self.keys = KeyService(store, self.client_sockets)
        self.audit = AuditLog(store)
        self.users = UserService(store, self.keys, self.client_sockets, self.audit)
        self.sessions = SessionService(s, store, broker, self.audit, self.principal_cache, self.client_sockets)
        self.oidc = OidcService(s, broker, store, self.users, self.audit) if s.oidc else None
        self.agents = AgentHub(broker, self.metrics, self.replica_id, s.lease_s)
        self.agent_registry = AgentRegistry(store, self.agents, agents_changed=self._agents_changed)
        self.jobs = JobService(
            store,
            broker,
            self.events,
            self.agents,
            self.metrics,
            JobTimings(
                lease_s=s.lease_s,
                cancel_grace_s=s.cancel_grace_s,
                log_cap_bytes=s.log_cap_bytes,
                assign_ack_s=s.assign_ack_s,
            ),
            wake_scheduler=self.wake_scheduler,
            admission=AdmissionPolicy.from_settings(s),
            queue=QueuePolicy(queued_jobs_quota=s.quota_queued_jobs, fair_share=s.fair_share),
        )
        self.scheduler = Scheduler(
            broker,
            store,
            self.agents,
            self.jobs,
            self.metrics,
            SchedulerTimings(
                lock_ttl_s=s.leader_lock_ttl_s,
                renew_s=s.leader_renew_s,
                tick_s=s.schedule_interval_s,
                reaper_s=s.reaper_interval_s,
                timeout_slack_s=s.timeout_slack_s,
            ),
            owner=self.replica_id,
            policy=SchedulerPolicy(running_jobs_quota=s.quota_running_jobs),
        )
        self.admin_key_created: str | None = None
        self._presence_task: asyncio.Task[None] | None = None

    async def credential_still_valid(self, principal: Principal) -> bool:
        """Whether the credential a ticket or an open socket was made from still works: the
        Store's view (`still_valid`) and, for an access token, the Broker's logout denylist."""
        if principal.token_id is not None and await self.sessions.is_denied(principal.token_id):
            return False
        return await still_valid(self.store, principal)

    def wake_scheduler(self) -> None:
        self.scheduler.wake()

    def _agents_changed(self) -> None:
        self.scheduler.agents_changed()

    async def start(self) -> None:
        await self.store.start()
        await self.broker.start()
        await self.client_sockets.start()
        self.admin_key_created = await ensure_admin_key(self.store, self.keys, self.settings)
        await self.agents.start()
        self.scheduler.start()
        self._presence_task = asyncio.create_task(self._announce_replica(), name="replica-presence")
        log.info("replica started", extra={"replica_id": self.replica_id})

    async def stop(self) -> None:
        """Graceful shutdown: release the lock, send agents elsewhere (1012), close state."""
        if self._presence_task is not None:
            self._presence_task.cancel()
        await self.scheduler.stop()
        await self.agents.close(CloseCode.RESTARTING, "server restarting")
        await self.topics.close()
        await self.jobs.close()
        await self.events.close()
        await self.client_sockets.close()
        await self.limiter.close()
        try:
            await self.broker.delete_presence(PRESENCE_REPLICA, self.replica_id)
        except BackendUnavailable:
            pass
        await self.broker.close()
        await self.store.close()

    async def _announce_replica(self) -> None:
        info = encode_presence(ReplicaPresence(host=socket.gethostname(), pid=os.getpid()))
        ttl_ms = int(self.settings.lease_s * 1000)
        while True:
            try:
                await self.broker.set_presence(PRESENCE_REPLICA, self.replica_id, info, ttl_ms)
            except BackendUnavailable:
                pass
            await asyncio.sleep(self.settings.heartbeat_interval_s / 2)
