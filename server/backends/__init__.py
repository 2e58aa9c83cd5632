"""Backend selection: which Broker (and Store) implementation a server runs on."""

from __future__ import annotations

from yardmaster.server.backends.base import Broker


def make_broker(redis_url: str | None) -> Broker:
    """RedisBroker for a redis://, rediss://, unix:// or redis+sentinel:// URL; MemoryBroker when unset."""
    if not redis_url:
        from yardmaster.server.backends.memory_broker import MemoryBroker

        return MemoryBroker()
    from yardmaster.server.backends.redis_broker import RedisBroker

    return RedisBroker(redis_url)
