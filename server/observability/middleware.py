"""Pure ASGI middleware (safe for WebSockets): request ids, security headers, Host checks."""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from yardmaster.server.observability.logging import request_id
from yardmaster.server.settings import LOOPBACK_HOSTS, Settings, SettingsError

log = logging.getLogger("yardmaster.http")

_VALID_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}
# Sent on responses to https:// and wss:// requests only (native TLS, or a trusted proxy's
# X-Forwarded-Proto): a browser ignores it over plain HTTP. No includeSubDomains: the server
# cannot know what else runs under its parent domain.
HSTS = ("Strict-Transport-Security", "max-age=31536000")
_SECURE_SCHEMES = ("https", "wss")

# A WebSocket endpoint that finds this key in its scope may, once it has accepted the socket,
# put there `serve(receive, send)` and return: RequestContextMiddleware then serves the socket
# with it, passing the ASGI server's own receive and send. By then every layer below (the Host
# check, Starlette's routing and exception handling) has returned: their coroutine frames and
# closures (~5 KiB per socket) are freed, and no frame goes through their send wrappers (~15% of
# the log fan-out's CPU). Headers matter for the handshake response only, sent before this.
WEBSOCKET_HANDOFF = "yardmaster.websocket_handoff"

WebSocketServe = Callable[[Receive, Send], Awaitable[None]]


class RequestContextMiddleware:
    """Echo a well-formed X-Request-ID (or make one), put it in every log line, add security headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _VALID_ID.match(incoming) else secrets.token_hex(8)
        token = request_id.set(rid)

        async def send_with_headers(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = rid
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if scope.get("scheme") in _SECURE_SCHEMES:
                    headers.setdefault(*HSTS)
            await send(message)

        if scope["type"] == "websocket":
            scope[WEBSOCKET_HANDOFF] = None
        try:
            await self.app(scope, receive, send_with_headers)
            serve: WebSocketServe | None = scope.pop(WEBSOCKET_HANDOFF, None)
            if serve is not None:
                del send_with_headers  # not needed for an open socket
                await serve(receive, send)
        finally:
            request_id.reset(token)


WILDCARD_ADDRESSES = ("0.0.0.0", "::", "[::]", "")


def trusted_host_policy(settings: Settings) -> tuple[list[str], bool]:
    """(Host names to accept, whether any IP-address Host is accepted too).

    YM_TRUSTED_HOSTS, when set, is the whole list. Otherwise: the loopback names and YM_HOST;
    and when YM_HOST is a wildcard address (0.0.0.0, ::), which says nothing about the names
    clients use, also this machine's host names and any IP address. An IP-address Host cannot be
    DNS rebinding (that needs the attacker's name in Host), so it is safe to accept.
    """
    if settings.trusted_hosts:
        return [_host_pattern(entry) for entry in settings.trusted_hosts], False
    if settings.host.strip() in WILDCARD_ADDRESSES:
        names = list(dict.fromkeys(n.lower() for n in (*LOOPBACK_HOSTS, socket.gethostname(), socket.getfqdn()) if n))
        log.info("YM_HOST is a wildcard address and YM_TRUSTED_HOSTS is unset: accepting Host %s and IP "
                 "addresses; set YM_TRUSTED_HOSTS to the names clients use", ", ".join(names))
        return names, True
    return [_host_pattern(entry) for entry in settings.effective_trusted_hosts()], False


def _host_pattern(entry: str) -> str:
    """A YM_TRUSTED_HOSTS entry as TrustedHostMiddleware compares it: lower case, IPv6 in brackets."""
    pattern = entry.strip().lower()
    if pattern == "*" or (pattern.startswith("*.") and "*" not in pattern[1:]):
        return pattern
    try:
        return f"[{ipaddress.IPv6Address(pattern.strip('[]'))}]"
    except ValueError:
        pass
    if not pattern or any(c in pattern for c in ":/*@ "):
        raise SettingsError("YM_TRUSTED_HOSTS: entries are host names or addresses without scheme or port, "
                            "'*.example.com', or '*'")
    return pattern


def is_ip_address_host(host_header: str | None) -> bool:
    """Whether a Host header names an IP address (with or without a port) rather than a DNS name."""
    if not host_header:
        return False
    try:
        parts = urlsplit("//" + host_header)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
        ipaddress.ip_address(parts.hostname or "")
    except ValueError:
        return False
    return True


class HostCheckMiddleware(TrustedHostMiddleware):
    """Starlette's Host check (HTTP 400 for HTTP requests and WebSocket handshakes alike), which
    may also let every IP-address Host through (see `trusted_host_policy`)."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], any_ip_address: bool = False) -> None:
        super().__init__(app, allowed_hosts=allowed_hosts, www_redirect=False)
        self.any_ip_address = any_ip_address

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.any_ip_address
            and scope["type"] in ("http", "websocket")
            and is_ip_address_host(Headers(scope=scope).get("host"))
        ):
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
