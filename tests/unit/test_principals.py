"""What an API key stands for: its user, with the user's role now, within the key's scopes; and
nothing once the user is disabled or deleted."""

from __future__ import annotations

import time
from pathlib import Path

from yardmaster.server.backends.records import ApiKeyRecord, UserRecord
from yardmaster.server.backends.sqlite_store import SqliteStore
from yardmaster.server.security import tokens
from yardmaster.server.security.principals import Principal, principal_for_api_key, still_valid
from yardmaster.server.security.scopes import ALL_SCOPES


async def _store_with_key(tmp_path: Path, role: str, scopes: list[str] | None) -> tuple[SqliteStore, str]:
    store = SqliteStore(str(tmp_path / "ym.db"))
    await store.start()
    await store.create_user(UserRecord(id="usr_1", username="ada", role=role, created_at=time.time()))  # type: ignore[arg-type]
    token = tokens.new_token("api-key")
    await store.put_api_key(
        ApiKeyRecord(id="key_1", token_hash=tokens.token_hash(token), hint=tokens.hint(token), name="k",
                     owner="usr_1", role=role, scopes=scopes, created_at=time.time())  # type: ignore[arg-type]
    )
    return store, token


async def test_a_key_carries_its_scopes_within_the_role(tmp_path: Path) -> None:
    store, token = await _store_with_key(tmp_path, "admin", ["jobs:read", "users:admin"])
    try:
        principal = await principal_for_api_key(store, token)
        assert principal is not None and principal.id == "usr_1" and principal.key_id == "key_1"
        assert principal.scopes == {"jobs:read", "users:admin"}
        assert principal.may("jobs:read") and not principal.may("jobs:write")
    finally:
        await store.close()


async def test_a_demoted_users_key_loses_the_admin_scopes(tmp_path: Path) -> None:
    store, token = await _store_with_key(tmp_path, "admin", None)
    try:
        assert (await principal_for_api_key(store, token)).scopes == ALL_SCOPES  # type: ignore[union-attr]
        await store.update_user("usr_1", {"role": "user"})
        principal = await principal_for_api_key(store, token)
        assert principal is not None and principal.role == "user" and not principal.is_admin
        assert not principal.may("users:admin") and not principal.may("agents:admin") and principal.may("jobs:write")
    finally:
        await store.close()


async def test_a_disabled_or_deleted_users_key_is_refused(tmp_path: Path) -> None:
    store, token = await _store_with_key(tmp_path, "user", None)
    try:
        principal = await principal_for_api_key(store, token)
        assert principal is not None and await still_valid(store, principal)
        await store.update_user("usr_1", {"disabled_at": time.time()})
        assert await principal_for_api_key(store, token) is None
        assert not await still_valid(store, principal)
        await store.update_user("usr_1", {"disabled_at": None})
        assert await principal_for_api_key(store, token) is not None
        await store.delete_user("usr_1")
        assert await principal_for_api_key(store, token) is None
    finally:
        await store.close()


async def test_a_principal_from_an_expired_access_token_is_no_longer_valid(tmp_path: Path) -> None:
    store, _ = await _store_with_key(tmp_path, "user", None)
    try:
        live = Principal(id="usr_1", role="user", credential="access-token", token_id="j1", token_expires_at=time.time() + 60)
        dead = Principal(id="usr_1", role="user", credential="access-token", token_id="j2", token_expires_at=time.time() - 1)
        assert await still_valid(store, live) and not await still_valid(store, dead)
    finally:
        await store.close()
