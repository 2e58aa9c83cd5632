"""The admin API key that lets the first admin in.

Either `YM_ADMIN_KEY` (one key for every replica), or, without it, a key created on first start,
printed once and written 0600 to `$YM_DATA_DIR/admin-key`. The keys made here carry names that
keys made through the API cannot have (they contain spaces and parentheses), so a different
`YM_ADMIN_KEY` retires every key bootstrap made before: the previous `YM_ADMIN_KEY` and the
first-start file key (whose file is removed). Keys created through the API are left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from yardmaster.server.backends.base import Conflict, Store
from yardmaster.server.backends.records import ApiKeyRecord, UserRecord
from yardmaster.server.backends.stores import ensure_private_dir
from yardmaster.server.core.ids import new_id
from yardmaster.server.core.keys import KeyService
from yardmaster.server.security import tokens
from yardmaster.server.settings import Settings

log = logging.getLogger("yardmaster.bootstrap")

ADMIN_OWNER = "admin"  # id of the bootstrap admin user, whom every bootstrap key belongs to
ADMIN_USERNAMES = ("admin", "bootstrap-admin")  # the second if someone else took "admin"
ADMIN_KEY_FILE = "admin-key"
ENV_KEY_NAME = "admin (YM_ADMIN_KEY)"
FIRST_START_NAME = "admin (first start)"
FROM_FILE_NAME = "admin (from admin-key file)"
BOOTSTRAP_NAMES = frozenset({ENV_KEY_NAME, FIRST_START_NAME, FROM_FILE_NAME})


class AdminKeyError(ValueError):
    """YM_ADMIN_KEY cannot be used; the message says why (never the key)."""


async def _put_key(store: Store, token: str, name: str) -> None:
    digest = tokens.token_hash(token)
    rec = ApiKeyRecord(
        id=new_id("key"),
        token_hash=digest,
        hint=tokens.hint(token),
        name=name,
        owner=ADMIN_OWNER,
        role="admin",
        created_at=time.time(),
    )
    try:
        await store.put_api_key(rec)
    except Exception:
        # Another replica starting at the same moment stored the same key first (token hashes
        # are unique): that is what we wanted.
        if await store.get_api_key_by_hash(digest) is None:
            raise


async def ensure_admin_user(store: Store) -> None:
    """The bootstrap admin user exists (made on first start; replicas starting at once agree)."""
    if await store.get_user(ADMIN_OWNER) is not None:
        return
    for username in ADMIN_USERNAMES:
        try:
            await store.create_user(UserRecord(id=ADMIN_OWNER, username=username, role="admin", created_at=time.time()))
            return
        except Conflict as exc:
            if exc.field == "id":
                return  # another replica made it first
    raise AdminKeyError(f"cannot create the bootstrap admin user: the usernames {', '.join(ADMIN_USERNAMES)} are taken")


async def ensure_admin_key(store: Store, keys: KeyService, settings: Settings) -> str | None:
    """Make sure an admin can log in. Returns a newly created key (to print once), else None."""
    await ensure_admin_user(store)
    if settings.admin_key:
        await _use_configured_key(store, keys, settings)
        return None
    if any(k.role == "admin" and k.revoked_at is None for k in await store.list_api_keys(owner=ADMIN_OWNER)):
        return None
    path = Path(settings.data_dir) / ADMIN_KEY_FILE
    ensure_private_dir(str(path.parent))
    for _ in range(2):
        token = tokens.new_token("api-key")
        try:
            # O_EXCL: replicas sharing a data dir create one key between them, not one each.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            # Another replica made it, or the store was reset: make sure the file's key works.
            existing = path.read_text().strip()
            if not tokens.well_formed(existing, "api-key"):
                return None
            rec = await store.get_api_key_by_hash(tokens.token_hash(existing))
            if rec is None:
                await _put_key(store, existing, FROM_FILE_NAME)
                return None
            if rec.revoked_at is None:
                return None
            # Every admin key was revoked, this one too: replace it, so a restart lets an admin in.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        await _put_key(store, token, FIRST_START_NAME)
        return token
    return None


async def _use_configured_key(store: Store, keys: KeyService, settings: Settings) -> None:
    configured = settings.admin_key or ""
    if not tokens.well_formed(configured, "api-key"):
        raise AdminKeyError("YM_ADMIN_KEY: not a Yardmaster API key (expected ymk_…; `yardmaster keygen` makes one)")
    digest = tokens.token_hash(configured)
    rec = await store.get_api_key_by_hash(digest)
    if rec is None:
        await _put_key(store, configured, ENV_KEY_NAME)
    elif rec.revoked_at is not None:
        # Refusing to start also keeps a replica with a stale YM_ADMIN_KEY from retiring the new one.
        raise AdminKeyError("YM_ADMIN_KEY: this key has been revoked; make a new one with `yardmaster keygen`")
    elif rec.role != "admin":
        raise AdminKeyError("YM_ADMIN_KEY: this key exists and is not an admin key")
    for other in await store.list_api_keys(owner=ADMIN_OWNER):
        if other.name in BOOTSTRAP_NAMES and other.token_hash != digest and other.revoked_at is None:
            await keys.revoke(other.id)
            log.warning("a previous bootstrap admin key was revoked", extra={"key_id": other.id, "key_name": other.name})
    path = Path(settings.data_dir) / ADMIN_KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        if path.read_text().strip() != configured:
            path.unlink()  # its key no longer works (or never did): nobody should copy it from here
