"""Accounts: creating users, their profiles, roles, disabling and deleting them, and passwords.

Disabling or deleting a user takes away every way in at once: the user record says so first (so
a Store lookup refuses them from then on), then their API keys and refresh tokens are revoked,
and one revocation on the Broker closes their client sockets and empties the principal caches on
every replica. Every change is audited; the HTTP API only translates to and from these calls.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Final, Literal

import msgspec

from yardmaster.server.backends.base import Conflict, Store
from yardmaster.server.backends.records import Role, UserRecord
from yardmaster.server.core.audit import AuditLog
from yardmaster.server.core.client_sockets import ClientSockets, Revocation
from yardmaster.server.core.ids import new_id
from yardmaster.server.core.keys import KeyService
from yardmaster.server.security import passwords
from yardmaster.server.security.bootstrap import ADMIN_OWNER

METADATA_MAX_BYTES: Final = 16 * 1024  # the JSON encoding of a user's metadata

_NO_CONTROL = r"^[^\x00-\x1f\x7f]*\Z"  # names end up in listings and log lines: no control characters
Username = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")]
Email = Annotated[str, msgspec.Meta(max_length=254, pattern=r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+\.[^@\s\x00-\x1f\x7f]+\Z")]
Name = Annotated[str, msgspec.Meta(max_length=100, pattern=_NO_CONTROL)]
ImageUrl = Annotated[str, msgspec.Meta(max_length=2048, pattern=r"^[hH][tT][tT][pP][sS]?://[^\s\x00-\x1f\x7f]+\Z")]
Phone = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[+0-9 ()-]+\Z")]
Password = str  # the rules (passwords.check_policy) give their own message


class Profile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What a user may change about themselves (PATCH /api/v1/users/me): a field left out is
    unchanged; image_url and phone may be null to clear them."""

    first_name: Name | msgspec.UnsetType = msgspec.UNSET
    last_name: Name | msgspec.UnsetType = msgspec.UNSET
    image_url: ImageUrl | None | msgspec.UnsetType = msgspec.UNSET
    phone: Phone | None | msgspec.UnsetType = msgspec.UNSET
    metadata: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class _Account(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What every new account may be given."""

    username: Username
    email: Email | None = None
    first_name: Name = ""
    last_name: Name = ""
    image_url: ImageUrl | None = None
    phone: Phone | None = None
    metadata: dict[str, Any] = {}


class NewUser(_Account, kw_only=True):
    """A user to create (POST /api/v1/users; self-registration and OIDC make one too)."""

    password: Password | None = None
    role: Role = "user"


class Registration(_Account, kw_only=True):
    """Self-registration: a password is required and the role is always "user"."""

    password: Password


class AdminChange(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What an admin changes about a user (PATCH /api/v1/users/{id})."""

    role: Role | msgspec.UnsetType = msgspec.UNSET
    disabled: bool | msgspec.UnsetType = msgspec.UNSET


class PasswordChange(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    new_password: Password
    current_password: Password | None = None


# ---- refusals: the API maps each to a status ------------------------------------------------------


class UserError(Exception):
    status: int = 400
    code: str = "invalid"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidUser(UserError):
    status, code = 422, "invalid-user"


class UserNotFound(UserError):
    status, code = 404, "not-found"

    def __init__(self) -> None:
        super().__init__("no such user")


class UserConflict(UserError):
    """A unique field is taken (code "conflict", naming the field)."""

    status, code = 409, "conflict"


class BootstrapAdmin(UserError):
    status, code = 409, "bootstrap-admin"

    def __init__(self, what: str) -> None:
        super().__init__(f"the bootstrap admin cannot be {what}")


class OwnAccount(UserError):
    status, code = 409, "own-account"

    def __init__(self, what: str) -> None:
        super().__init__(f"an admin cannot {what} their own account; ask another admin")


class WrongPassword(UserError):
    status, code = 403, "wrong-password"

    def __init__(self) -> None:
        super().__init__("the current password is wrong", field="current_password")


# ---- pure checks ------------------------------------------------------------------------------------


def check_metadata(metadata: dict[str, Any]) -> None:
    if len(msgspec.json.encode(metadata)) > METADATA_MAX_BYTES:
        raise InvalidUser(f"metadata is over {METADATA_MAX_BYTES} bytes as JSON", field="metadata")


def check_password(password: str, field: str = "password") -> None:
    try:
        passwords.check_policy(password)
    except passwords.PasswordRejected as exc:
        raise InvalidUser(str(exc), field=field) from None


async def _hash(password: str, field: str = "password") -> str:
    check_password(password, field)
    # Argon2 takes tens of milliseconds of CPU: never on the event loop.
    return await asyncio.to_thread(passwords.hash_password, password)


Action = Literal["user.created", "user.registered", "oidc.user-created"]


class UserService:
    def __init__(self, store: Store, keys: KeyService, sockets: ClientSockets, audit: AuditLog) -> None:
        self._store = store
        self._keys = keys
        self._sockets = sockets
        self._audit = audit

    # ---- reading ----------------------------------------------------------------------------------

    async def get(self, user_id: str) -> UserRecord:
        user = await self._store.get_user(user_id)
        if user is None:
            raise UserNotFound()
        return user

    async def list(self, *, limit: int = 100, after: str | None = None) -> list[UserRecord]:
        return await self._store.list_users(limit=limit, after=after)

    # ---- creating ---------------------------------------------------------------------------------

    async def create(
        self,
        new: NewUser,
        *,
        actor: str | None,
        client_address: str | None = None,
        action: Action = "user.created",
        oidc_issuer: str | None = None,
        oidc_subject: str | None = None,
    ) -> UserRecord:
        """Store a new user (the password hashed); `actor` None: the new user is the actor (a
        self-registration or a first OIDC sign-in)."""
        check_metadata(new.metadata)
        password_hash = None if new.password is None else await _hash(new.password)
        user = UserRecord(
            id=new_id("usr"),
            username=new.username,
            email=new.email,
            first_name=new.first_name,
            last_name=new.last_name,
            image_url=new.image_url,
            phone=new.phone,
            metadata=new.metadata,
            role=new.role,
            password_hash=password_hash,
            oidc_issuer=oidc_issuer,
            oidc_subject=oidc_subject,
            created_at=time.time(),
        )
        try:
            await self._store.create_user(user)
        except Conflict as exc:
            raise UserConflict(f"{exc.field} is already taken", field=exc.field) from None
        await self._audit.record(
            action,
            actor=user.id if actor is None else actor,
            target=user.id,
            client_address=client_address,
            details={"username": user.username, "role": user.role},
        )
        return user

    async def register(self, reg: Registration, *, client_address: str | None) -> UserRecord:
        new = NewUser(**msgspec.structs.asdict(reg), role="user")
        return await self.create(new, actor=None, client_address=client_address, action="user.registered")

    # ---- changing -----------------------------------------------------------------------------------

    async def update_profile(self, user_id: str, profile: Profile, *, client_address: str | None) -> UserRecord:
        changes = {f: v for f, v in msgspec.structs.asdict(profile).items() if v is not msgspec.UNSET}
        if "metadata" in changes:
            check_metadata(changes["metadata"])
        if not changes:
            return await self.get(user_id)
        user = await self._store.update_user(user_id, changes)
        if user is None:
            raise UserNotFound()
        await self._audit.record(
            "user.updated", actor=user_id, target=user_id, client_address=client_address, details={"fields": sorted(changes)}
        )
        return user

    async def admin_update(self, user_id: str, change: AdminChange, *, actor: str, client_address: str | None) -> UserRecord:
        """Set a user's role and/or disable or enable them. Neither the bootstrap admin nor the
        acting admin can be demoted or disabled (so an admin is always left)."""
        user = await self.get(user_id)
        demote = change.role is not msgspec.UNSET and change.role != "admin" and user.role == "admin"
        disable = change.disabled is True and user.disabled_at is None
        if demote or disable:
            self._guard(user_id, actor, "demoted" if demote else "disabled", "demote" if demote else "disable")
        if change.role is not msgspec.UNSET and change.role != user.role:
            old_role = user.role
            user = await self._set(user_id, {"role": change.role})
            await self._audit.record(
                "user.role-changed",
                actor=actor,
                target=user_id,
                client_address=client_address,
                details={"from": old_role, "to": user.role},
            )
            # Open sockets carry the old role (a demoted admin's still see every job's events):
            # close them on every replica, and every principal cache forgets the old role, so
            # the new one applies at once everywhere; clients reconnect with it.
            await self._sockets.revoke(Revocation(principal_id=user_id))
        if change.disabled is True and user.disabled_at is None:
            user = await self._set(user_id, {"disabled_at": time.time()})
            keys, sessions = await self._revoke_everything(user_id)
            await self._audit.record(
                "user.disabled",
                actor=actor,
                target=user_id,
                client_address=client_address,
                details={"keys_revoked": keys, "sessions_revoked": sessions},
            )
        elif change.disabled is False and user.disabled_at is not None:
            user = await self._set(user_id, {"disabled_at": None})
            await self._audit.record("user.enabled", actor=actor, target=user_id, client_address=client_address)
        return user

    async def delete(self, user_id: str, *, actor: str, client_address: str | None) -> None:
        """Revoke the user's keys and sessions, close their sockets, delete the record. Their
        jobs keep the owner id (and stay visible to admins)."""
        user = await self.get(user_id)
        self._guard(user_id, actor, "deleted", "delete")
        # Disabled first: a request racing the deletion finds the user refused, not half-deleted.
        if user.disabled_at is None:
            await self._set(user_id, {"disabled_at": time.time()})
        keys, sessions = await self._revoke_everything(user_id)
        await self._store.delete_user(user_id)
        await self._audit.record(
            "user.deleted",
            actor=actor,
            target=user_id,
            client_address=client_address,
            details={"username": user.username, "keys_revoked": keys, "sessions_revoked": sessions},
        )

    async def change_password(self, user_id: str, change: PasswordChange, *, client_address: str | None) -> None:
        """Set a new password. A user who has one must give it; one who has none (the bootstrap
        admin at first, a user who signs in only through OIDC) sets one with the new password
        alone. Every session of the user ends at once, this one included: their refresh tokens
        are revoked, access tokens issued before now are refused, and sockets opened with them
        close on every replica. API keys are left alone."""
        user = await self.get(user_id)
        check_password(change.new_password, "new_password")
        if user.password_hash is not None:
            if change.current_password is None:
                raise InvalidUser("the current password is required", field="current_password")
            ok, _ = await asyncio.to_thread(passwords.verify, user.password_hash, change.current_password)
            if not ok:
                raise WrongPassword()
        new_hash = await _hash(change.new_password, "new_password")
        await self._set(user_id, {"password_hash": new_hash, "sessions_valid_after": time.time()})
        sessions = await self._store.revoke_refresh_tokens(time.time(), user_id=user_id)
        await self._sockets.revoke(Revocation(principal_id=user_id, access_tokens=True))
        await self._audit.record(
            "user.password-changed",
            actor=user_id,
            target=user_id,
            client_address=client_address,
            details={"sessions_revoked": sessions},
        )

    # ---- plumbing -----------------------------------------------------------------------------------

    @staticmethod
    def _guard(user_id: str, actor: str, done: str, do: str) -> None:
        if user_id == ADMIN_OWNER:
            raise BootstrapAdmin(done)
        if user_id == actor:
            raise OwnAccount(do)

    async def _set(self, user_id: str, changes: dict[str, Any]) -> UserRecord:
        try:
            user = await self._store.update_user(user_id, changes)
        except Conflict as exc:
            raise UserConflict(f"{exc.field} is already taken", field=exc.field) from None
        if user is None:
            raise UserNotFound()
        return user

    async def _revoke_everything(self, user_id: str) -> tuple[int, int]:
        """Revoke the user's API keys and refresh tokens and close their sockets everywhere;
        (keys revoked, refresh tokens revoked)."""
        keys = 0
        for key in await self._keys.list(owner=user_id):
            if key.revoked_at is None:
                await self._keys.revoke(key.id)
                keys += 1
        sessions = await self._store.revoke_refresh_tokens(time.time(), user_id=user_id)
        # Also when there was no key: sockets opened with an access token or a cookie close too.
        await self._sockets.revoke(Revocation(principal_id=user_id))
        return keys, sessions
