"""The bootstrap admin key over a real SqliteStore: first start, YM_ADMIN_KEY and its rotation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from yardmaster.server.backends.memory_broker import MemoryBroker
from yardmaster.server.backends.sqlite_store import SqliteStore
from yardmaster.server.core.client_sockets import ClientSockets
from yardmaster.server.core.keys import KeyService
from yardmaster.server.security import tokens
from yardmaster.server.security.bootstrap import AdminKeyError, ensure_admin_key
from yardmaster.server.settings import SettingsError
from yardmaster.server.security.principals import Principal, principal_for_api_key
from yardmaster.server.settings import load_settings


class Bootstrap:
    def __init__(self, store: SqliteStore, data_dir: Path) -> None:
        self.store = store
        self.data_dir = data_dir
        self.keys = KeyService(store, ClientSockets(MemoryBroker(), self._valid))

    @staticmethod
    async def _valid(principal: Principal) -> bool:
        return True

    async def start(self, admin_key: str | None = None) -> str | None:
        env = {"YM_DATA_DIR": str(self.data_dir), **({"YM_ADMIN_KEY": admin_key} if admin_key else {})}
        return await ensure_admin_key(self.store, self.keys, load_settings(env))

    async def works(self, key: str) -> bool:
        return await principal_for_api_key(self.store, key) is not None

    @property
    def key_file(self) -> Path:
        return self.data_dir / "admin-key"


@pytest.fixture
async def boot(tmp_path: Path) -> AsyncIterator[Bootstrap]:
    store = SqliteStore(str(tmp_path / "ym.db"))
    await store.start()
    try:
        yield Bootstrap(store, tmp_path / "data")
    finally:
        await store.close()


async def test_a_new_YM_ADMIN_KEY_retires_the_previous_one_and_the_first_start_key(boot: Bootstrap) -> None:
    first = await boot.start()
    assert first is not None and boot.key_file.read_text().strip() == first
    assert await boot.start() is None  # an admin key exists: nothing new
    k1, k2 = tokens.new_token("api-key"), tokens.new_token("api-key")
    await boot.start(k1)
    assert await boot.works(k1) and not await boot.works(first)
    assert not boot.key_file.exists()  # it held a key that no longer works
    await boot.start(k1)  # the same key again: nothing changes
    assert await boot.works(k1)
    await boot.start(k2)
    assert await boot.works(k2) and not await boot.works(k1)
    usable = sorted((k.name, k.revoked_at is None) for k in await boot.store.list_api_keys())
    assert usable == [("admin (YM_ADMIN_KEY)", False), ("admin (YM_ADMIN_KEY)", True), ("admin (first start)", False)]


async def test_a_revoked_YM_ADMIN_KEY_is_refused_at_start_and_retires_nothing(boot: Bootstrap) -> None:
    k1, k2 = tokens.new_token("api-key"), tokens.new_token("api-key")
    await boot.start(k1)
    await boot.start(k2)
    with pytest.raises(AdminKeyError, match="revoked") as refused:
        await boot.start(k1)  # a replica with a stale YM_ADMIN_KEY
    assert k1 not in str(refused.value)
    assert await boot.works(k2)
    with pytest.raises(SettingsError, match="YM_ADMIN_KEY: not a Yardmaster API key"):
        await boot.start("ymk_short")  # refused with the other settings, before bootstrap runs


async def test_YM_ADMIN_KEY_set_to_the_first_start_key_keeps_it_and_its_file(boot: Bootstrap) -> None:
    first = await boot.start()
    assert first is not None
    await boot.start(first)
    assert await boot.works(first) and boot.key_file.read_text().strip() == first


async def test_when_every_admin_key_was_revoked_a_restart_writes_a_new_key_file(boot: Bootstrap) -> None:
    first = await boot.start()
    assert first is not None
    [rec] = await boot.store.list_api_keys()
    await boot.keys.revoke(rec.id)
    second = await boot.start()
    assert second is not None and second != first
    assert boot.key_file.read_text().strip() == second and await boot.works(second)
    assert boot.key_file.stat().st_mode & 0o777 == 0o600
