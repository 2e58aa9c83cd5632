"""pytest plugin: a session-scoped real `redis-server` and per-test RedisBrokers.

Fixtures:
* `redis_server` (session): one server for the whole run; tests isolate themselves by key prefix.
* `redis_url`: its URL.
* `redis_broker`: a factory `make(url=None, **kwargs) -> RedisBroker` giving each broker a key
  prefix unique to the test (pass key_prefix= to share one between brokers); all are closed at
  teardown.
* `own_redis_server`: a private server for one test, which may stop and restart it.

Without redis-server the tests are skipped, or failed when CI=true.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from yardmaster.server.backends.redis_broker import RedisBroker
from tests.support.redis_server import RedisServer, RedisServerUnavailable

RedisBrokerFactory = Callable[..., RedisBroker]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _unavailable(exc: Exception) -> None:
    reason = f"no redis-server: {exc}"
    if _in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def _started() -> RedisServer:
    try:
        server = RedisServer()
        server.start()
    except RedisServerUnavailable as exc:
        _unavailable(exc)
        raise  # unreachable: skip/fail raise
    return server


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "redis: needs redis-server")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = _started()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def own_redis_server() -> Iterator[RedisServer]:
    server = _started()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def redis(own_redis_server: RedisServer) -> RedisServer:
    """This test's own redis-server, by a short name (a `cluster` of the same test starts after it)."""
    return own_redis_server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
async def redis_broker(redis_server: RedisServer) -> AsyncIterator[RedisBrokerFactory]:
    prefix = f"ymtest:{uuid.uuid4().hex[:10]}:"
    made: list[RedisBroker] = []

    def make(url: str | None = None, **kwargs: Any) -> RedisBroker:
        kwargs.setdefault("key_prefix", prefix)
        broker = RedisBroker(url or redis_server.url, **kwargs)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        await broker.close()
