"""OpenID Connect single sign-on: authorization code with PKCE (S256), `state` and `nonce`, the ID
token's signature checked against the provider's JWKS and its claims (iss, aud, exp, iat, nonce).

authlib's Starlette client does the protocol: discovery, the authorization URL (PKCE verifier and
nonce included), the code exchange with client authentication, and the ID token check
(`parse_id_token`: signature by a key of the provider's JWKS, fetched again once for an unknown
`kid`; nonce; expiry). Two things it does not do by default are added here: `aud` must contain
our client id (authlib alone accepts another audience when `azp` names us), and the discovery
document must name the configured issuer.

The sign-in under way lives in the Broker, not in a session cookie: any replica finishes a
sign-in another began, and no cookie-signing secret has to be shared between replicas. It is
bound to the browser that began it by a random value in an HttpOnly cookie: the Broker entry's
name is the hash of state and that value, so a callback URL replayed from another browser (or a
login-CSRF link carrying an attacker's code) finds nothing. Taking the entry is atomic, so a
callback works once.

Accounts: a user is matched by (issuer, subject) only, never by email (an email claim alone must
not hand over an existing account). A first sign-in creates a user when YM_OIDC_ALLOW_SIGNUP is
on; the email is kept only when the provider says it is verified.
"""

from __future__ import annotations

import importlib
import logging
import re
import secrets
import time
import unicodedata
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import msgspec
from joserfc.errors import JoseError

from yardmaster.server.backends.base import Broker, Store
from yardmaster.server.backends.keys import PRESENCE_OIDC_STATE
from yardmaster.server.backends.records import UserRecord
from yardmaster.server.core.audit import AuditLog
from yardmaster.server.core.users import Email, ImageUrl, Name, NewUser, Username, UserConflict, UserService
from yardmaster.server.security import tokens
from yardmaster.server.settings import Settings

with warnings.catch_warnings():
    # authlib warns at import that it would rather use `httpx2`; httpx is what we have. (Its
    # deprecate module turns its warnings "always" on when imported: import it first.)
    importlib.import_module("authlib.deprecate")

    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from authlib.integrations.base_client.errors import OAuthError
    from authlib.integrations.starlette_client import OAuth, StarletteOAuth2App

log = logging.getLogger("yardmaster.oidc")

STATE_TTL_S: Final = 600.0  # a sign-in must come back from the provider within 10 minutes
BINDING_COOKIE: Final = "ym_oidc"
SCOPE: Final = "openid email profile"
LEEWAY_S: Final = 60  # clock skew allowed on exp/iat
HTTP_TIMEOUT_S: Final = 10.0
# Asymmetric algorithms only, whatever the discovery document lists ("none" and HS* never).
SIGNING_ALGS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_MAX_NEXT = 2048
_MAX_STATE = 512


