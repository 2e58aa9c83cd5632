"""The first admin API key: created on first start, printed once, written 0600 to the data dir."""

from __future__ import annotations

import os
import time
from pathlib import Path

from yardmaster.server.backends.base import Store
from yardmaster.server.backends.records import ApiKeyRecord
from yardmaster.server.core.ids import new_id
from yardmaster.server.security import tokens
from yardmaster.server.settings import Settings

ADMIN_OWNER = "admin"
ADMIN_KEY_FILE = "admin-key"


async def _put_key(store: Store, token: str, name: str) -> None:
    await store.put_api_key(
        ApiKeyRecord(
            id=new_id("key"),
            token_hash=tokens.token_hash(token),
            hint=tokens.hint(token),
            name=name,
            owner=ADMIN_OWNER,
            role="admin",
            created_at=time.time(),
        )
    )


async def ensure_admin_key(store: Store, settings: Settings) -> str | None:
    """Make sure an admin can log in. Returns a newly created key (to print once), else None."""
    if settings.admin_key:
        if not tokens.well_formed(settings.admin_key, "api-key"):
            raise ValueError("YM_ADMIN_KEY: not a Yardmaster API key (expected ymk_…; `yardmaster keygen` makes one)")
        if await store.get_api_key_by_hash(tokens.token_hash(settings.admin_key)) is None:
            await _put_key(store, settings.admin_key, "admin (YM_ADMIN_KEY)")
        return None
    if any(k.role == "admin" and k.revoked_at is None for k in await store.list_api_keys(owner=ADMIN_OWNER)):
        return None
    token = tokens.new_token("api-key")
    path = Path(settings.data_dir) / ADMIN_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: replicas sharing a data dir create one key between them, not one each.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another replica made it, or the store was reset: make sure the file's key works.
        existing = path.read_text().strip()
        if tokens.well_formed(existing, "api-key") and await store.get_api_key_by_hash(tokens.token_hash(existing)) is None:
            await _put_key(store, existing, "admin (from admin-key file)")
        return None
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    await _put_key(store, token, "admin (first start)")
    return token
