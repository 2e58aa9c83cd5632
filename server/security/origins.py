"""Whether a browser's Origin may talk to us: the client channel's handshake and the CSRF check
of cookie-authenticated requests ask the same question."""

from __future__ import annotations

from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_tuple(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) origin, default port filled in; None for anything else."""
    try:
        parts = urlsplit(url.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port or _DEFAULT_PORTS[parts.scheme]


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...], scheme: str) -> bool:
    """No Origin (not a browser), the same origin (scheme, host and port: `scheme` is this request's,
    ws/wss or http/https), or one listed in YM_ALLOWED_ORIGINS."""
    if origin is None:
        return True
    if origin in allowed or "*" in allowed:
        return True
    key = _origin_tuple(origin)
    if key is None:  # "null" (sandboxed frames, file://) and other schemes
        return False
    if any(_origin_tuple(entry) == key for entry in allowed):
        return True
    own_scheme = "https" if scheme in ("https", "wss") else "http"
    return bool(host) and _origin_tuple(f"{own_scheme}://{host}") == key