class OidcRefused(Exception):
    """A sign-in that cannot go on; `status` and `code` become the API error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Begun:
    url: str  # the provider's authorization URL to redirect the browser to
    binding: str  # the value of the BINDING_COOKIE to set


@dataclass(frozen=True)
class SignedIn:
    user: UserRecord
    next_path: str
    created: bool


class _Pending(msgspec.Struct, frozen=True):
    redirect_uri: str
    code_verifier: str
    nonce: str
    next_path: str


# ---- pure rules -------------------------------------------------------------------------------------


def safe_next(value: str | None) -> str:
    """`value` if it is a path on this origin ("/…", not "//…", no scheme or host, no backslash
    or control character, which some browsers read as another origin); else "/"."""
    if not value or len(value) > _MAX_NEXT or not value.startswith("/") or value.startswith("//"):
        return "/"
    if "\\" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


def _valid(value: Any, kind: Any) -> Any:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError:
        return None


def verified_email(claims: Mapping[str, Any]) -> str | None:
    """The email claim when the provider vouches for it (`email_verified` true) and it is well formed."""
    verified = claims.get("email_verified")
    if verified is not True and verified != "true":  # some providers send the string
        return None
    email = claims.get("email")
    return _valid(email.strip(), Email) if isinstance(email, str) else None


def domain_allowed(email: str | None, allowed: tuple[str, ...]) -> bool:
    """With no allowed domains, anyone; else only a verified email in one of them (exactly; a
    subdomain is not its parent)."""
    if not allowed:
        return True
    if email is None:
        return False
    domain = email.rpartition("@")[2].casefold()
    return domain in {d.casefold().lstrip("@") for d in allowed}


_NOT_USERNAME = re.compile(r"[^A-Za-z0-9._-]+")


def username_base(claims: Mapping[str, Any]) -> str:
    """A username from preferred_username, else the email's local part, else "user": ASCII,
    lower case, only letters, digits, '.', '_' and '-', starting with a letter or digit."""
    email = claims.get("email")
    sources = [claims.get("preferred_username"), email.partition("@")[0] if isinstance(email, str) else None]
    for source in sources:
        if not isinstance(source, str):
            continue
        ascii_only = unicodedata.normalize("NFKD", source).encode("ascii", "ignore").decode()
        name = _NOT_USERNAME.sub("-", ascii_only).lower().lstrip("._-")[:48].rstrip("._-")
        if name:
            return name
    return "user"


def username_candidates(base: str) -> Iterator[str]:
    yield base
    for n in range(2, 10):
        yield f"{base}-{n}"
    for _ in range(5):
        yield f"{base}-{secrets.token_hex(3)}"


def _text(value: Any, kind: Any, limit: int) -> Any:
    if not isinstance(value, str):
        return None
    cleaned = "".join(c for c in value.strip() if ord(c) >= 0x20 and ord(c) != 0x7F)[:limit]
    return _valid(cleaned, kind)


def new_user_from(claims: Mapping[str, Any], username: str, email: str | None) -> NewUser:
    """The profile of a user created on first sign-in; a claim that does not fit is left out."""
    first = _text(claims.get("given_name"), Name, 100)
    last = _text(claims.get("family_name"), Name, 100)
    if first is None and last is None:
        first = _text(claims.get("name"), Name, 100)
    picture = claims.get("picture")
    return msgspec.convert(
        {
            "username": _valid(username, Username) or "user",
            "email": email,
            "first_name": first or "",
            "last_name": last or "",
            "image_url": _valid(picture, ImageUrl) if isinstance(picture, str) else None,
        },
        NewUser,
    )


# ---- the service ------------------------------------------------------------------------------------


class OidcService:
    def __init__(self, settings: Settings, broker: Broker, store: Store, users: UserService, audit: AuditLog) -> None:
        assert settings.oidc_issuer and settings.oidc_client_id and settings.oidc_redirect_uri
        self._issuer = settings.oidc_issuer
        self._redirect_uri = settings.oidc_redirect_uri
        self._allowed_domains = settings.oidc_allowed_domains
        self._allow_signup = settings.oidc_allow_signup
        self._broker = broker
        self._store = store
        self._users = users
        self._audit = audit
        secret = settings.oidc_client_secret
        client = OAuth().register(
            "oidc",
            client_id=settings.oidc_client_id,
            client_secret=secret,
            server_metadata_url=self._issuer.rstrip("/") + "/.well-known/openid-configuration",
            client_kwargs={
                "scope": SCOPE,
                "code_challenge_method": "S256",
                # A public client (no secret) authenticates with PKCE alone.
                "token_endpoint_auth_method": "client_secret_basic" if secret else "none",
                "timeout": HTTP_TIMEOUT_S,
            },
        )
        assert isinstance(client, StarletteOAuth2App)
        self._client = client

    # ---- the provider's metadata -------------------------------------------------------------------

    async def _metadata(self) -> dict[str, Any]:
        try:
            metadata: dict[str, Any] = await self._client.load_server_metadata()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("OIDC discovery failed", extra={"reason": type(exc).__name__})
            raise OidcRefused(502, "oidc-unavailable", "the sign-in provider cannot be reached; try again shortly") from None
        if str(metadata.get("issuer", "")).rstrip("/") != self._issuer.rstrip("/"):
            metadata.pop("_loaded_at", None)  # look again next time: the provider may be fixed
            log.error("OIDC discovery document names another issuer than YM_OIDC_ISSUER")
            raise OidcRefused(502, "oidc-unavailable", "the sign-in provider is misconfigured (issuer mismatch)")
        algs = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
        metadata["id_token_signing_alg_values_supported"] = [a for a in algs if a in SIGNING_ALGS] or ["RS256"]
        return metadata

    # ---- beginning: the redirect to the provider -----------------------------------------------------

    async def begin(self, next_path: str | None) -> Begun:
        await self._metadata()
        rv = await self._client.create_authorization_url(self._redirect_uri)
        binding = secrets.token_urlsafe(32)
        pending = _Pending(
            redirect_uri=self._redirect_uri,
            code_verifier=rv["code_verifier"],
            nonce=rv["nonce"],
            next_path=safe_next(next_path),
        )
        await self._broker.set_presence(
            PRESENCE_OIDC_STATE, _entry_name(rv["state"], binding), msgspec.json.encode(pending).decode(), int(STATE_TTL_S * 1000)
        )
        return Begun(url=rv["url"], binding=binding)

    async def _take(self, state: str, binding: str) -> _Pending | None:
        """The sign-in under way for this state in this browser, once (atomic across replicas)."""
        name = _entry_name(state, binding)
        value = await self._broker.get_presence(PRESENCE_OIDC_STATE, name)
        if value is None or not await self._broker.delete_presence(PRESENCE_OIDC_STATE, name, if_value=value):
            return None
        return msgspec.json.decode(value, type=_Pending)

    # ---- finishing: the callback ------------------------------------------------------------------

    async def finish(self, query: Mapping[str, str], binding: str | None, client_address: str | None) -> SignedIn:
        error = query.get("error")
        state = query.get("state")
        if not state or not binding or len(state) > _MAX_STATE or len(binding) > _MAX_STATE:
            raise OidcRefused(400, "invalid-state", "this sign-in was not started here, or has expired; start again")
        pending = await self._take(state, binding)
        if pending is None:
            raise OidcRefused(400, "invalid-state", "this sign-in was not started here, has expired or was used; start again")
        if error:
            shown = re.sub(r"[^a-z_]", "", error.lower())[:64] or "error"
            raise OidcRefused(400, "oidc-denied", f"the sign-in provider refused: {shown}")
        code = query.get("code")
        if not code:
            raise OidcRefused(400, "oidc-denied", "the sign-in provider sent no authorization code")
        claims = await self._verified_claims(code, pending)
        user, created = await self._account(claims, client_address)
        return SignedIn(user=user, next_path=pending.next_path, created=created)

    async def _verified_claims(self, code: str, pending: _Pending) -> dict[str, Any]:
        metadata = await self._metadata()
        try:
            token = await self._client.fetch_access_token(
                code=code, redirect_uri=pending.redirect_uri, code_verifier=pending.code_verifier
            )
        except OAuthError as exc:
            log.warning("OIDC code exchange refused by the provider", extra={"reason": exc.error})
            raise OidcRefused(400, "oidc-exchange-failed", "the sign-in provider refused the authorization code; start again") from None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("OIDC code exchange failed", extra={"reason": type(exc).__name__})
            raise OidcRefused(502, "oidc-unavailable", "the sign-in provider cannot be reached; try again shortly") from None
        if not isinstance(token, dict) or "id_token" not in token:
            raise OidcRefused(401, "invalid-id-token", "the sign-in provider sent no ID token")
        options = {
            "iss": {"essential": True, "value": metadata["issuer"]},
            "aud": {"essential": True, "value": self._client.client_id},
            "sub": {"essential": True},
        }
        try:
            claims = await self._client.parse_id_token(token, nonce=pending.nonce, claims_options=options, leeway=LEEWAY_S)
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            log.warning("OIDC ID token refused", extra={"reason": type(exc).__name__, "detail": str(exc)[:200]})
            raise OidcRefused(401, "invalid-id-token", "the ID token from the sign-in provider did not verify") from None
        except httpx.HTTPError as exc:
            log.warning("OIDC JWKS fetch failed", extra={"reason": type(exc).__name__})
            raise OidcRefused(502, "oidc-unavailable", "the sign-in provider cannot be reached; try again shortly") from None
        if claims is None or not isinstance(claims.get("sub"), str):
            raise OidcRefused(401, "invalid-id-token", "the ID token from the sign-in provider did not verify")
        return dict(claims)

    # ---- the account ---------------------------------------------------------------------------------

    async def _account(self, claims: dict[str, Any], client_address: str | None) -> tuple[UserRecord, bool]:
        issuer, subject = str(claims["iss"]), str(claims["sub"])
        email = verified_email(claims)
        user = await self._store.get_user_by_identity(issuer, subject)

        async def refuse(status: int, code: str, message: str) -> OidcRefused:
            await self._audit.record(
                "login.failed",
                actor=user.id if user is not None else None,
                target=user.id if user is not None else None,
                client_address=client_address,
                details={"method": "oidc", "reason": code, "issuer": issuer, "subject": subject},
            )
            return OidcRefused(status, code, message)

        if not domain_allowed(email, self._allowed_domains):
            raise await refuse(403, "domain-not-allowed", "your email address is not in a domain allowed to sign in here")
        created = False
        if user is None:
            if not self._allow_signup:
                raise await refuse(403, "no-account", "there is no account for you here; ask an administrator")
            try:
                user, created = await self._create(claims, issuer, subject, email, client_address)
            except OidcRefused as exc:
                raise await refuse(exc.status, exc.code, exc.message) from None
        if user.disabled_at is not None:
            raise await refuse(403, "user-disabled", "this account is disabled")
        now = time.time()
        user = await self._store.update_user(user.id, {"last_login_at": now}) or user
        await self._audit.record(
            "oidc.signed-in",
            actor=user.id,
            target=user.id,
            client_address=client_address,
            details={"issuer": issuer, "subject": subject, "created": created},
        )
        return user, created

    async def _create(
        self, claims: dict[str, Any], issuer: str, subject: str, email: str | None, client_address: str | None
    ) -> tuple[UserRecord, bool]:
        for username in username_candidates(username_base(claims)):
            try:
                user = await self._users.create(
                    new_user_from(claims, username, email),
                    actor=None,
                    client_address=client_address,
                    action="oidc.user-created",
                    oidc_issuer=issuer,
                    oidc_subject=subject,
                )
                return user, True
            except UserConflict as exc:
                if exc.field == "username":
                    continue
                if exc.field == "oidc_subject":  # a sign-in of the same person on another replica won
                    found = await self._store.get_user_by_identity(issuer, subject)
                    if found is not None:
                        return found, False
                if exc.field == "email":
                    # Never linked by email: that would hand the account to whoever the provider says owns it.
                    raise OidcRefused(409, "email-taken", "another account has this email address; ask an administrator") from None
                raise
        raise OidcRefused(409, "username-taken", "no free username could be made for you; ask an administrator")


def _entry_name(state: str, binding: str) -> str:
    return tokens.token_hash(f"{state}\n{binding}")
