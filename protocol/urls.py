"""Pure checks on server URLs that the agent and the clients share."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(hostname: str | None) -> bool:
    """`localhost`, `*.localhost` or a loopback address: traffic that never leaves this machine."""
    if not hostname:
        return False
    name = hostname.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plaintext_credential_warning(url: str, credential: str, advice: str) -> str | None:
    """A warning when `credential` would cross the network unencrypted: http:// or ws:// to a
    host that is not this machine. None for https://, wss:// and loopback."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "ws") or is_loopback(parts.hostname):
        return None
    return f"{url} is plain {parts.scheme}://: {credential} cross the network unencrypted; {advice}"
