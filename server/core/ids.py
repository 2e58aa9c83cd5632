"""Identifiers that sort by creation time (48-bit ms timestamp + 80 random bits, Crockford base32).

Monotonic within a process, like ULID's monotonic mode: an id made in the same millisecond as the
previous one (or after the clock stepped back) is the previous one plus a random step, so ids made
one after another always sort in that order ("newest first" listings and FIFO ties rely on it).
Across processes, ids of the same millisecond sort in no particular order.
"""

from __future__ import annotations

import secrets
import threading
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_RANDOM_BITS = 80
_STEP_BITS = 32  # a random step keeps the next id unguessable from the previous one

_lock = threading.Lock()
_last = 0


def new_id(prefix: str) -> str:
    global _last
    with _lock:
        value = (int(time.time() * 1000) << _RANDOM_BITS) | secrets.randbits(_RANDOM_BITS)
        if value <= _last:
            value = _last + 1 + secrets.randbits(_STEP_BITS)
        _last = value
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


def id_time(ident: str) -> float | None:
    """When an id of `new_id` was made (seconds since the epoch); None if it is not one."""
    _, _, body = ident.rpartition("_")
    if len(body) != 26:
        return None
    value = 0
    for char in body:
        digit = _ALPHABET.find(char)
        if digit < 0:
            return None
        value = value << 5 | digit
    return (value >> _RANDOM_BITS) / 1000
