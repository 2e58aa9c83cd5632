"""What both WebSocket channels share: refusing a handshake, and the life of an open socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket
from yardmaster.protocol.close_codes import CloseCode


async def deny(websocket: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse before the upgrade, with an HTTP status the client can read."""
    body = {"error": {"code": code, "message": message}}
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse(body, status_code=status))
    else:  # the ASGI server cannot send a body: a plain close becomes HTTP 403
        await websocket.close(code=CloseCode.POLICY)


SEND_FLUSH_S = 5.0


async def run_socket(
    serve: Coroutine[Any, Any, None],
    send_loop: Coroutine[Any, Any, None],
    closed: asyncio.Event,
    finish: Callable[[], Awaitable[None]],
) -> None:
    """Run the receive loop until the peer goes or we close the socket (`closed`), then `finish`
    (which must end the send loop, by closing), and give the send loop a moment to flush."""
    sender = asyncio.create_task(send_loop)
    receiver = asyncio.create_task(serve)
    closing = asyncio.create_task(closed.wait())
    try:
        await asyncio.wait({receiver, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        receiver.cancel()
        closing.cancel()
        await finish()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(sender, timeout=SEND_FLUSH_S)
        sender.cancel()
