"""API keys and client sockets for credential tests."""

from __future__ import annotations

import asyncio
import time

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.support.cluster import ServerProcess
from yardmaster.server.backends.base import Conflict
from yardmaster.server.backends.records import ApiKeyRecord, Role, UserRecord
from yardmaster.server.backends.sqlite_store import SqliteStore
from yardmaster.server.security import tokens


def put_key(server: ServerProcess, owner: str, role: Role) -> tuple[str, str]:
    """A key of user `owner` (made too if missing, with `role`), written straight into the
    server's SQLite file (shared by processes on one host). Returns (token, key id)."""
    token = tokens.new_token("api-key")
    record = ApiKeyRecord(
        id=f"key_{owner}", token_hash=tokens.token_hash(token), hint=tokens.hint(token), name=owner,
        owner=owner, role=role, created_at=time.time(),
    )

    async def put() -> None:
        store = SqliteStore(str(server.data_dir / "yardmaster.db"))
        await store.start()
        try:
            try:
                await store.create_user(UserRecord(id=owner, username=owner, role=role, created_at=time.time()))
            except Conflict:
                pass
            await store.put_api_key(record)
        finally:
            await store.close()

    asyncio.run(put())
    return token, record.id


def ws_ticket(server: ServerProcess, key: str | None = None) -> str:
    return str(server.api("POST", "/api/v1/ws-tickets", key=key)["ticket"])


def client_socket(server: ServerProcess, key: str | None = None, ticket: str | None = None) -> ClientConnection:
    """An open `/ws/client` socket, authenticated by a ticket or else by `key` as a bearer."""
    if ticket is not None:
        return connect(f"{server.ws_url}/ws/client?ticket={ticket}", open_timeout=10).__enter__()
    headers = {"Authorization": f"Bearer {key}"}
    return connect(f"{server.ws_url}/ws/client", additional_headers=headers, open_timeout=10).__enter__()


def close_code(ws: ClientConnection, timeout: float) -> int | None:
    """Wait (reading) for the server to close the socket: its close code, or None if it did not."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ws.recv(max(0.05, deadline - time.monotonic()))
    except ConnectionClosed:
        return ws.close_code
    except TimeoutError:
        pass
    return None
