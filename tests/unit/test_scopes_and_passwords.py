"""Pure rules of issue 8's foundation: scopes against roles, the password rule and Argon2id."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from yardmaster.server.security import passwords
from yardmaster.server.security.scopes import ALL_SCOPES, ROLE_SCOPES, ScopeError, check_grant, effective


def test_a_user_role_has_no_admin_scopes() -> None:
    assert ROLE_SCOPES["admin"] == ALL_SCOPES
    assert "agents:admin" not in ROLE_SCOPES["user"] and "users:admin" not in ROLE_SCOPES["user"]
    assert {"jobs:read", "jobs:write"} <= ROLE_SCOPES["user"]


def test_effective_scopes_never_exceed_the_role_now() -> None:
    # A key made by an admin with admin scopes, whose owner was demoted since.
    assert effective("user", ["jobs:read", "users:admin"]) == {"jobs:read"}
    assert effective("admin", None) == ALL_SCOPES  # keys from before scopes: all of the role
    assert effective("user", None) == ROLE_SCOPES["user"]
    assert effective("admin", []) == frozenset()


def test_check_grant_names_the_refused_scope() -> None:
    assert check_grant("user", ["jobs:write", "jobs:read", "jobs:read"]) == ["jobs:read", "jobs:write"]
    with pytest.raises(ScopeError, match="'users:admin' is beyond the user role"):
        check_grant("user", ["jobs:read", "users:admin"])
    with pytest.raises(ScopeError, match="unknown scope 'jobs:delete'"):
        check_grant("admin", ["jobs:delete"])


def test_password_length_rule() -> None:
    with pytest.raises(passwords.PasswordRejected, match="at least 12 characters"):
        passwords.hash_password("short pass")
    with pytest.raises(passwords.PasswordRejected, match="at most 1024 bytes"):
        passwords.hash_password("é" * 513)  # 513 characters, 1,026 bytes
    assert passwords.hash_password("twelve chars").startswith("$argon2id$")


def test_verify_and_rehash_when_parameters_change() -> None:
    stored = passwords.hash_password("correct horse battery")
    assert passwords.verify(stored, "correct horse battery") == (True, None)
    assert passwords.verify(stored, "wrong horse battery") == (False, None)
    old = PasswordHasher(time_cost=1, memory_cost=8192).hash("correct horse battery")
    ok, new_hash = passwords.verify(old, "correct horse battery")
    assert ok and new_hash is not None and new_hash != old
    assert passwords.verify(new_hash, "correct horse battery") == (True, None)


def test_verify_without_a_hash_or_with_a_huge_password_fails() -> None:
    assert passwords.verify(None, "anything at all") == (False, None)
    assert passwords.verify("not a hash", "anything at all") == (False, None)
    stored = passwords.hash_password("correct horse battery")
    assert passwords.verify(stored, "x" * 2000) == (False, None)
