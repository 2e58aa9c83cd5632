"""Passwords: Argon2id (argon2-cffi's RFC 9106 low-memory profile), the length rule, and
rehashing on sign-in when the parameters change. A password is never logged or returned."""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 12  # characters
MAX_BYTES = 1024  # UTF-8; Argon2 would take more, but a huge password is a denial of service

_hasher = PasswordHasher()  # argon2id, t=3, m=64 MiB, p=4
# Verified against when the account is unknown, so that "no such user" takes as long as a wrong
# password and the response time does not tell which usernames exist.
_DUMMY_HASH = _hasher.hash("yardmaster: no such account")


class PasswordRejected(ValueError):
    """The password breaks the length rule; the message says which (never the password)."""


def check_policy(password: str) -> None:
    if len(password) < MIN_LENGTH:
        raise PasswordRejected(f"a password has at least {MIN_LENGTH} characters")
    if len(password.encode()) > MAX_BYTES:
        raise PasswordRejected(f"a password has at most {MAX_BYTES} bytes")


def hash_password(password: str) -> str:
    check_policy(password)
    return _hasher.hash(password)


def verify(stored_hash: str | None, password: str) -> tuple[bool, str | None]:
    """(matches, a new hash to store when the stored one uses old parameters). With no stored
    hash (unknown user, or one without a password) this still costs one Argon2 run and fails."""
    if len(password.encode()) > MAX_BYTES:
        return False, None
    try:
        _hasher.verify(stored_hash or _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False, None
    if stored_hash is None:
        return False, None
    return True, _hasher.hash(password) if _hasher.check_needs_rehash(stored_hash) else None
