"""One replica in-process: `build_app` under Starlette's TestClient (real SqliteStore, MemoryBroker,
the whole HTTP and WebSocket stack, lifespan included), with users and keys written straight into
its Store, and access tokens signed with its own key. Far faster than a server process; for what
does not need a process or several replicas."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
from starlette.testclient import TestClient

from yardmaster.server.app import build_app
from yardmaster.server.backends.records import ApiKeyRecord, Role, UserRecord
from yardmaster.server.runtime import Runtime
from yardmaster.server.security import passwords, tokens
from yardmaster.server.security.scopes import ROLE_SCOPES
from yardmaster.server.settings import Settings, load_settings
from tests.support.limits import RATES_OFF

T = TypeVar("T")
BASE_URL = "http://127.0.0.1:8080"
JOB = {"image": "alpine:3", "command": ["true"], "labels": ["nobody"]}  # stays queued: no agent has the label


class App:
    def __init__(self, client: TestClient, settings: Settings, admin_key: str) -> None:
        self.client = client
        self.settings = settings
        self.admin_key = admin_key

    @property
    def rt(self) -> Runtime:
        return self.client.app.state.runtime  # type: ignore[attr-defined,no-any-return]

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await `fn(*args)` on the app's event loop (where its Store and Broker live)."""
        portal = self.client.portal
        assert portal is not None, "use App inside in_process_app()"
        return portal.call(fn, *args)

    def request(self, method: str, path: str, key: str | None = None, body: Any = None,
                headers: dict[str, str] | None = None) -> httpx.Response:
        all_headers = dict(headers or {})
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        content = None if body is None else msgspec.json.encode(body)
        if content is not None:
            all_headers["Content-Type"] = "application/json"
        return self.client.request(method, path, content=content, headers=all_headers)

    def api(self, method: str, path: str, key: str | None = None, body: Any = None, status: int = 200) -> Any:
        """The JSON answer of a request that must get `status` (the admin key unless `key`)."""
        resp = self.request(method, path, key or self.admin_key, body)
        assert resp.status_code == status, (method, path, resp.status_code, resp.text)
        return resp.json() if resp.content else None

    # ---- things in the Store -------------------------------------------------------------------------

    def user(self, user_id: str, role: Role = "user", password: str | None = None) -> UserRecord:
        rec = UserRecord(
            id=user_id, username=user_id, email=f"{user_id}@example.test", role=role, created_at=time.time(),
            password_hash=passwords.hash_password(password) if password is not None else None,
        )
        self.run(self.rt.store.create_user, rec)
        return rec

    def key(self, owner: str, scopes: list[str] | None = None, *, expires_at: float | None = None,
            revoked: bool = False, name: str = "test") -> tuple[str, str]:
        """A key of `owner` (who must exist) with `scopes` (None: all of the owner's role).
        Returns (token, key id)."""
        user = self.run(self.rt.store.get_user, owner)
        assert user is not None, owner
        token = tokens.new_token("api-key")
        rec = ApiKeyRecord(
            id=f"key_{tokens.token_hash(token)[:12]}", token_hash=tokens.token_hash(token), hint=tokens.hint(token),
            name=name, owner=owner, role=user.role,
            scopes=sorted(ROLE_SCOPES[user.role]) if scopes is None else scopes,
            created_at=time.time(), expires_at=expires_at,
        )
        self.run(self.rt.store.put_api_key, rec)
        if revoked:
            self.run(self.rt.keys.revoke, rec.id)
        return token, rec.id

    def submit(self, key: str) -> dict[str, Any]:
        return self.api("POST", "/api/v1/jobs", key, JOB, status=201)  # type: ignore[no-any-return]

    def snapshot(self) -> dict[str, Any]:
        """Jobs, keys, users and agents as stored, less what merely using a credential updates
        (a key's last_used_at, a user's last_login_at)."""
        store = self.rt.store

        async def read() -> dict[str, Any]:
            keys = [msgspec.structs.replace(k, last_used_at=None) for k in await store.list_api_keys()]
            users = [msgspec.structs.replace(u, last_login_at=None) for u in await store.list_users(limit=10_000)]
            return {
                "jobs": await store.list_jobs(limit=10_000),
                "keys": keys,
                "users": users,
                "agents": await store.list_agents(),
            }

        return msgspec.to_builtins(self.run(read))  # type: ignore[no-any-return]


def settings_for(data_dir: Path, env: dict[str, str] | None = None) -> tuple[Settings, str]:
    admin_key = tokens.new_token("api-key")
    environ = {**RATES_OFF, "YM_DATA_DIR": str(data_dir), "YM_ADMIN_KEY": admin_key, **(env or {})}
    return load_settings(environ), admin_key


@contextmanager
def in_process_app(data_dir: Path, env: dict[str, str] | None = None) -> Iterator[App]:
    settings, admin_key = settings_for(data_dir, env)
    with TestClient(build_app(settings), base_url=BASE_URL) as client:
        yield App(client, settings, admin_key)


def signed_access_token(settings: Settings, user_id: str, role: Role, issued_ago_s: float = 0.0) -> str | None:
    """An access token signed with the server's own key (its data dir's key file, or
    YM_JWT_SECRET), issued `issued_ago_s` ago; None until server/security/jwt.py exists."""
    try:
        from yardmaster.server.security.jwt import AccessTokens, load_signing_key
    except ImportError:
        return None
    issuer = AccessTokens(
        load_signing_key(settings), issuer=settings.jwt_issuer, audience=settings.jwt_audience,
        ttl_s=settings.access_token_ttl_s, clock=lambda: time.time() - issued_ago_s,
    )
    return issuer.issue(user_id, role)[0]
