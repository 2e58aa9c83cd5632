"""Secret tokens in the style of GitHub's: a type prefix, a base62 body of 160 random bits and a
CRC32 checksum, so a mistyped or malformed token is refused without touching the Store and
secret scanners can recognise leaked ones. Only SHA-256 digests are stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import zlib
from typing import Literal

TokenKind = Literal["api-key", "agent", "refresh"]
PREFIXES: dict[TokenKind, str] = {"api-key": "ymk_", "agent": "yma_", "refresh": "ymr_"}

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_LEN = 28  # 62**28 > 2**166
_CHECK_LEN = 6  # base62 of a CRC32


def _base62(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        out.append(_BASE62[rem])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_LEN)


def new_token(kind: TokenKind) -> str:
    body = "".join(secrets.choice(_BASE62) for _ in range(_BODY_LEN))
    return f"{PREFIXES[kind]}{body}{_checksum(body)}"


def well_formed(token: str, kind: TokenKind) -> bool:
    """Prefix, length, alphabet and checksum; no Store access."""
    prefix = PREFIXES[kind]
    if not token.startswith(prefix) or len(token) != len(prefix) + _BODY_LEN + _CHECK_LEN:
        return False
    rest = token[len(prefix) :]
    if any(c not in _BASE62 for c in rest):
        return False
    body, check = rest[:_BODY_LEN], rest[_BODY_LEN:]
    return hmac.compare_digest(_checksum(body), check)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def hint(token: str) -> str:
    """What listings show of a token: its prefix and last four characters."""
    return f"{token[:4]}…{token[-4:]}"


def digests_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
