"""One contract suite for every Store implementation (DESIGN §3)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from yardmaster.protocol.jobs import JobSpec
from yardmaster.server.backends.base import Conflict, JobUpdate, Store
from yardmaster.server.backends.documents import from_document, from_json
from yardmaster.server.backends.records import (
    AgentRecord,
    ApiKeyRecord,
    AuditRecord,
    JobRecord,
    RefreshTokenRecord,
    UserRecord,
)

MONGO_SKIP_REASON = (
    "MongoDB contract suite skipped: set YM_TEST_MONGODB_URL to a MongoDB server to run it; "
    "no MongoDB server can be installed on this machine"
)

_counter = itertools.count()


def new_id(prefix: str = "j") -> str:
    """Time-sortable ids: later calls sort after earlier ones."""
    return f"{prefix}_{time.time_ns():020d}{next(_counter):08d}"


def job(owner: str = "alice", state: str = "queued", **fields: Any) -> JobRecord:
    now = time.time()
    base: dict[str, Any] = {
        "id": new_id(),
        "owner": owner,
        "spec": JobSpec(image="busybox", command=["true"]),
        "state": state,
        "created_at": now,
        "updated_at": now,
        "enqueued_at": now,
    }
    base.update(fields)
    return JobRecord(**base)


def api_key(owner: str = "alice", **fields: Any) -> ApiKeyRecord:
    kid = new_id("k")
    base: dict[str, Any] = {
        "id": kid,
        "token_hash": uuid.uuid4().hex,
        "hint": "ym_key_...Ab3x",
        "name": f"key {kid}",
        "owner": owner,
        "role": "user",
        "created_at": time.time(),
    }
    base.update(fields)
    return ApiKeyRecord(**base)


def agent(**fields: Any) -> AgentRecord:
    aid = new_id("a")
    base: dict[str, Any] = {
        "id": aid,
        "name": f"agent-{aid}",
        "token_hash": uuid.uuid4().hex,
        "labels": ["linux"],
        "capacity": 2,
        "created_at": time.time(),
    }
    base.update(fields)
    return AgentRecord(**base)


@pytest.fixture(params=["sqlite", "mongodb"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    impl: Store
    if request.param == "sqlite":
        from yardmaster.server.backends.sqlite_store import SqliteStore

        impl = SqliteStore(str(tmp_path / "data" / "yardmaster.db"))
        await impl.start()
        yield impl
        await impl.close()
        return

    url = os.environ.get("YM_TEST_MONGODB_URL")
    if not url:
        pytest.skip(MONGO_SKIP_REASON)
    from pymongo import AsyncMongoClient

    from yardmaster.server.backends.mongo_store import MongoStore

    database = f"ym_test_{uuid.uuid4().hex[:12]}"
    impl = MongoStore(url, database)
    await impl.start()
    yield impl
    await impl.close()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
    await client.drop_database(database)
    await client.close()


# -- lifecycle ------------------------------------------------------------------------------------


async def test_ping(store: Store) -> None:
    await store.ping()
    assert await store.count_jobs_by_state() == {}
    assert await store.active_job_counts() == {}


# -- API keys -------------------------------------------------------------------------------------


async def test_api_keys(store: Store) -> None:
    a1, a2, b1 = api_key("alice"), api_key("alice"), api_key("bob", role="admin")
    for k in (a1, a2, b1):
        await store.put_api_key(k)

    assert await store.get_api_key_by_hash(a1.token_hash) == a1
    assert await store.get_api_key_by_hash("0" * 64) is None
    assert [k.id for k in await store.list_api_keys("alice")] == [a1.id, a2.id]
    assert {k.id for k in await store.list_api_keys()} == {a1.id, a2.id, b1.id}
    assert await store.list_api_keys("nobody") == []

    await store.touch_api_key(a1.id, 1000.0)
    got = await store.get_api_key_by_hash(a1.token_hash)
    assert got is not None and got.last_used_at == 1000.0

    revoked = await store.revoke_api_key(a1.id, 2000.0)
    assert revoked is not None and revoked.revoked_at == 2000.0
    again = await store.revoke_api_key(a1.id, 3000.0)
    assert again is not None and again.revoked_at == 2000.0  # revoked once
    got = await store.get_api_key_by_hash(a1.token_hash)
    assert got is not None and got.revoked_at == 2000.0
    assert await store.revoke_api_key("k_missing", 1.0) is None

    untouched = await store.get_api_key_by_hash(a2.token_hash)
    assert untouched == a2


async def test_put_api_key_replaces_same_id(store: Store) -> None:
    k = api_key()
    await store.put_api_key(k)
    renamed = ApiKeyRecord(**{**{f: getattr(k, f) for f in k.__struct_fields__}, "name": "renamed"})
    await store.put_api_key(renamed)
    assert [x.name for x in await store.list_api_keys(k.owner)] == ["renamed"]


# -- users ----------------------------------------------------------------------------------------


def user(username: str | None = None, **fields: Any) -> UserRecord:
    uid = new_id("u")
    base: dict[str, Any] = {"id": uid, "username": username or f"user-{uid}", "created_at": time.time()}
    base.update(fields)
    return UserRecord(**base)


async def test_users_roundtrip_every_field(store: Store) -> None:
    full = user(
        "Alice",
        email="Alice@Example.com",
        first_name="Alice",
        last_name="Liddell",
        image_url="https://example.com/a.png",
        phone="+44 20 7946 0000",
        metadata={"team": "infra", "tags": ["a", "b"], "nested": {"n": 1, "ok": True, "none": None}},
        role="admin",
        password_hash="$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
        oidc_issuer="https://idp.example",
        oidc_subject="sub-1",
        last_login_at=1000.5,
        disabled_at=2000.25,
    )
    bare = user("bob")
    await store.create_user(full)
    await store.create_user(bare)
    assert await store.get_user(full.id) == full
    assert await store.get_user(bare.id) == bare
    assert await store.get_user("u_missing") is None


async def test_usernames_and_emails_are_unique_whatever_their_case(store: Store) -> None:
    alice = user("alice", email="alice@example.com")
    await store.create_user(alice)
    for clash, field in (
        (user("ALICE"), "username"),
        (user("Alice", email="other@example.com"), "username"),
        (user("alice2", email="ALICE@example.COM"), "email"),
        (user("alice3", id=alice.id), "id"),
    ):
        with pytest.raises(Conflict) as err:
            await store.create_user(clash)
        assert err.value.field == field
        assert await store.get_user(clash.id) == (alice if clash.id == alice.id else None)
    # Many users without an email (or an OIDC identity) are no clash.
    await store.create_user(user("carol"))
    await store.create_user(user("dave"))
    assert len(await store.list_users()) == 3


async def test_find_user_by_username_or_email_casefolded(store: Store) -> None:
    alice = user("Alice", email="Alice@Example.com")
    await store.create_user(alice)
    await store.create_user(user("bob"))
    for login in ("alice", "ALICE", "Alice", "alice@example.com", "ALICE@EXAMPLE.COM"):
        assert await store.find_user(login) == alice, login
    assert await store.find_user("nobody") is None
    assert await store.find_user("example.com") is None


async def test_an_oidc_identity_is_unique_and_found_by_issuer_and_subject(store: Store) -> None:
    first = user("first", oidc_issuer="https://idp.one", oidc_subject="42")
    await store.create_user(first)
    await store.create_user(user("same-subject-other-issuer", oidc_issuer="https://idp.two", oidc_subject="42"))
    with pytest.raises(Conflict) as err:
        await store.create_user(user("second", oidc_issuer="https://idp.one", oidc_subject="42"))
    assert err.value.field == "oidc_subject"
    assert await store.get_user_by_identity("https://idp.one", "42") == first
    assert await store.get_user_by_identity("https://idp.one", "43") is None
    assert await store.get_user_by_identity("https://idp.three", "42") is None


async def test_list_users_pages_by_id(store: Store) -> None:
    made = [user() for _ in range(5)]
    for u in reversed(made):
        await store.create_user(u)
    ids = sorted(u.id for u in made)
    first = await store.list_users(limit=2)
    assert [u.id for u in first] == ids[:2]
    second = await store.list_users(limit=2, after=first[-1].id)
    assert [u.id for u in second] == ids[2:4]
    assert [u.id for u in await store.list_users(limit=10, after=second[-1].id)] == ids[4:]
    assert await store.list_users(limit=10, after=ids[-1]) == []
    assert await store.list_users(limit=0) == []


async def test_update_user_applies_changes_and_keeps_keys_unique(store: Store) -> None:
    alice, bob = user("alice", email="alice@example.com"), user("bob", email="bob@example.com")
    await store.create_user(alice)
    await store.create_user(bob)

    changed = await store.update_user(alice.id, {"role": "admin", "metadata": {"k": [1, 2]}, "disabled_at": 5.0})
    assert changed is not None and (changed.role, changed.metadata, changed.disabled_at) == ("admin", {"k": [1, 2]}, 5.0)
    assert await store.get_user(alice.id) == changed
    enabled = await store.update_user(alice.id, {"disabled_at": None})
    assert enabled is not None and enabled.disabled_at is None

    for change, field in (({"username": "BOB"}, "username"), ({"email": "Bob@Example.com"}, "email")):
        with pytest.raises(Conflict) as err:
            await store.update_user(alice.id, change)
        assert err.value.field == field
    assert await store.get_user(alice.id) == enabled  # a refused change changes nothing

    renamed = await store.update_user(alice.id, {"username": "alicia", "email": None})
    assert renamed is not None and renamed.username == "alicia" and renamed.email is None
    assert await store.find_user("ALICIA") == renamed
    assert await store.find_user("alice") is None and await store.find_user("alice@example.com") is None
    await store.create_user(user("Alice", email="alice@example.com"))  # the old keys are free again

    linked = await store.update_user(bob.id, {"oidc_issuer": "https://idp", "oidc_subject": "b"})
    assert await store.get_user_by_identity("https://idp", "b") == linked

    assert await store.update_user("u_missing", {"role": "admin"}) is None
    with pytest.raises(ValueError):
        await store.update_user(alice.id, {"id": "u_other"})
    with pytest.raises(ValueError):
        await store.update_user(alice.id, {"no_such_field": 1})
    with pytest.raises(ValueError):
        await store.update_user(alice.id, {"role": "superuser"})
    assert await store.get_user(alice.id) == renamed


async def test_delete_user(store: Store) -> None:
    alice, bob = user("alice", email="a@example.com"), user("bob")
    await store.create_user(alice)
    await store.create_user(bob)
    assert await store.delete_user(alice.id) is True
    assert await store.delete_user(alice.id) is False
    assert await store.get_user(alice.id) is None and await store.find_user("alice") is None
    assert await store.get_user(bob.id) == bob
    await store.create_user(user("ALICE", email="A@example.com"))  # username and email are free again


# -- refresh tokens ---------------------------------------------------------------------------------


def refresh_token(user_id: str = "u_1", family_id: str = "fam_1", **fields: Any) -> RefreshTokenRecord:
    base: dict[str, Any] = {
        "id": new_id("rt"),
        "family_id": family_id,
        "user_id": user_id,
        "token_hash": uuid.uuid4().hex,
        "created_at": 100.0,
        "expires_at": 10_000.0,
    }
    base.update(fields)
    return RefreshTokenRecord(**base)


async def test_a_refresh_token_is_spent_once(store: Store) -> None:
    tok = refresh_token()
    await store.put_refresh_token(tok)
    before = await store.spend_refresh_token(tok.token_hash, 200.0)
    assert before == tok  # as it was: unused
    again = await store.spend_refresh_token(tok.token_hash, 300.0)
    assert again is not None and again.used_at == 200.0  # the first use, kept
    assert await store.spend_refresh_token("0" * 32, 200.0) is None

    revoked = refresh_token(family_id="fam_2")
    await store.put_refresh_token(revoked)
    assert await store.revoke_refresh_tokens(150.0, family_id="fam_2") == 1
    seen = await store.spend_refresh_token(revoked.token_hash, 200.0)
    assert seen is not None and seen.revoked_at == 150.0 and seen.used_at is None
    after = await store.spend_refresh_token(revoked.token_hash, 250.0)
    assert after is not None and after.used_at is None  # a revoked token is not marked used


async def test_of_concurrent_spends_of_one_refresh_token_exactly_one_sees_it_unused(store: Store) -> None:
    tok = refresh_token()
    await store.put_refresh_token(tok)
    seen = await asyncio.gather(*(store.spend_refresh_token(tok.token_hash, 200.0 + n) for n in range(20)))
    assert all(s is not None for s in seen)
    unused = [s for s in seen if s is not None and s.used_at is None]
    assert len(unused) == 1


async def test_revoke_refresh_tokens_of_a_family_or_of_a_user(store: Store) -> None:
    a1, a2 = refresh_token("u_a", "fam_a1"), refresh_token("u_a", "fam_a1")
    a3, b1 = refresh_token("u_a", "fam_a2"), refresh_token("u_b", "fam_b1")
    for tok in (a1, a2, a3, b1):
        await store.put_refresh_token(tok)
    assert await store.revoke_refresh_tokens(500.0, family_id="fam_a1") == 2
    assert await store.revoke_refresh_tokens(600.0, family_id="fam_a1") == 0  # already revoked
    assert await store.revoke_refresh_tokens(700.0, user_id="u_a") == 1  # a3 only
    for tok, at in ((a1, 500.0), (a2, 500.0), (a3, 700.0)):
        seen = await store.spend_refresh_token(tok.token_hash, 800.0)
        assert seen is not None and seen.revoked_at == at
    untouched = await store.spend_refresh_token(b1.token_hash, 800.0)
    assert untouched is not None and untouched.revoked_at is None
    assert await store.revoke_refresh_tokens(900.0, user_id="u_nobody") == 0
    with pytest.raises(ValueError):
        await store.revoke_refresh_tokens(1.0)
    with pytest.raises(ValueError):
        await store.revoke_refresh_tokens(1.0, family_id="fam_a1", user_id="u_a")


# -- audit trail ------------------------------------------------------------------------------------


def audit(action: str, actor: str | None = "u_admin", at: float = 100.0, **fields: Any) -> AuditRecord:
    base: dict[str, Any] = {"id": new_id("aud"), "at": at, "action": action, "actor": actor}
    base.update(fields)
    return AuditRecord(**base)


async def test_audit_entries_are_listed_newest_first_with_filters_and_a_cursor(store: Store) -> None:
    entries = [
        audit("login.failed", None, 100.0, client_address="127.0.0.1", details={"login": "alice"}),
        audit("login.succeeded", "u_alice", 110.0, client_address="127.0.0.1"),
        audit("key.created", "u_alice", 120.0, target="key_1", details={"name": "ci", "scopes": ["jobs:read"]}),
        audit("key.revoked", "u_admin", 130.0, target="key_1"),
        audit("keys.other", "u_admin", 140.0),
        audit("user.disabled", "u_admin", 150.0, target="u_alice", details={"keys_revoked": 1}),
    ]
    for e in entries:
        await store.append_audit(e)
    newest_first = list(reversed(entries))
    assert await store.list_audit() == newest_first
    assert await store.list_audit(actor="u_alice") == [entries[2], entries[1]]
    assert await store.list_audit(action="key.created") == [entries[2]]
    assert await store.list_audit(action="key.") == [entries[3], entries[2]]  # not "keys.other"
    assert await store.list_audit(action="key") == []  # exact unless it ends in "."
    assert await store.list_audit(since=130.0) == newest_first[:3]
    assert await store.list_audit(actor="u_admin", action="key.", since=125.0) == [entries[3]]
    page = await store.list_audit(limit=4)
    assert page == newest_first[:4]
    assert await store.list_audit(limit=4, before=page[-1].id) == newest_first[4:]
    assert await store.list_audit(limit=0) == []


# -- agents ---------------------------------------------------------------------------------------


async def test_agents(store: Store) -> None:
    a, b = agent(), agent(labels=["gpu"], capacity=4, version="1.0", executor="docker")
    await store.put_agent(a)
    await store.put_agent(b)

    assert await store.get_agent(a.id) == a
    assert await store.get_agent("a_missing") is None
    assert await store.get_agent_by_token_hash(b.token_hash) == b
    assert await store.get_agent_by_token_hash("nope") is None
    assert [x.id for x in await store.list_agents()] == [a.id, b.id]

    updated = await store.update_agent(a.id, {"last_seen_at": 42.0, "labels": ["linux", "arm64"]})
    assert updated is not None and updated.last_seen_at == 42.0 and updated.labels == ["linux", "arm64"]
    assert await store.get_agent(a.id) == updated
    assert await store.update_agent("a_missing", {"last_seen_at": 1.0}) is None
    with pytest.raises(ValueError):
        await store.update_agent(a.id, {"no_such_field": 1})
    assert await store.get_agent(a.id) == updated

    revoked = await store.revoke_agent(a.id, 100.0)
    assert revoked is not None and revoked.revoked_at == 100.0
    again = await store.revoke_agent(a.id, 200.0)
    assert again is not None and again.revoked_at == 100.0
    assert await store.revoke_agent("a_missing", 1.0) is None
    b_now = await store.get_agent(b.id)
    assert b_now is not None and b_now.revoked_at is None


async def test_agent_registration_and_declaration_are_kept_apart(store: Store) -> None:
    a = agent(labels=["a"], capacity=2)
    await store.put_agent(a)
    fresh = await store.get_agent(a.id)
    assert fresh is not None and (fresh.declared_labels, fresh.declared_capacity) == ([], None)
    said = await store.update_agent(a.id, {"declared_labels": ["prod"], "declared_capacity": 8, "executor": "process"})
    assert said is not None and (said.labels, said.capacity) == (["a"], 2)
    assert (said.declared_labels, said.declared_capacity, said.executor) == (["prod"], 8, "process")
    changed = await store.update_agent(a.id, {"labels": [], "capacity": 1})
    assert changed is not None and (changed.labels, changed.capacity, changed.declared_labels) == ([], 1, ["prod"])
    assert await store.get_agent(a.id) == changed
    with pytest.raises(ValueError):
        await store.update_agent(a.id, {"declared_capacity": "many"})


def test_an_agent_document_written_before_the_declared_fields_still_reads() -> None:
    old = b'{"id":"agt_1","name":"a","token_hash":"h","labels":["x"],"capacity":3,"created_at":1.0}'
    for rec in (from_json(old, AgentRecord), from_document(json.loads(old), AgentRecord)):
        assert (rec.labels, rec.capacity, rec.declared_labels, rec.declared_capacity) == (["x"], 3, [], None)


# -- jobs -----------------------------------------------------------------------------------------


async def test_create_get_job_roundtrip(store: Store) -> None:
    spec = JobSpec(image="busybox", command="echo hi", env={"A": "1"}, labels=["linux"], priority=5)
    j = job(spec=spec, priority=5)
    await store.create_job(j)
    assert await store.get_job(j.id) == j
    assert await store.get_job("j_missing") is None
    with pytest.raises(ValueError):
        await store.create_job(j)


async def test_create_jobs_creates_the_whole_batch(store: Store) -> None:
    batch = [job(), job("bob"), job(state="queued", priority=3)]
    await store.create_jobs(batch)
    for j in batch:
        assert await store.get_job(j.id) == j
    await store.create_jobs([])  # an empty batch is a no-op
    assert await store.count_jobs_by_state() == {"queued": 3}


async def test_create_jobs_is_all_or_none(store: Store) -> None:
    existing = job()
    await store.create_job(existing)

    before, after = job(), job()
    with pytest.raises(ValueError):
        await store.create_jobs([before, job(id=existing.id, owner="mallory"), after])
    assert await store.get_job(before.id) is None
    assert await store.get_job(after.id) is None
    assert await store.get_job(existing.id) == existing

    first = job()
    with pytest.raises(ValueError):  # the same id twice within the batch
        await store.create_jobs([first, job(), job(id=first.id)])
    assert await store.get_job(first.id) is None
    assert await store.count_jobs_by_state() == {"queued": 1}


async def test_get_jobs_returns_the_existing_ones_by_id(store: Store) -> None:
    a, b = job(), job(state="running", agent_id="ag1", attempt=1)
    await store.create_jobs([a, b])
    assert await store.get_jobs([a.id, "j_missing", b.id, a.id]) == {a.id: a, b.id: b}
    assert await store.get_jobs({b.id}) == {b.id: b}
    assert await store.get_jobs(["j_missing"]) == {}
    assert await store.get_jobs([]) == {}


async def test_get_jobs_takes_more_ids_than_a_statement_has_parameters(store: Store) -> None:
    # SQLite allows 32766 parameters in one statement; a list of ids must not be bound by that.
    wanted = [job() for _ in range(20)]
    await store.create_jobs(wanted)
    missing = [f"j_missing_{n:06d}" for n in range(40_000)]
    ids = missing[:20_000] + [j.id for j in wanted] + missing[20_000:]
    assert await store.get_jobs(ids) == {j.id: j for j in wanted}


async def test_list_jobs_filters_and_order(store: Store) -> None:
    a1 = job("alice")
    b1 = job("bob", state="running", agent_id="ag1", attempt=1)
    a2 = job("alice", state="running", agent_id="ag2", attempt=1)
    a3 = job("alice", state="succeeded", agent_id="ag1", attempt=1)
    for j in (a1, b1, a2, a3):
        await store.create_job(j)

    assert [j.id for j in await store.list_jobs()] == [a3.id, a2.id, b1.id, a1.id]
    assert [j.id for j in await store.list_jobs(owner="alice")] == [a3.id, a2.id, a1.id]
    assert [j.id for j in await store.list_jobs(states=["running"])] == [a2.id, b1.id]
    assert [j.id for j in await store.list_jobs(states={"queued", "succeeded"})] == [a3.id, a1.id]
    assert [j.id for j in await store.list_jobs(agent_id="ag1")] == [a3.id, b1.id]
    assert [j.id for j in await store.list_jobs(owner="alice", states=["running"], agent_id="ag2")] == [a2.id]
    assert await store.list_jobs(owner="carol") == []
    assert await store.list_jobs(states=[]) == []


async def test_list_jobs_pagination(store: Store) -> None:
    jobs = [job() for _ in range(7)]
    for j in jobs:
        await store.create_job(j)
    expected = [j.id for j in reversed(jobs)]

    seen: list[str] = []
    before: str | None = None
    while True:
        page = await store.list_jobs(limit=3, before=before)
        if not page:
            break
        assert len(page) <= 3
        seen.extend(j.id for j in page)
        before = page[-1].id
    assert seen == expected
    assert [j.id for j in await store.list_jobs(limit=2)] == expected[:2]


# -- compare-and-set ------------------------------------------------------------------------------


async def test_update_job_cas(store: Store) -> None:
    j = job()
    await store.create_job(j)

    wrong_state = await store.update_job(j.id, expect_states=["running"], changes={"state": "failed"})
    assert wrong_state is None
    assert await store.get_job(j.id) == j

    claimed = await store.update_job(
        j.id,
        expect_states=["queued"],
        changes={"state": "assigned", "attempt": 1, "agent_id": "ag1", "lease_expires_at": 50.0},
    )
    assert claimed is not None
    assert (claimed.state, claimed.attempt, claimed.agent_id, claimed.lease_expires_at) == ("assigned", 1, "ag1", 50.0)
    assert await store.get_job(j.id) == claimed

    stale = await store.update_job(
        j.id, expect_states=["assigned"], expect_attempt=2, changes={"state": "running"}
    )
    assert stale is None
    assert await store.get_job(j.id) == claimed

    running = await store.update_job(
        j.id, expect_states=["assigned", "running"], expect_attempt=1, changes={"state": "running", "started_at": 7.0}
    )
    assert running is not None and running.state == "running" and running.started_at == 7.0
    assert running.spec == j.spec

    assert await store.update_job("j_missing", expect_states=["queued"], changes={"state": "assigned"}) is None


async def test_update_job_increments_integer_fields_in_the_same_compare_and_set(store: Store) -> None:
    j = job(state="assigned", agent_id="ag1", attempt=2, runs=1)
    await store.create_job(j)
    running = await store.update_job(
        j.id, expect_states=["assigned"], expect_attempt=2, expect_agent="ag1",
        changes={"state": "running"}, increments={"runs": 1},
    )
    assert running is not None and (running.state, running.runs) == ("running", 2)
    assert (await store.get_job(j.id)) == running
    # A failed compare increments nothing.
    assert await store.update_job(j.id, expect_states=["assigned"], changes={}, increments={"runs": 1}) is None
    assert (await store.get_job(j.id)).runs == 2  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        await store.update_job(j.id, expect_states=["running"], changes={}, increments={"state": 1})
    with pytest.raises(ValueError):
        await store.update_job(j.id, expect_states=["running"], changes={}, increments={"runs": 1.5})  # type: ignore[dict-item]


async def test_update_job_expect_agent(store: Store) -> None:
    j = job(state="running", agent_id="ag1", attempt=1)
    unassigned = job()
    await store.create_jobs([j, unassigned])

    assert await store.update_job(j.id, expect_states=["running"], expect_agent="ag2", changes={"state": "failed"}) is None
    assert await store.get_job(j.id) == j
    assert (
        await store.update_job(unassigned.id, expect_states=["queued"], expect_agent="ag1", changes={"priority": 1})
        is None
    )
    assert await store.get_job(unassigned.id) == unassigned

    done = await store.update_job(
        j.id, expect_states=["running"], expect_attempt=1, expect_agent="ag1", changes={"state": "succeeded"}
    )
    assert done is not None and done.state == "succeeded" and done.agent_id == "ag1"
    # Every given part must hold: the right agent at a stale attempt is refused.
    assert (
        await store.update_job(j.id, expect_states=["succeeded"], expect_attempt=2, expect_agent="ag1", changes={"priority": 5})
        is None
    )
    assert await store.get_job(j.id) == done


async def test_a_failing_change_among_concurrent_ones_fails_alone(store: Store) -> None:
    jobs = [job() for _ in range(30)]
    await store.create_jobs(jobs)

    async def change(n: int, j: JobRecord) -> JobRecord | None:
        changes: dict[str, Any] = {"bogus": 1} if n % 3 == 1 else {"priority": n}
        return await store.update_job(j.id, expect_states=["queued"], fence_epoch=1, changes=changes)

    results = await asyncio.gather(*(change(n, j) for n, j in enumerate(jobs)), return_exceptions=True)
    for n, (j, result) in enumerate(zip(jobs, results, strict=True)):
        stored = await store.get_job(j.id)
        if n % 3 == 1:
            assert isinstance(result, ValueError)
            assert stored == j
        else:
            assert isinstance(result, JobRecord) and result.priority == n
            assert stored == result


async def test_update_job_rejects_bad_changes(store: Store) -> None:
    j = job()
    await store.create_job(j)
    with pytest.raises(ValueError):
        await store.update_job(j.id, expect_states=["queued"], changes={"bogus": 1})
    with pytest.raises(ValueError):
        await store.update_job(j.id, expect_states=["queued"], changes={"state": "not-a-state"})
    assert await store.get_job(j.id) == j


async def test_concurrent_claims_exactly_one_wins(store: Store) -> None:
    j = job()
    await store.create_job(j)

    async def claim(n: int) -> JobRecord | None:
        return await store.update_job(
            j.id, expect_states=["queued"], changes={"state": "assigned", "attempt": 1, "agent_id": f"ag{n}"}
        )

    results = await asyncio.gather(*(claim(n) for n in range(20)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    final = await store.get_job(j.id)
    assert final is not None and final.agent_id == winners[0].agent_id and final.state == "assigned"


async def test_update_jobs_applies_each_compare_and_set_in_order(store: Store) -> None:
    a, b = job(), job()
    await store.create_jobs([a, b])
    assert await store.update_jobs([]) == []
    out = await store.update_jobs(
        [
            JobUpdate(a.id, ["queued"], {"state": "assigned", "agent_id": "ag1"}, expect_attempt=0),
            JobUpdate(a.id, ["assigned"], {"state": "running"}, expect_agent="ag1", increments={"runs": 1}),
            JobUpdate(b.id, ["running"], {"state": "failed"}),  # b is queued: this one fails alone
            JobUpdate("j_missing", ["queued"], {"state": "assigned"}),
            JobUpdate(b.id, ["queued"], {"priority": 7}),
        ]
    )
    assert [r is not None for r in out] == [True, True, False, False, True]
    assert out[1] is not None and (out[1].state, out[1].runs, out[1].agent_id) == ("running", 1, "ag1")
    assert await store.get_job(a.id) == out[1]
    b_now = await store.get_job(b.id)
    assert b_now is not None and (b_now.state, b_now.priority) == ("queued", 7)


async def test_update_jobs_fenced_all_fail_behind_a_newer_epoch(store: Store) -> None:
    a, b = job(), job()
    await store.create_jobs([a, b])
    claims = [JobUpdate(j.id, ["queued"], {"state": "assigned"}) for j in (a, b)]
    await store.advance_fence(3)
    assert await store.update_jobs(claims, fence_epoch=2) == [None, None]
    assert {(await store.get_job(j.id)).state for j in (a, b)} == {"queued"}  # type: ignore[union-attr]
    won = await store.update_jobs(claims, fence_epoch=4)
    assert [(r.state, r.epoch) for r in won if r is not None] == [("assigned", 4), ("assigned", 4)]
    assert await store.update_job(a.id, expect_states=["assigned"], fence_epoch=3, changes={"priority": 1}) is None


async def test_fencing(store: Store) -> None:
    j = job()
    await store.create_job(j)
    assert await store.advance_fence(5) == 5
    assert await store.advance_fence(3) == 5  # never goes back

    stale_leader = await store.update_job(j.id, expect_states=["queued"], fence_epoch=4, changes={"priority": 1})
    assert stale_leader is None
    assert await store.get_job(j.id) == j

    new_leader = await store.update_job(j.id, expect_states=["queued"], fence_epoch=6, changes={"priority": 2})
    assert new_leader is not None and new_leader.priority == 2 and new_leader.epoch == 6
    assert await store.advance_fence(0) == 6  # recorded by the fenced change

    deposed = await store.update_job(j.id, expect_states=["queued"], fence_epoch=5, changes={"priority": 3})
    assert deposed is None
    current = await store.get_job(j.id)
    assert current is not None and current.priority == 2

    same = await store.update_job(j.id, expect_states=["queued"], fence_epoch=6, changes={"priority": 4})
    assert same is not None and same.priority == 4

    # A fenced-out leader is refused on other jobs too, not only on jobs the new leader touched.
    other = job()
    await store.create_job(other)
    assert await store.update_job(other.id, expect_states=["queued"], fence_epoch=5, changes={"priority": 9}) is None


# -- leases, deadlines, slots ---------------------------------------------------------------------


async def test_expired_leases_and_deadlines(store: Store) -> None:
    expired = job(state="running", agent_id="ag1", attempt=1, lease_expires_at=100.0, deadline=1000.0)
    assigned_expired = job(state="assigned", agent_id="ag1", attempt=2, lease_expires_at=90.0)
    cancelling_late = job(state="cancelling", agent_id="ag2", attempt=1, lease_expires_at=500.0, deadline=150.0)
    alive = job(state="running", agent_id="ag2", attempt=1, lease_expires_at=300.0, deadline=400.0)
    finished = job(state="succeeded", agent_id="ag1", attempt=1, lease_expires_at=10.0, deadline=10.0)
    queued = job()
    for j in (expired, assigned_expired, cancelling_late, alive, finished, queued):
        await store.create_job(j)

    lease_ids = {j.id for j in await store.jobs_with_expired_leases(200.0)}
    assert lease_ids == {expired.id, assigned_expired.id}
    assert len(await store.jobs_with_expired_leases(200.0, limit=1)) == 1
    assert await store.jobs_with_expired_leases(50.0) == []

    deadline_ids = {j.id for j in await store.jobs_past_deadline(200.0)}
    assert deadline_ids == {cancelling_late.id}
    assert {j.id for j in await store.jobs_past_deadline(2000.0)} == {expired.id, cancelling_late.id, alive.id}

    assert await store.active_job_counts() == {"ag1": 2, "ag2": 2}
    assert await store.count_jobs_by_state() == {"running": 2, "assigned": 1, "cancelling": 1, "succeeded": 1, "queued": 1}


async def test_renew_leases(store: Store) -> None:
    mine = job(state="running", agent_id="ag1", attempt=2, lease_expires_at=100.0)
    mine_assigned = job(state="assigned", agent_id="ag1", attempt=1, lease_expires_at=100.0)
    theirs = job(state="running", agent_id="ag2", attempt=1, lease_expires_at=100.0)
    done = job(state="succeeded", agent_id="ag1", attempt=1, lease_expires_at=100.0)
    for j in (mine, mine_assigned, theirs, done):
        await store.create_job(j)

    renewed = await store.renew_leases(
        "ag1",
        [(mine.id, 2), (mine_assigned.id, 1), (theirs.id, 1), (done.id, 1), ("j_missing", 1)],
        until=500.0,
    )
    assert sorted(renewed) == sorted([mine.id, mine_assigned.id])
    assert await store.renew_leases("ag1", [(mine.id, 1)], until=900.0) == []  # stale attempt

    for j, lease in ((mine, 500.0), (mine_assigned, 500.0), (theirs, 100.0), (done, 100.0)):
        got = await store.get_job(j.id)
        assert got is not None and got.lease_expires_at == lease, j.id
    assert await store.jobs_with_expired_leases(200.0) == [await store.get_job(theirs.id)]


# -- per-owner counts (quotas) --------------------------------------------------------------------


async def test_active_jobs_by_owner_counts_each_owners_leased_jobs(store: Store) -> None:
    assert await store.active_jobs_by_owner() == {}
    for owner, state in (("alice", "assigned"), ("alice", "running"), ("alice", "cancelling"), ("alice", "queued"),
                         ("alice", "succeeded"), ("bob", "running"), ("bob", "failed"), ("carol", "queued")):
        await store.create_job(job(owner=owner, state=state, agent_id=None if state == "queued" else "ag1"))
    assert await store.active_jobs_by_owner() == {"alice": 3, "bob": 1}


async def test_count_jobs_counts_one_owners_jobs_in_the_given_states(store: Store) -> None:
    for owner, state in (("alice", "queued"), ("alice", "queued"), ("alice", "running"), ("alice", "cancelled"),
                         ("bob", "queued")):
        await store.create_job(job(owner=owner, state=state))
    assert await store.count_jobs(owner="alice", states=["queued"]) == 2
    assert await store.count_jobs(owner="alice", states={"queued", "running", "assigned"}) == 3
    assert await store.count_jobs(owner="alice", states=["cancelled", "succeeded"]) == 1
    assert await store.count_jobs(owner="bob", states=["running"]) == 0
    assert await store.count_jobs(owner="nobody", states=["queued"]) == 0
    assert await store.count_jobs(owner="alice", states=[]) == 0
    # The count follows changes of state.
    [queued, *_] = await store.list_jobs(owner="alice", states=["queued"])
    assert await store.update_job(queued.id, expect_states=["queued"], changes={"state": "assigned", "attempt": 1})
    assert await store.count_jobs(owner="alice", states=["queued"]) == 1
    assert await store.active_jobs_by_owner() == {"alice": 2}


# -- logs -----------------------------------------------------------------------------------------


async def test_log_append_contiguous_duplicate_gap(store: Store) -> None:
    j = job(state="running", attempt=1)
    await store.create_job(j)
    assert await store.acked_seq(j.id, 1) == -1
    assert await store.next_log_offset(j.id) == 0

    r0 = await store.append_log(j.id, 1, 0, "stdout", b"hello\n", 1.0)
    assert r0.entry is not None and (r0.entry.offset, r0.entry.seq, r0.acked_seq) == (0, 0, 0)
    r1 = await store.append_log(j.id, 1, 1, "stderr", b"oops\n", 2.0)
    assert r1.entry is not None and (r1.entry.offset, r1.acked_seq) == (1, 1)

    dup = await store.append_log(j.id, 1, 1, "stderr", b"different\n", 3.0)
    assert dup.entry is None and dup.acked_seq == 1
    dup0 = await store.append_log(j.id, 1, 0, "stdout", b"hello\n", 1.0)
    assert dup0.entry is None and dup0.acked_seq == 1

    gap = await store.append_log(j.id, 1, 3, "stdout", b"later\n", 4.0)
    assert gap.entry is None and gap.acked_seq == 1

    logs = await store.read_logs(j.id)
    assert [(e.offset, e.seq, e.stream, e.data) for e in logs] == [
        (0, 0, "stdout", b"hello\n"),
        (1, 1, "stderr", b"oops\n"),
    ]
    assert await store.acked_seq(j.id, 1) == 1
    assert await store.next_log_offset(j.id) == 2

    filled = await store.append_log(j.id, 1, 2, "stdout", b"x", 5.0)
    assert filled.entry is not None and filled.acked_seq == 2
    after_gap = await store.append_log(j.id, 1, 3, "stdout", b"later\n", 6.0)
    assert after_gap.entry is not None and after_gap.entry.offset == 3 and after_gap.acked_seq == 3


async def test_log_unknown_job(store: Store) -> None:
    r = await store.append_log("j_missing", 1, 0, "stdout", b"x", 1.0)
    assert r.entry is None and r.acked_seq == -1
    assert await store.read_logs("j_missing") == []


async def test_log_offsets_monotonic_across_attempts_and_jobs(store: Store) -> None:
    j, other = job(state="running", attempt=1), job(state="running", attempt=1)
    await store.create_job(j)
    await store.create_job(other)
    for seq in range(3):
        await store.append_log(j.id, 1, seq, "stdout", f"a1-{seq}".encode(), float(seq))
    first_other = await store.append_log(other.id, 1, 0, "stdout", b"other", 1.0)
    assert first_other.entry is not None and first_other.entry.offset == 0  # offsets are per job

    r = await store.append_log(j.id, 2, 0, "stdout", b"a2-0", 10.0)
    assert r.entry is not None and r.entry.offset == 3 and r.entry.attempt == 2 and r.acked_seq == 0
    assert await store.acked_seq(j.id, 1) == 2
    assert await store.acked_seq(j.id, 2) == 0
    assert await store.acked_seq(j.id, 3) == -1
    logs = await store.read_logs(j.id)
    assert [(e.offset, e.attempt, e.seq) for e in logs] == [(0, 1, 0), (1, 1, 1), (2, 1, 2), (3, 2, 0)]
    assert await store.next_log_offset(j.id) == 4


async def test_read_logs_from_offset_and_limit(store: Store) -> None:
    j = job(state="running", attempt=1)
    await store.create_job(j)
    for seq in range(10):
        await store.append_log(j.id, 1, seq, "stdout", bytes([seq]), float(seq))
    page = await store.read_logs(j.id, from_offset=4, limit=3)
    assert [e.offset for e in page] == [4, 5, 6]
    assert [e.data for e in page] == [b"\x04", b"\x05", b"\x06"]
    assert [e.offset for e in await store.read_logs(j.id, from_offset=8)] == [8, 9]
    assert await store.read_logs(j.id, from_offset=10) == []
    assert len(await store.read_logs(j.id, limit=5)) == 5


async def test_log_bytes_roundtrip_exactly(store: Store) -> None:
    j = job(state="running", attempt=1)
    await store.create_job(j)
    payloads = [b"\xff\xfe\x00\x80 not utf-8 \xc3\x28", bytes(range(256)), b"", "ünïcode\n".encode()]
    for seq, data in enumerate(payloads):
        r = await store.append_log(j.id, 1, seq, "stderr", data, 1.5)
        assert r.entry is not None and r.entry.data == data
    logs = await store.read_logs(j.id)
    assert [e.data for e in logs] == payloads
    assert all(type(e.data) is bytes and e.ts == 1.5 and e.job_id == j.id for e in logs)


async def test_concurrent_duplicate_appends_store_once(store: Store) -> None:
    j = job(state="running", attempt=1)
    await store.create_job(j)
    results = await asyncio.gather(*(store.append_log(j.id, 1, 0, "stdout", b"once", 1.0) for _ in range(10)))
    assert sum(r.entry is not None for r in results) == 1
    assert all(r.acked_seq == 0 for r in results)
    assert [e.data for e in await store.read_logs(j.id)] == [b"once"]


async def test_log_cap_keeps_head_and_tail_and_drops_the_middle(store: Store) -> None:
    j = job(state="running", attempt=1)
    await store.create_job(j)
    cap = 1000
    for seq in range(30):  # 30 chunks of 100 bytes: 3000 bytes for a 1000-byte cap
        r = await store.append_log(j.id, 1, seq, "stdout", bytes([65 + seq % 26]) * 100, float(seq), cap_bytes=cap)
        assert r.entry is not None and r.acked_seq == seq
    logs = await store.read_logs(j.id)
    offsets = [e.offset for e in logs]
    assert sum(len(e.data) for e in logs) <= cap
    assert offsets[:5] == [0, 1, 2, 3, 4]  # the head: the first cap/2 bytes
    assert offsets[-1] == 29 and offsets[-5:] == [25, 26, 27, 28, 29]  # the tail, newest last
    gap = [b for a, b in zip(offsets, offsets[1:], strict=False) if b != a + 1]
    assert len(gap) == 1  # one contiguous dropped range
    assert await store.log_dropped_bytes(j.id) == 3000 - sum(len(e.data) for e in logs)
    assert await store.acked_seq(j.id, 1) == 29
    assert await store.next_log_offset(j.id) == 30
    dup = await store.append_log(j.id, 1, 5, "stdout", b"x", 0.0, cap_bytes=cap)
    assert dup.entry is None and dup.acked_seq == 29


async def test_no_cap_keeps_everything(store: Store) -> None:
    j = job(state="running", attempt=1)
    await store.create_job(j)
    for seq in range(20):
        await store.append_log(j.id, 1, seq, "stdout", b"y" * 100, float(seq))
    assert len(await store.read_logs(j.id)) == 20
    assert await store.log_dropped_bytes(j.id) == 0
