"""What a credential may do. A route declares the one scope it needs (api.auth.requires); a
principal holds the scopes of its credential, never more than its user's role allows now."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Literal, get_args

from yardmaster.server.backends.records import Role

Scope = Literal["jobs:read", "jobs:write", "sandboxes:read", "sandboxes:write", "agents:admin", "users:admin"]
ALL_SCOPES: Final[frozenset[str]] = frozenset(get_args(Scope))
ROLE_SCOPES: Final[dict[Role, frozenset[str]]] = {
    "admin": ALL_SCOPES,
    "user": frozenset({"jobs:read", "jobs:write", "sandboxes:read", "sandboxes:write"}),
}

# What a route may declare besides a scope: no credential at all, or any valid credential (routes
# about the caller's own account, whatever the credential's scopes).
PUBLIC: Final = "public"
AUTHENTICATED: Final = "authenticated"
Requirement = Literal["public", "authenticated", "jobs:read", "jobs:write", "sandboxes:read", "sandboxes:write", "agents:admin", "users:admin"]


class ScopeError(ValueError):
    """A requested scope is unknown or beyond the role; the message names it."""


def effective(role: Role, granted: Iterable[str] | None) -> frozenset[str]:
    """The scopes a credential carries now: those granted to it (None: all of the role's),
    cut down to what the user's current role allows."""
    allowed = ROLE_SCOPES[role]
    return allowed if granted is None else allowed.intersection(granted)


def check_grant(role: Role, requested: Iterable[str]) -> list[str]:
    """The requested scopes, sorted and deduplicated; ScopeError for an unknown scope or one the
    role does not have."""
    wanted = sorted(set(requested))
    for scope in wanted:
        if scope not in ALL_SCOPES:
            raise ScopeError(f"unknown scope {scope[:40]!r}; scopes are {', '.join(sorted(ALL_SCOPES))}")
        if scope not in ROLE_SCOPES[role]:
            raise ScopeError(f"scope {scope!r} is beyond the {role} role")
    return wanted
