"""Sign-in sessions: password sign-in, JWT access tokens, rotating refresh tokens, logout, and
the same tokens as cookies for browsers (with a CSRF check).

A session is a family of refresh tokens: opaque `ymr_…` tokens stored as SHA-256 digests, each
good for one refresh, which spends it and issues the next of the same family. Presenting a spent
token again means two parties hold the family (one of them stole it): the whole family is
revoked. Logout revokes the family and puts the access token's `jti` on a Broker denylist until
the token expires, so every replica refuses it at once. An access token stands for its user
with the role the user has now (a disabled or deleted user's tokens stop working at once).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Final

import msgspec
from starlette.requests import HTTPConnection
from starlette.responses import Response

from yardmaster.server.api.errors import ApiError
from yardmaster.server.backends.base import Broker, Store
from yardmaster.server.backends.keys import denied_token_counter
from yardmaster.server.backends.records import RefreshTokenRecord, UserRecord
from yardmaster.server.core.audit import AuditLog
from yardmaster.server.core.ids import new_id
from yardmaster.server.security import passwords, tokens
from yardmaster.server.security.jwt import AccessTokens, load_signing_key
from yardmaster.server.security.origins import origin_allowed
from yardmaster.server.core.client_sockets import ClientSockets, Revocation
from yardmaster.server.security.principals import Principal, PrincipalCache, session_current
from yardmaster.server.security.scopes import ROLE_SCOPES
from yardmaster.server.security.throttle import LoginThrottle
from yardmaster.server.settings import Settings

ACCESS_COOKIE: Final = "ym_access"
REFRESH_COOKIE: Final = "ym_refresh"
CSRF_COOKIE: Final = "ym_csrf"
CSRF_HEADER: Final = "x-csrf-token"
REFRESH_COOKIE_PATH: Final = "/api/v1/auth"  # the refresh token travels to the sign-in routes only
STATE_CHANGING: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CACHE_PREFIX = "jwt:"  # PrincipalCache entries of access tokens, by jti (API keys: by digest)


class TokenResponse(msgspec.Struct, frozen=True, kw_only=True):
    """The OAuth 2.0 token response (RFC 6749 §5.1), plus what cookies need to know."""

    access_token: str
    token_type: str = "Bearer"
    expires_in: int
    refresh_token: str
    refresh_expires_in: int

    def body(self) -> dict[str, object]:
        return {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
        }


class SignInRefused(Exception):
    """Wrong login or password, or a disabled user: the caller is never told which."""


class Throttled(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"too many failed sign-ins; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class RefreshRefused(Exception):
    """The refresh token is unknown, spent, revoked or expired, or its user cannot sign in."""


class SessionService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        broker: Broker,
        audit: AuditLog,
        cache: PrincipalCache,
        sockets: ClientSockets,
        access: AccessTokens | None = None,
    ) -> None:
        self._settings = settings
        self._sockets = sockets
        self._store = store
        self._broker = broker
        self._audit = audit
        self._cache = cache
        self.access = access or AccessTokens(
            load_signing_key(settings),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            ttl_s=settings.access_token_ttl_s,
        )
        self.throttle = LoginThrottle(broker)

    # ---- signing in -------------------------------------------------------------------------------

    async def sign_in(self, login: str, password: str, client_address: str | None) -> tuple[UserRecord, TokenResponse]:
        """Check a password sign-in (throttled, audited) and start a session. Throttled before
        the password is looked at; SignInRefused with nothing said about why."""
        wait = await self.throttle.retry_after(login, client_address)
        if wait:
            raise Throttled(wait)
        user = await self._store.find_user(login)
        # Argon2 is ~50-100 ms of CPU: off the event loop. An unknown user costs the same.
        ok, new_hash = await asyncio.to_thread(passwords.verify, user.password_hash if user else None, password)
        if user is None or not ok or user.disabled_at is not None:
            await self.throttle.failed(login, client_address)
            await self._audit.record("login.failed", actor=None, client_address=client_address, details={"login": login[:64]})
            raise SignInRefused()
        changes: dict[str, object] = {"last_login_at": time.time()}
        if new_hash is not None:
            changes["password_hash"] = new_hash  # Argon2 parameters changed since it was hashed
        user = await self._store.update_user(user.id, changes) or user
        await self.throttle.succeeded(login, user.username, *([user.email] if user.email else []))
        await self._audit.record("login.succeeded", actor=user.id, target=user.id, client_address=client_address)
        return user, await self.issue(user, client_address)

    async def issue(self, user: UserRecord, client_address: str | None = None) -> TokenResponse:
        """A new session for `user` (already authenticated by the caller): an access token and
        the first refresh token of a new family."""
        return await self._tokens_for(user, new_id("rtf"))

    async def _tokens_for(self, user: UserRecord, family_id: str) -> TokenResponse:
        access, _ = self.access.issue(user.id, user.role)
        refresh = tokens.new_token("refresh")
        now = time.time()
        ttl = self._settings.refresh_token_ttl_s
        await self._store.put_refresh_token(
            RefreshTokenRecord(
                id=new_id("rt"),
                family_id=family_id,
                user_id=user.id,
                token_hash=tokens.token_hash(refresh),
                created_at=now,
                expires_at=now + ttl,
            )
        )
        return TokenResponse(
            access_token=access, expires_in=int(self.access.ttl_s), refresh_token=refresh, refresh_expires_in=int(ttl)
        )

    async def refresh(self, refresh_token: str, client_address: str | None = None) -> TokenResponse:
        """Spend a refresh token for a new pair (same family). A spent one presented again
        revokes its family (audited as session.reuse-detected)."""
        if not tokens.well_formed(refresh_token, "refresh"):
            raise RefreshRefused()
        now = time.time()
        rec = await self._store.spend_refresh_token(tokens.token_hash(refresh_token), now)
        if rec is None or rec.revoked_at is not None:
            raise RefreshRefused()
        if rec.used_at is not None:
            await self._store.revoke_refresh_tokens(now, family_id=rec.family_id)
            await self._audit.record(
                "session.reuse-detected",
                actor=rec.user_id,
                target=rec.user_id,
                client_address=client_address,
                details={"family_id": rec.family_id},
            )
            raise RefreshRefused()
        if rec.expires_at <= now:
            raise RefreshRefused()
        user = await self._store.get_user(rec.user_id)
        if user is None or user.disabled_at is not None:
            await self._store.revoke_refresh_tokens(now, family_id=rec.family_id)
            raise RefreshRefused()
        return await self._tokens_for(user, rec.family_id)

    # ---- signing out ------------------------------------------------------------------------------

    async def logout(self, principal: Principal | None, refresh_token: str | None, client_address: str | None = None) -> bool:
        """End a session: deny the access token `principal` came with (if one) and revoke the
        family of `refresh_token` (if given: holding it is holding the session, whoever's it is).
        False when there was nothing to end (no access token, no valid refresh token)."""
        now = time.time()
        actor = target = None
        details: dict[str, str] = {}
        if principal is not None and principal.token_id is not None and principal.token_expires_at is not None:
            await self.deny_access_token(principal.token_id, principal.token_expires_at)
            # Its client sockets (and tickets' sockets) close on every replica, as a revoked key's do.
            await self._sockets.revoke(Revocation(principal_id=principal.id, token_id=principal.token_id))
            actor = target = principal.id
        if refresh_token is not None and tokens.well_formed(refresh_token, "refresh"):
            # Spending it is harmless: its family is revoked next. It tells which family.
            rec = await self._store.spend_refresh_token(tokens.token_hash(refresh_token), now)
            if rec is not None:
                await self._store.revoke_refresh_tokens(now, family_id=rec.family_id)
                target = rec.user_id
                actor = principal.id if principal is not None else rec.user_id
                details["family_id"] = rec.family_id
        if actor is None:
            return False
        await self._audit.record("logout", actor=actor, target=target, client_address=client_address, details=details)
        return True

    async def deny_access_token(self, jti: str, expires_at: float) -> None:
        """Refuse this access token on every replica until it expires anyway."""
        ttl_ms = int((expires_at - time.time() + self.access.leeway_s) * 1000)
        if ttl_ms > 0:
            await self._broker.incr_counter(denied_token_counter(jti), ttl_ms)

    async def is_denied(self, jti: str) -> bool:
        """Whether the access token was signed out (logout) and has not expired yet."""
        return bool(await self._broker.get_counter(denied_token_counter(jti)))

    async def revoke_user(self, user_id: str) -> int:
        """Revoke every refresh token of a user (sign out all their sessions); how many.
        Their access tokens stop at once if the user is disabled or deleted, else when they expire."""
        return await self._store.revoke_refresh_tokens(time.time(), user_id=user_id)

    # ---- authenticating requests --------------------------------------------------------------------

    async def principal_for_access_token(self, token: str) -> Principal | None:
        claims = self.access.verify(token)
        if claims is None:
            return None
        # The denylist is read on every request (not cached): a logout holds at once everywhere.
        if await self.is_denied(claims.jti):
            return None
        now = time.time()
        cache_key = _CACHE_PREFIX + claims.jti
        if (cached := self._cache.get(cache_key, now)) is not None:
            return cached
        generation = self._cache.generation
        user = await self._store.get_user(claims.sub)
        if user is None or user.disabled_at is not None or not session_current(user, claims.iat):
            return None
        principal = Principal(
            id=user.id,
            role=user.role,
            scopes=ROLE_SCOPES[user.role],
            credential="access-token",
            token_id=claims.jti,
            token_issued_at=claims.iat,
            token_expires_at=claims.exp,
        )
        # Forgotten with the user's other entries when they are disabled, deleted or demoted.
        self._cache.put(cache_key, principal, claims.exp, generation)
        return principal

    async def principal_from_cookies(self, conn: HTTPConnection) -> Principal | None:
        """The caller of a browser request by its access cookie. A state-changing request must
        also pass the CSRF check (ApiError 403 `csrf`); WebSocket handshakes are GETs whose
        Origin the client channel checks itself."""
        token = conn.cookies.get(ACCESS_COOKIE)
        if not token:
            return None
        if conn.scope["type"] == "http" and conn.scope.get("method") in STATE_CHANGING:
            self.check_csrf(conn)
        return await self.principal_for_access_token(token)

    def check_origin(self, conn: HTTPConnection) -> None:
        if not origin_allowed(conn.headers.get("origin"), conn.headers.get("host"), self._settings.allowed_origins, conn.url.scheme):
            raise ApiError(403, "csrf", "cross-site request refused: origin not allowed")

    def check_csrf(self, conn: HTTPConnection) -> None:
        """Origin allowed, and the X-CSRF-Token header equal to the ym_csrf cookie (a page on
        another site can make the browser send our cookies, but cannot read them to copy one)."""
        self.check_origin(conn)
        cookie = conn.cookies.get(CSRF_COOKIE, "")
        header = conn.headers.get(CSRF_HEADER, "")
        if not cookie or not header or not secrets.compare_digest(cookie.encode(), header.encode()):
            raise ApiError(403, "csrf", "cookie-authenticated requests need an X-CSRF-Token header equal to the ym_csrf cookie")


# ---- cookies ----------------------------------------------------------------------------------------


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


def set_session_cookies(response: Response, session: TokenResponse, secure: bool, csrf_token: str | None = None) -> str:
    """Put a session into cookies: the access token (HttpOnly, Path=/), the refresh token
    (HttpOnly, to the sign-in routes only) and the CSRF token (readable by the page's script,
    which sends it back as X-CSRF-Token). Returns the CSRF token."""
    csrf = csrf_token or new_csrf_token()
    response.set_cookie(ACCESS_COOKIE, session.access_token, max_age=session.expires_in, path="/", secure=secure, httponly=True, samesite="lax")
    response.set_cookie(
        REFRESH_COOKIE, session.refresh_token, max_age=session.refresh_expires_in, path=REFRESH_COOKIE_PATH,
        secure=secure, httponly=True, samesite="lax",
    )
    response.set_cookie(CSRF_COOKIE, csrf, max_age=session.refresh_expires_in, path="/", secure=secure, httponly=False, samesite="lax")
    response.headers["Cache-Control"] = "no-store"
    return csrf


def clear_session_cookies(response: Response, secure: bool) -> None:
    for name, path in ((ACCESS_COOKIE, "/"), (REFRESH_COOKIE, REFRESH_COOKIE_PATH), (CSRF_COOKIE, "/")):
        response.delete_cookie(name, path=path, secure=secure, httponly=name != CSRF_COOKIE, samesite="lax")
