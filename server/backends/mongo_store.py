"""MongoStore: the scale-out Store, on PyMongo's native async API.

Documents are the records themselves (documents.py), with `_id` = the record id. Job documents
also carry `log_next_offset`, the per-job log offset counter, which is not a record field.

Fencing without multi-document transactions
-------------------------------------------
A fenced `update_job` is two single-document atomic operations:

1. on `meta/fence`: `$max` the recorded epoch with ours and read it back; if a higher epoch is
   recorded, the change fails (a deposed leader is refused from then on);
2. on the job: compare-and-set with a filter on state/attempt *and* `epoch <= ours`, setting
   `epoch` to ours.

Step 2 guarantees that once a newer leader has changed a job, no older leader can change that
job again. What it cannot guarantee is the window between steps 1 and 2: an old leader that
passed step 1 just before a new leader's `advance_fence` may still complete one change on a job
the new leader has not touched yet. That change is still a valid compare-and-set on the job's
state and attempt, so it cannot double-assign a job (the new leader's own CAS then fails);
it is only "late". Closing the window entirely needs a multi-document transaction (replica set
only), which this store does not require.

"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import msgspec
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, ConnectionFailure, DuplicateKeyError, PyMongoError

from yardmaster.protocol.jobs import LEASED_STATES
from yardmaster.server.backends import logcap
from yardmaster.server.backends.base import BackendUnavailable, Conflict, JobUpdate
from yardmaster.server.backends.documents import (
    apply_changes,
    check_increments,
    change_document,
    from_document,
    job_changes,
    to_document,
    user_keys,
)
from yardmaster.server.backends.records import (
    AgentRecord,
    ApiKeyRecord,
    AppendResult,
    AuditRecord,
    JobRecord,
    LogEntry,
    RefreshTokenRecord,
    UserRecord,
)

P = ParamSpec("P")
R = TypeVar("R")
Doc = dict[str, Any]

_LEASED = sorted(LEASED_STATES)
_AFTER = ReturnDocument.AFTER
_BEFORE = ReturnDocument.BEFORE
_FENCE = "fence"
_IDS_PER_QUERY = 50_000  # ids in one `$in` (a query document must stay under 16 MB)


def _unavailable(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Report an unreachable server as BackendUnavailable (other errors pass through)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except ConnectionFailure as exc:
            raise BackendUnavailable(f"MongoDB store: {exc}") from exc

    return wrapper


def _with_id(rec: Any) -> Doc:
    doc = to_document(rec)
    doc["_id"] = rec.id
    return doc


# Users carry their unique keys as extra fields (from_document ignores them): casefolded
# username and email, and "issuer\nsubject" of the OIDC identity; None where there is none.
_USERNAME_KEY = "username_key"
_EMAIL_KEY = "email_key"
_IDENTITY_KEY = "identity_key"
_KEY_FIELDS = {_USERNAME_KEY: "username", _EMAIL_KEY: "email", _IDENTITY_KEY: "oidc_subject", "_id": "id"}


def _user_key_fields(rec: UserRecord) -> Doc:
    username, email, identity = user_keys(rec)
    return {_USERNAME_KEY: username, _EMAIL_KEY: email, _IDENTITY_KEY: identity}


def _conflicting_field(exc: DuplicateKeyError) -> str:
    """The record field whose unique index refused a write (from the server's key pattern, or
    from the index name in its message on servers that do not send one)."""
    details = exc.details or {}
    pattern = details.get("keyPattern") or {}
    for key in pattern:
        if key in _KEY_FIELDS:
            return _KEY_FIELDS[key]
    message = str(details.get("errmsg", exc))
    for key, field in _KEY_FIELDS.items():
        if f"index: {key}_" in message:
            return field
    return "id"


class MongoStore:
    def __init__(
        self,
        url: str,
        database: str = "yardmaster",
        *,
        server_selection_timeout_ms: int = 10_000,
    ) -> None:
        self.url = url
        self.database = database
        self._timeout_ms = server_selection_timeout_ms
        self._client: AsyncMongoClient[Doc] | None = None
        self._db: AsyncDatabase[Doc] | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    @_unavailable
    async def start(self) -> None:
        self._client = AsyncMongoClient(self.url, serverSelectionTimeoutMS=self._timeout_ms)
        self._db = self._client[self.database]
        await self._c("api_keys").create_index("token_hash", unique=True)
        await self._c("api_keys").create_index([("owner", ASCENDING), ("_id", ASCENDING)])
        await self._c("agents").create_index("token_hash", unique=True)
        jobs = self._c("jobs")
        await jobs.create_index([("owner", ASCENDING), ("_id", DESCENDING)])
        await jobs.create_index([("state", ASCENDING), ("_id", DESCENDING)])
        await jobs.create_index([("agent_id", ASCENDING), ("state", ASCENDING)])
        await jobs.create_index([("state", ASCENDING), ("lease_expires_at", ASCENDING)])
        await jobs.create_index([("state", ASCENDING), ("deadline", ASCENDING)])
        await self._create_user_indexes()
        logs = self._c("logs")
        await logs.create_index([("job_id", ASCENDING), ("offset", ASCENDING)], unique=True)
        await logs.create_index([("job_id", ASCENDING), ("attempt", ASCENDING), ("seq", ASCENDING)], unique=True)
        try:
            await self._c("meta").update_one({"_id": _FENCE}, {"$setOnInsert": {"epoch": 0}}, upsert=True)
        except DuplicateKeyError:
            pass  # another replica created it at the same moment

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._db = None

    async def ping(self) -> None:
        try:
            if self._client is None:
                raise BackendUnavailable("MongoDB store is not started")
            await self._client.admin.command("ping")
        except PyMongoError as exc:
            raise BackendUnavailable(f"MongoDB store: {exc}") from exc

    async def _create_user_indexes(self) -> None:
        users = self._c("users")
        await users.create_index(_USERNAME_KEY, unique=True)
        # Partial: many users have no email or OIDC identity, and a unique index counts nulls.
        for key in (_EMAIL_KEY, _IDENTITY_KEY):
            await users.create_index(key, unique=True, partialFilterExpression={key: {"$type": "string"}})
        tokens = self._c("refresh_tokens")
        await tokens.create_index("token_hash", unique=True)
        await tokens.create_index("family_id")
        await tokens.create_index("user_id")
        audit = self._c("audit")
        await audit.create_index([("actor", ASCENDING), ("_id", DESCENDING)])
        await audit.create_index([("action", ASCENDING), ("_id", DESCENDING)])
        await audit.create_index("at")

    def _c(self, name: str) -> AsyncCollection[Doc]:
        if self._db is None:
            raise BackendUnavailable("MongoDB store is not started")
        return self._db[name]

    # -- API keys ---------------------------------------------------------------------------------
    @_unavailable
    async def put_api_key(self, rec: ApiKeyRecord) -> None:
        try:
            await self._c("api_keys").replace_one({"_id": rec.id}, _with_id(rec), upsert=True)
        except DuplicateKeyError as exc:
            raise ValueError(f"api key token_hash already in use: {exc}") from exc

    @_unavailable
    async def get_api_key_by_hash(self, token_hash: str) -> ApiKeyRecord | None:
        doc = await self._c("api_keys").find_one({"token_hash": token_hash})
        return from_document(doc, ApiKeyRecord) if doc else None

    @_unavailable
    async def list_api_keys(self, owner: str | None = None) -> list[ApiKeyRecord]:
        query: Doc = {} if owner is None else {"owner": owner}
        docs = await self._c("api_keys").find(query).sort("_id", ASCENDING).to_list(None)
        return [from_document(d, ApiKeyRecord) for d in docs]

    @_unavailable
    async def revoke_api_key(self, key_id: str, at: float) -> ApiKeyRecord | None:
        return await self._revoke("api_keys", key_id, at, ApiKeyRecord)

    @_unavailable
    async def touch_api_key(self, key_id: str, at: float) -> None:
        await self._c("api_keys").update_one({"_id": key_id}, {"$max": {"last_used_at": float(at)}})

    async def _revoke(self, coll: str, key: str, at: float, cls: type[R]) -> R | None:
        doc = await self._c(coll).find_one_and_update(
            {"_id": key, "revoked_at": None}, {"$set": {"revoked_at": float(at)}}, return_document=_AFTER
        )
        if doc is None:
            doc = await self._c(coll).find_one({"_id": key})
        return from_document(doc, cls) if doc else None  # type: ignore[type-var]

    # -- users ----------------------------------------------------------------------------------------
    @_unavailable
    async def create_user(self, rec: UserRecord) -> None:
        doc = _with_id(rec)
        doc.update(_user_key_fields(rec))
        try:
            await self._c("users").insert_one(doc)
        except DuplicateKeyError as exc:
            raise Conflict(_conflicting_field(exc)) from None

    @_unavailable
    async def get_user(self, user_id: str) -> UserRecord | None:
        doc = await self._c("users").find_one({"_id": user_id})
        return from_document(doc, UserRecord) if doc else None

    @_unavailable
    async def find_user(self, login: str) -> UserRecord | None:
        key = login.casefold()
        users = self._c("users")
        # Username first, as SqliteStore does, should one user's username be another's email.
        doc = await users.find_one({_USERNAME_KEY: key}) or await users.find_one({_EMAIL_KEY: key})
        return from_document(doc, UserRecord) if doc else None

    @_unavailable
    async def get_user_by_identity(self, issuer: str, subject: str) -> UserRecord | None:
        doc = await self._c("users").find_one({_IDENTITY_KEY: f"{issuer}\n{subject}"})
        return from_document(doc, UserRecord) if doc else None

    @_unavailable
    async def list_users(self, *, limit: int = 100, after: str | None = None) -> list[UserRecord]:
        if limit <= 0:
            return []
        query: Doc = {} if after is None else {"_id": {"$gt": after}}
        docs = await self._c("users").find(query).sort("_id", ASCENDING).limit(limit).to_list(None)
        return [from_document(d, UserRecord) for d in docs]

    @_unavailable
    async def update_user(self, user_id: str, changes: Mapping[str, Any]) -> UserRecord | None:
        if "id" in changes:
            raise ValueError("a user's id cannot change")
        users = self._c("users")
        current = await users.find_one({"_id": user_id})
        if current is None:
            return None
        # Validated against the whole record; only the changed fields (and the unique keys made
        # from them) are $set, so a concurrent change to other fields is not lost.
        changed = apply_changes(from_document(current, UserRecord), changes)
        update = change_document(UserRecord, changes)
        keys = _user_key_fields(changed)
        if "username" in changes:
            update[_USERNAME_KEY] = keys[_USERNAME_KEY]
        if "email" in changes:
            update[_EMAIL_KEY] = keys[_EMAIL_KEY]
        if "oidc_issuer" in changes or "oidc_subject" in changes:
            update[_IDENTITY_KEY] = keys[_IDENTITY_KEY]
        if not update:
            return changed
        try:
            doc = await users.find_one_and_update({"_id": user_id}, {"$set": update}, return_document=_AFTER)
        except DuplicateKeyError as exc:
            raise Conflict(_conflicting_field(exc)) from None
        return from_document(doc, UserRecord) if doc else None

    @_unavailable
    async def delete_user(self, user_id: str) -> bool:
        result = await self._c("users").delete_one({"_id": user_id})
        return result.deleted_count > 0

    # -- refresh tokens -------------------------------------------------------------------------------
    @_unavailable
    async def put_refresh_token(self, rec: RefreshTokenRecord) -> None:
        try:
            await self._c("refresh_tokens").insert_one(_with_id(rec))
        except DuplicateKeyError as exc:
            raise ValueError(f"refresh token {rec.id!r} or its hash already exists") from exc

    @_unavailable
    async def spend_refresh_token(self, token_hash: str, at: float) -> RefreshTokenRecord | None:
        tokens = self._c("refresh_tokens")
        # One atomic document update: of two concurrent callers, one matches and sees the token
        # unused (the document before the update); the other finds it used.
        doc = await tokens.find_one_and_update(
            {"token_hash": token_hash, "used_at": None, "revoked_at": None},
            {"$set": {"used_at": float(at)}},
            return_document=_BEFORE,
        )
        if doc is None:
            doc = await tokens.find_one({"token_hash": token_hash})
        return from_document(doc, RefreshTokenRecord) if doc else None

    @_unavailable
    async def revoke_refresh_tokens(self, at: float, *, family_id: str | None = None, user_id: str | None = None) -> int:
        if (family_id is None) == (user_id is None):
            raise ValueError("revoke the tokens of one family or of one user")
        query: Doc = {"family_id": family_id} if family_id is not None else {"user_id": user_id}
        query["revoked_at"] = None
        result = await self._c("refresh_tokens").update_many(query, {"$set": {"revoked_at": float(at)}})
        return int(result.modified_count)

    # -- audit trail ----------------------------------------------------------------------------------
    @_unavailable
    async def append_audit(self, rec: AuditRecord) -> None:
        await self._c("audit").insert_one(_with_id(rec))

    @_unavailable
    async def list_audit(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        before: str | None = None,
        limit: int = 100,
    ) -> list[AuditRecord]:
        if limit <= 0:
            return []
        query: Doc = {}
        if actor is not None:
            query["actor"] = actor
        if action is not None:
            # A prefix as a range (like SqliteStore), which uses the index and needs no escaping.
            query["action"] = {"$gte": action, "$lt": action + "\uffff"} if action.endswith(".") else action
        if since is not None:
            query["at"] = {"$gte": float(since)}
        if before is not None:
            query["_id"] = {"$lt": before}
        docs = await self._c("audit").find(query).sort("_id", DESCENDING).limit(limit).to_list(None)
        return [from_document(d, AuditRecord) for d in docs]

    # -- agents -----------------------------------------------------------------------------------
    @_unavailable
    async def put_agent(self, rec: AgentRecord) -> None:
        try:
            await self._c("agents").replace_one({"_id": rec.id}, _with_id(rec), upsert=True)
        except DuplicateKeyError as exc:
            raise ValueError(f"agent token_hash already in use: {exc}") from exc

    @_unavailable
    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        doc = await self._c("agents").find_one({"_id": agent_id})
        return from_document(doc, AgentRecord) if doc else None

    @_unavailable
    async def get_agent_by_token_hash(self, token_hash: str) -> AgentRecord | None:
        doc = await self._c("agents").find_one({"token_hash": token_hash})
        return from_document(doc, AgentRecord) if doc else None

    @_unavailable
    async def list_agents(self) -> list[AgentRecord]:
        docs = await self._c("agents").find({}).sort("_id", ASCENDING).to_list(None)
        return [from_document(d, AgentRecord) for d in docs]

    @_unavailable
    async def update_agent(self, agent_id: str, changes: Mapping[str, Any]) -> AgentRecord | None:
        if "id" in changes:
            raise ValueError("an agent's id cannot change")
        update = change_document(AgentRecord, changes)
        agents = self._c("agents")
        if update:
            doc = await agents.find_one_and_update({"_id": agent_id}, {"$set": update}, return_document=_AFTER)
        else:
            doc = await agents.find_one({"_id": agent_id})
        return from_document(doc, AgentRecord) if doc else None

    @_unavailable
    async def revoke_agent(self, agent_id: str, at: float) -> AgentRecord | None:
        return await self._revoke("agents", agent_id, at, AgentRecord)

    # -- jobs -------------------------------------------------------------------------------------
    @_unavailable
    async def create_job(self, rec: JobRecord) -> None:
        try:
            await self._c("jobs").insert_one(_with_id(rec))
        except DuplicateKeyError as exc:
            raise ValueError(f"job {rec.id!r} already exists") from exc

    @_unavailable
    async def create_jobs(self, recs: Collection[JobRecord]) -> None:
        """All or none without a multi-document transaction: an ordered insert stops at the first
        failure, and the jobs it inserted before it are deleted again before the error is raised.
        Nothing else knows those ids yet (the caller has not enqueued them), so only a reader
        listing jobs at that moment could glimpse them. A connection lost in the middle can leave
        a prefix of the batch (reported as BackendUnavailable)."""
        docs = [_with_id(rec) for rec in recs]
        if not docs:
            return
        jobs = self._c("jobs")
        try:
            await jobs.insert_many(docs, ordered=True)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors") or [{"index": 0}]
            inserted = [d["_id"] for d in docs[: int(errors[0]["index"])]]
            if inserted:
                await jobs.delete_many({"_id": {"$in": inserted}})
            if all(e.get("code") == 11000 for e in errors):
                raise ValueError(f"a job of the batch already exists: {errors[0].get('errmsg', '')}") from exc
            raise

    @_unavailable
    async def get_job(self, job_id: str) -> JobRecord | None:
        doc = await self._c("jobs").find_one({"_id": job_id})
        return from_document(doc, JobRecord) if doc else None

    @_unavailable
    async def get_jobs(self, job_ids: Collection[str]) -> dict[str, JobRecord]:
        ids = list(dict.fromkeys(job_ids))
        out: dict[str, JobRecord] = {}
        for start in range(0, len(ids), _IDS_PER_QUERY):
            chunk = ids[start : start + _IDS_PER_QUERY]
            for doc in await self._c("jobs").find({"_id": {"$in": chunk}}).to_list(None):
                rec = from_document(doc, JobRecord)
                out[rec.id] = rec
        return out

    @_unavailable
    async def list_jobs(
        self,
        *,
        owner: str | None = None,
        states: Collection[str] | None = None,
        agent_id: str | None = None,
        limit: int = 100,
        before: str | None = None,
    ) -> list[JobRecord]:
        if limit <= 0:
            return []  # Mongo's limit(0) means "no limit"
        query: Doc = {}
        if owner is not None:
            query["owner"] = owner
        if states is not None:
            query["state"] = {"$in": list(states)}
        if agent_id is not None:
            query["agent_id"] = agent_id
        if before is not None:
            query["_id"] = {"$lt": before}
        docs = await self._c("jobs").find(query).sort("_id", DESCENDING).limit(limit).to_list(None)
        return [from_document(d, JobRecord) for d in docs]

    @_unavailable
    async def update_job(
        self,
        job_id: str,
        *,
        expect_states: Collection[str],
        expect_attempt: int | None = None,
        expect_agent: str | None = None,
        fence_epoch: int | None = None,
        changes: Mapping[str, Any],
        increments: Mapping[str, int] | None = None,
    ) -> JobRecord | None:
        changes = job_changes(changes, fence_epoch)
        update = change_document(JobRecord, changes)
        inc = dict(check_increments(JobRecord, increments))
        query: Doc = {"_id": job_id, "state": {"$in": list(expect_states)}}
        if expect_attempt is not None:
            query["attempt"] = expect_attempt
        if expect_agent is not None:
            query["agent_id"] = expect_agent
        if fence_epoch is not None:
            if await self.advance_fence(fence_epoch) > fence_epoch:
                return None
            query["epoch"] = {"$lte": fence_epoch}
        jobs = self._c("jobs")
        if update or inc:
            operations: Doc = {"$set": update} if update else {}
            if inc:
                operations["$inc"] = inc
            doc = await jobs.find_one_and_update(query, operations, return_document=_AFTER)
        else:
            doc = await jobs.find_one(query)
        return from_document(doc, JobRecord) if doc else None

    async def update_jobs(self, updates: Sequence[JobUpdate], *, fence_epoch: int | None = None) -> list[JobRecord | None]:
        # One compare-and-set after the other (each fenced): no multi-document transaction needed.
        return [
            await self.update_job(
                u.job_id, expect_states=u.expect_states, expect_attempt=u.expect_attempt, expect_agent=u.expect_agent,
                fence_epoch=fence_epoch, changes=u.changes, increments=u.increments,
            )
            for u in updates
        ]

    @_unavailable
    async def advance_fence(self, epoch: int) -> int:
        doc = await self._c("meta").find_one_and_update(
            {"_id": _FENCE}, {"$max": {"epoch": epoch}}, upsert=True, return_document=_AFTER
        )
        assert doc is not None  # upsert with AFTER always returns the document
        return int(doc["epoch"])

    @_unavailable
    async def jobs_with_expired_leases(self, now: float, limit: int = 100) -> list[JobRecord]:
        return await self._leased_before("lease_expires_at", now, limit)

    @_unavailable
    async def jobs_past_deadline(self, now: float, limit: int = 100) -> list[JobRecord]:
        return await self._leased_before("deadline", now, limit)

    async def _leased_before(self, field: str, now: float, limit: int) -> list[JobRecord]:
        if limit <= 0:
            return []
        # `$lt` on a number never matches null, so jobs without the field are left out.
        query = {"state": {"$in": _LEASED}, field: {"$lt": now}}
        docs = await self._c("jobs").find(query).sort(field, ASCENDING).limit(limit).to_list(None)
        return [from_document(d, JobRecord) for d in docs]

    @_unavailable
    async def count_jobs_by_state(self) -> dict[str, int]:
        cursor = await self._c("jobs").aggregate([{"$group": {"_id": "$state", "n": {"$sum": 1}}}])
        return {d["_id"]: int(d["n"]) for d in await cursor.to_list(None)}

    @_unavailable
    async def active_job_counts(self) -> dict[str, int]:
        pipeline: list[Doc] = [
            {"$match": {"state": {"$in": _LEASED}, "agent_id": {"$ne": None}}},
            {"$group": {"_id": "$agent_id", "n": {"$sum": 1}}},
        ]
        cursor = await self._c("jobs").aggregate(pipeline)
        return {d["_id"]: int(d["n"]) for d in await cursor.to_list(None)}

    @_unavailable
    async def active_jobs_by_owner(self) -> dict[str, int]:
        pipeline: list[Doc] = [{"$match": {"state": {"$in": _LEASED}}}, {"$group": {"_id": "$owner", "n": {"$sum": 1}}}]
        cursor = await self._c("jobs").aggregate(pipeline)
        return {d["_id"]: int(d["n"]) for d in await cursor.to_list(None)}

    @_unavailable
    async def count_jobs(self, *, owner: str, states: Collection[str]) -> int:
        if not states:
            return 0
        return int(await self._c("jobs").count_documents({"owner": owner, "state": {"$in": sorted(states)}}))

    @_unavailable
    async def renew_leases(self, agent_id: str, jobs: Collection[tuple[str, int]], until: float) -> list[str]:
        renewed: list[str] = []
        coll = self._c("jobs")
        for job_id, attempt in jobs:
            query = {"_id": job_id, "agent_id": agent_id, "attempt": attempt, "state": {"$in": _LEASED}}
            result = await coll.update_one(query, {"$max": {"lease_expires_at": float(until)}})
            if result.matched_count:
                renewed.append(job_id)
        return renewed

    # -- logs -------------------------------------------------------------------------------------
    @_unavailable
    async def append_log(
        self, job_id: str, attempt: int, seq: int, stream: str, data: bytes, ts: float, cap_bytes: int = 0
    ) -> AppendResult:
        acked = await self.acked_seq(job_id, attempt)
        if seq != acked + 1:
            return AppendResult(entry=None, acked_seq=acked)
        counter = await self._c("jobs").find_one_and_update(
            {"_id": job_id}, {"$inc": {"log_next_offset": 1}}, projection={"log_next_offset": 1}, return_document=_AFTER
        )
        if counter is None:
            return AppendResult(entry=None, acked_seq=-1)
        doc: Doc = {
            "job_id": job_id,
            "offset": int(counter["log_next_offset"]) - 1,
            "attempt": attempt,
            "seq": seq,
            "stream": stream,
            "data": bytes(data),
            "ts": float(ts),
        }
        entry = from_document(doc, LogEntry)
        try:
            await self._c("logs").insert_one(doc)
        except DuplicateKeyError:
            # A concurrent copy of the same chunk won; this offset stays unused (a harmless gap).
            return AppendResult(entry=None, acked_seq=await self.acked_seq(job_id, attempt))
        await self._apply_log_cap(job_id, entry.offset, len(entry.data), cap_bytes)
        return AppendResult(entry=entry, acked_seq=seq)

    async def _apply_log_cap(self, job_id: str, offset: int, size: int, cap: int) -> None:
        # One agent connection appends to a job at a time, so a read-modify-write of the stats
        # document is enough; the worst a race could do is keep a few KiB over the cap.
        stats_doc = await self._c("meta").find_one({"_id": f"log_stats:{job_id}"})
        stats = logcap.account(
            msgspec.convert(stats_doc.get("stats", {}), logcap.LogStats) if stats_doc else logcap.LogStats(),
            offset, size, cap,
        )
        need = logcap.excess(stats, cap)
        while need > 0 and stats.head_end is not None:
            docs = await (
                self._c("logs").find({"job_id": job_id, "offset": {"$gt": stats.head_end}}, projection={"offset": 1, "data": 1})
                .sort("offset", ASCENDING).limit(256).to_list(None)
            )
            drops = logcap.choose_drops([(int(d["offset"]), len(d["data"])) for d in docs], need, offset)
            if not drops:
                break
            await self._c("logs").delete_many(
                {"job_id": job_id, "offset": {"$gte": drops[0][0], "$lte": drops[-1][0]}}
            )
            stats = logcap.dropped(stats, drops)
            need = logcap.excess(stats, cap)
        await self._c("meta").update_one(
            {"_id": f"log_stats:{job_id}"}, {"$set": {"stats": msgspec.to_builtins(stats)}}, upsert=True
        )

    @_unavailable
    async def log_dropped_bytes(self, job_id: str) -> int:
        doc = await self._c("meta").find_one({"_id": f"log_stats:{job_id}"})
        return 0 if doc is None else int(doc.get("stats", {}).get("dropped_bytes", 0))

    @_unavailable
    async def read_logs(self, job_id: str, from_offset: int = 0, limit: int = 1000) -> list[LogEntry]:
        if limit <= 0:
            return []
        query = {"job_id": job_id, "offset": {"$gte": from_offset}}
        docs = await self._c("logs").find(query).sort("offset", ASCENDING).limit(limit).to_list(None)
        return [from_document(d, LogEntry) for d in docs]

    @_unavailable
    async def acked_seq(self, job_id: str, attempt: int) -> int:
        # Seqs are stored only contiguously, so the highest stored seq is the acked one.
        doc = await self._c("logs").find_one(
            {"job_id": job_id, "attempt": attempt}, projection={"seq": 1}, sort=[("seq", DESCENDING)]
        )
        return -1 if doc is None else int(doc["seq"])

    @_unavailable
    async def next_log_offset(self, job_id: str) -> int:
        doc = await self._c("jobs").find_one({"_id": job_id}, projection={"log_next_offset": 1})
        return 0 if doc is None else int(doc.get("log_next_offset", 0))
