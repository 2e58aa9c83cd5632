"""A Broker subscription that lasts as long as its reader: one that ends is made again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from yardmaster.server.backends.base import BackendUnavailable, Broker, Subscription

log = logging.getLogger("yardmaster.subscriptions")

RETRY_MAX_S = 5.0


async def read_forever(
    broker: Broker, channel: str, subscription: Subscription, handle: Callable[[bytes], Awaitable[None]]
) -> None:
    """Hand every message on `channel` to `handle` until cancelled. A subscription that ends
    (dropped for falling behind, or closed by the Broker) is replaced; messages published in
    between are lost, and every caller recovers them from the Store. The subscription in use is
    closed when the reader is cancelled."""
    try:
        while True:
            try:
                async for data in subscription:
                    try:
                        await handle(data)
                    except Exception:
                        log.exception("message handling failed", extra={"channel": channel})
                log.warning("subscription ended; subscribing again", extra={"channel": channel})
            except Exception:
                log.exception("subscription failed; subscribing again", extra={"channel": channel})
            with contextlib.suppress(Exception):
                await subscription.close()
            subscription = await _subscribe_again(broker, channel)
    finally:
        with contextlib.suppress(Exception):
            await subscription.close()


async def _subscribe_again(broker: Broker, channel: str) -> Subscription:
    delay = 0.2
    while True:
        try:
            return await broker.subscribe(channel)
        except BackendUnavailable:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)
