"""What both WebSocket channels share: refusing a handshake with an HTTP response."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket


async def deny(websocket: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse before the upgrade, with an HTTP status the client can read."""
    body = {"error": {"code": code, "message": message}}
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse(body, status_code=status))
    else:  # the ASGI server cannot send a body: a plain close becomes HTTP 403
        await websocket.close(code=1008)


def header(websocket: WebSocket, name: str) -> str | None:
    return websocket.headers.get(name)
