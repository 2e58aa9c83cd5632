"""What the WebSocket channels share: refusing a handshake (and charging it to rate limits), sending without a task per frame
(`start_eagerly`, the client channel's fan-out), and the life of an open agent socket
(`run_socket`, `serve_counted`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any

from prometheus_client import Gauge
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from yardmaster.protocol.close_codes import CloseCode
from yardmaster.server.api.auth import charge_address, client_address, runtime
from yardmaster.server.api.errors import quota_exceeded_response, rate_limited_response
from yardmaster.server.core.quotas import QuotaExceeded
from yardmaster.server.security.rate_limits import ADDRESS, HANDSHAKE, UNAUTHENTICATED, RateLimited

log = logging.getLogger("yardmaster.channels")


async def deny(
    websocket: WebSocket, status: int, code: str, message: str, headers: dict[str, str] | None = None, **details: object
) -> None:
    """Refuse before the upgrade, with an HTTP status the client can read."""
    body = {"error": {"code": code, "message": message, **details}}
    await deny_with(websocket, JSONResponse(body, status_code=status, headers=headers))


async def deny_with(websocket: WebSocket, response: Response) -> None:
    """Refuse before the upgrade with `response` (e.g. api.errors' 429 with Retry-After)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(response)
    else:  # the ASGI server cannot send a body: a plain close becomes HTTP 403
        await websocket.close(code=CloseCode.POLICY)


async def deny_refused(websocket: WebSocket, exc: RateLimited | QuotaExceeded) -> None:
    """429 before the upgrade, with Retry-After and the body an HTTP request would get."""
    if isinstance(exc, RateLimited):
        await deny_with(websocket, rate_limited_response(exc))
    else:
        await deny_with(websocket, quota_exceeded_response(exc))


async def deny_unauthenticated(websocket: WebSocket, message: str, status: int = 401, code: str = "unauthorized") -> None:
    """Refuse a handshake whose credential failed: charged to the address's "unauthenticated"
    bucket, so a peer guessing credentials gets 429 once that is over."""
    try:
        decision = await charge_address(websocket, UNAUTHENTICATED)
    except RateLimited as exc:
        await deny_refused(websocket, exc)
        return
    await deny(websocket, status, code, message, headers=runtime(websocket).limiter.headers(UNAUTHENTICATED, decision))


async def admit_handshake(websocket: WebSocket, kind: str, subject: str) -> bool:
    """Charge an authenticated handshake to its user's or agent's bucket and its address's, all
    or none; False after refusing it with 429."""
    address = client_address(websocket)
    subjects = [(kind, subject), *([(ADDRESS, address)] if address else [])]
    try:
        await runtime(websocket).limiter.check(HANDSHAKE, subjects)
    except RateLimited as exc:
        await deny_refused(websocket, exc)
        return False
    return True


SEND_FLUSH_S = 5.0

Fail = Callable[[int, str], Awaitable[None]]


async def run_socket(
    serve: Coroutine[Any, Any, None],
    send_loop: Coroutine[Any, Any, None],
    closed: asyncio.Event,
    finish: Callable[[], Awaitable[None]],
    fail: Fail | None = None,
) -> None:
    """Run the receive loop until the peer goes or we close the socket (`closed`), then `finish`
    (which must end the send loop, by closing), and give the send loop a moment to flush.

    An unexpected exception of either loop (anything but the peer going away) is logged with
    its traceback, and `fail` closes the socket with 1011 (docs/protocol.md)."""
    sender = asyncio.create_task(send_loop)
    receiver = asyncio.create_task(serve)
    closing = asyncio.create_task(closed.wait())
    try:
        await asyncio.wait({receiver, sender, closing}, return_when=asyncio.FIRST_COMPLETED)
        error = _unexpected(receiver) or _unexpected(sender)
        if error is not None:
            log.error("unexpected error on a WebSocket; closing it with 1011", exc_info=error)
            if fail is not None:
                await fail(CloseCode.INTERNAL_ERROR, "internal error")
    finally:
        receiver.cancel()
        closing.cancel()
        await finish()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(sender, timeout=SEND_FLUSH_S)
        sender.cancel()


def _unexpected(task: asyncio.Task[None]) -> BaseException | None:
    if not task.done() or task.cancelled():
        return None
    error = task.exception()
    return None if error is None or isinstance(error, WebSocketDisconnect) else error


async def serve_counted(gauge: Gauge, run: Callable[[], Awaitable[None]]) -> None:
    """Run an accepted socket, counted in the open-sockets gauge; a peer that left is no error."""
    gauge.inc()
    try:
        await run()
    except WebSocketDisconnect:
        pass
    finally:
        gauge.dec()


def start_eagerly(coro: Coroutine[Any, Any, None]) -> Awaitable[None] | None:
    """Run `coro` now, up to the first point where it has to wait: None if it finished without
    waiting (an exception it raised meanwhile raises here), else an awaitable of the rest, to
    be awaited in a task.

    This is what Python 3.12's eager task start does, without creating a task. An ASGI send to a
    socket that can take the frame never waits, so fan-out to many sockets sends each frame
    right away; a task wake-up per socket and frame cost more than the send itself."""
    try:
        waiting_on = coro.send(None)
    except StopIteration:
        return None
    return _Rest(coro, waiting_on)


class _Rest:
    """The rest of a coroutine that `start_eagerly` started: awaiting it delegates to the
    coroutine (as `await` would), beginning with what it is waiting on."""

    __slots__ = ("_coro", "_waiting_on")

    def __init__(self, coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        self._coro = coro
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waiting_on = self._coro, self._waiting_on
        while True:
            try:
                value = yield waiting_on
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation included: the coroutine gets to handle it
                try:
                    waiting_on = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting_on = coro.send(value)
                except StopIteration:
                    return
