"""The connection limits uvicorn does not have, as small subclasses of its protocol classes.

* `HeadTimeoutHttpProtocol`: uvicorn has no timeout for the request head, so a client that
  sends half a request line holds its socket (and a `limit_concurrency` slot) forever. This
  protocol closes a connection whose request head is not complete `head_timeout_s` after the
  connection was made (or, on a kept-alive connection, after the next request began). The
  WebSocket upgrade request is such a head, so handshakes are covered too. It also applies
  `limit_concurrency` to WebSocket upgrades, which uvicorn checks for plain requests only.
* `QuietWebSocketProtocol`: a handshake refused with an HTTP response logs one INFO line
  (uvicorn's own), not also an ERROR ("ASGI callable returned without completing handshake",
  uvicorn forgets to mark a denial response as the end of the handshake) and a second INFO line
  from the websockets state machine, whose DEBUG output would also carry handshake headers
  (bearer tokens): it gets a logger of its own that stays at WARNING.

Built for httptools (in `uvicorn[standard]`) and the websockets-sansio implementation.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

if TYPE_CHECKING:
    from uvicorn._types import ASGISendEvent

log = logging.getLogger("yardmaster.transport")

# The websockets state machine of each server socket logs here; INFO would be one line per
# socket opened, refused and closed, DEBUG every header and frame.
_WIRE_LOG = logging.getLogger("yardmaster.transport.wire")
_WIRE_LOG.setLevel(logging.WARNING)

_OVERLOADED_BODY = b"Service Unavailable"


class HeadTimeoutHttpProtocol(HttpToolsProtocol):
    head_timeout_s: float = 10.0  # set per server by `http_protocol_class`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_head_timer()  # no-op for the first request: its timer runs since connection_made

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            self.logger.warning("Exceeded concurrency limit.")  # the words uvicorn uses for HTTP
            self._send_overloaded()
            return
        super().handle_websocket_upgrade()

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        log.debug("closing a connection that sent no complete request head in %.1fs", self.head_timeout_s)
        self.transport.close()

    def _send_overloaded(self) -> None:
        head = [b"HTTP/1.1 503 Service Unavailable\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(_OVERLOADED_BODY),
            b"connection: close\r\n\r\n",
            _OVERLOADED_BODY,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()


def http_protocol_class(head_timeout_s: float) -> type[asyncio.Protocol]:
    """The HTTP protocol class to pass as uvicorn's `http=`, with this server's head timeout."""
    return type("HeadTimeoutHttpProtocol", (HeadTimeoutHttpProtocol,), {"head_timeout_s": head_timeout_s})


class QuietWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn.logger = _WIRE_LOG
        self.conn.debug = False

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True  # the denial response was the whole handshake
