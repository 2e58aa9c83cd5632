"""Access tokens: short-lived JWTs (RFC 9068 profile, `typ: at+jwt`) signed with one algorithm
pinned by YM_JWT_ALGORITHM, and the signing key they need.

EdDSA (Ed25519) and ES256 (P-256) use a key pair: YM_JWT_PRIVATE_KEY_FILE (a PKCS#8 PEM, for
replicas on several hosts), else one generated on first start into YM_DATA_DIR (0600; replicas
sharing the data dir agree on it). HS256 uses YM_JWT_SECRET. Verification trusts nothing in the
token's header but `alg` (which must be the pinned one), `kid` (which must name our key) and
`typ`: `jku`, `jwk`, `x5u`, `x5c` are never looked at, so never fetched.
"""

from __future__ import annotations

import copy
import hashlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jws import JWSRegistry
from joserfc.jwk import ECKey, GuestProtocol, Key, OctKey, OKPKey, import_key
from joserfc.util import urlsafe_b64encode

from yardmaster.server.backends.records import Role
from yardmaster.server.backends.stores import ensure_private_dir, ensure_private_file
from yardmaster.server.settings import Settings, SettingsError


class _Registry(JWSRegistry):
    """joserfc's registry, but "EdDSA" without its warning. RFC 9864 deprecates the polymorphic
    "EdDSA" for the fully specified "Ed25519": its concern is a verifier that accepts any EdDSA
    curve. Ours accepts our one Ed25519 key only, and "EdDSA" is the name verifiers (PyJWT, jose,
    Go's jwx) know, so it stays, without a warning per token."""

    algorithms = {**JWSRegistry.algorithms}


_quiet_eddsa = copy.copy(JWSRegistry.algorithms["EdDSA"])
_quiet_eddsa.security_warning = None
_Registry.algorithms["EdDSA"] = _quiet_eddsa


Algorithm = Literal["EdDSA", "ES256", "HS256"]
TOKEN_TYPE: Final = "at+jwt"
LEEWAY_S: Final = 30  # clock skew allowed between replicas (exp, nbf, iat)
MAX_TOKEN_CHARS: Final = 4096  # ours are ~400; a huge header or payload is refused unparsed
KEY_FILES: Final[dict[str, str]] = {"EdDSA": "jwt-ed25519.pem", "ES256": "jwt-es256.pem"}
_REQUIRED = ("exp", "iat", "nbf", "iss", "aud", "sub", "jti", "role")


class AccessClaims(msgspec.Struct, frozen=True, kw_only=True):
    """What a verified access token says. `role` is the role when it was issued: callers use the
    user's role now, from the Store."""

    sub: str
    jti: str
    role: Role
    exp: float
    iat: float


class SigningKey(msgspec.Struct, frozen=True):
    algorithm: Algorithm
    key: Any  # a joserfc Key holding the private part (or the HMAC secret)
    kid: str


# ---- the key -------------------------------------------------------------------------------------


def load_signing_key(settings: Settings) -> SigningKey:
    """The key access tokens are signed with. SettingsError (naming the variable, never a
    secret) when a configured key cannot be used."""
    alg = settings.jwt_algorithm
    if alg == "HS256":
        secret = (settings.jwt_secret or "").encode()
        return SigningKey(alg, OctKey.import_key(secret), hs256_kid(secret))
    if settings.jwt_private_key_file is not None:
        path = Path(settings.jwt_private_key_file)
        try:
            pem = path.read_bytes()
        except OSError:
            raise SettingsError(f"YM_JWT_PRIVATE_KEY_FILE: cannot read {path}") from None
        key = _parse_private_key(pem, alg, "YM_JWT_PRIVATE_KEY_FILE")
    else:
        ensure_private_dir(settings.data_dir)
        path = Path(settings.data_dir) / KEY_FILES[alg]
        key = _parse_private_key(_read_or_create(path, alg), alg, f"YM_DATA_DIR ({path.name})")
    return SigningKey(alg, key, key.thumbprint())


def hs256_kid(secret: bytes) -> str:
    """A kid that names the secret without revealing anything of it: a domain-separated hash."""
    return "hs256-" + hashlib.sha256(b"yardmaster jwt kid\x00" + secret).hexdigest()[:16]


def generate_pem(alg: Algorithm) -> bytes:
    key: Key = OKPKey.generate_key("Ed25519") if alg == "EdDSA" else ECKey.generate_key("P-256")
    return key.as_pem(private=True)


def _read_or_create(path: Path, alg: Algorithm) -> bytes:
    """The PEM at `path`, made first if missing. The new key is written in full to a file of
    its own, then linked into place: the link fails if another replica got there first (we then
    use theirs), and nobody ever reads a half-written key."""
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(generate_pem(alg))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
        pem = path.read_bytes()
    ensure_private_file(str(path), create=False)
    return pem


def _parse_private_key(pem: bytes, alg: Algorithm, where: str) -> Key:
    try:
        key: Key = import_key(pem, "OKP") if alg == "EdDSA" else import_key(pem, "EC")
    except (JoseError, ValueError, TypeError):
        raise SettingsError(f"{where}: not a PEM private key for {alg}") from None
    curve = "Ed25519" if alg == "EdDSA" else "P-256"
    if key.get("crv") != curve or not key.is_private:
        raise SettingsError(f"{where}: {alg} needs a {curve} private key")
    return key


# ---- tokens ----------------------------------------------------------------------------------------


class AccessTokens:
    """Issues and verifies access tokens with one key and one algorithm."""

    def __init__(
        self,
        key: SigningKey,
        *,
        issuer: str,
        audience: str,
        ttl_s: float,
        leeway_s: int = LEEWAY_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.issuer = issuer
        self.audience = audience
        self.ttl_s = ttl_s
        self.leeway_s = leeway_s
        self._clock = clock
        # A private key verifies too; the public half alone is what the JWKS shows.
        public = key.key if key.algorithm == "HS256" else import_key(key.key.as_dict(private=False))
        self._verify_key: Key = public
        self._registry = _Registry(algorithms=[key.algorithm])

    def issue(self, user_id: str, role: Role) -> tuple[str, AccessClaims]:
        clock = self._clock()
        now = int(clock)
        # iat to the millisecond (a NumericDate may be fractional, RFC 7519 §2): a password change
        # refuses the tokens issued before it (UserRecord.sessions_valid_after), not those of the
        # same second after it.
        issued_at = round(clock, 3)
        claims = AccessClaims(sub=user_id, jti=new_jti(), role=role, exp=now + int(self.ttl_s), iat=issued_at)
        payload = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": claims.sub,
            "jti": claims.jti,
            "role": claims.role,
            "iat": issued_at,
            "nbf": now,
            "exp": int(claims.exp),
        }
        header = {"alg": self.key.algorithm, "kid": self.key.kid, "typ": TOKEN_TYPE}
        token = jwt.encode(header, payload, self.key.key, registry=self._registry)
        return token, claims

    def verify(self, token: str) -> AccessClaims | None:
        """The claims of a valid token of ours; None for anything else (never raises for a bad token)."""
        if len(token) > MAX_TOKEN_CHARS:
            return None
        try:
            decoded = jwt.decode(token, self._key_for, registry=self._registry)
        except (JoseError, ValueError, TypeError, KeyError):
            return None  # malformed, another algorithm, another key, bad signature
        if not _is_access_token_type(decoded.header.get("typ")):
            return None
        claims = decoded.claims
        options: dict[str, Any] = {name: {"essential": True} for name in _REQUIRED}
        options["iss"] = {"essential": True, "value": self.issuer}
        options["aud"] = {"essential": True, "value": self.audience}
        options["role"] = {"essential": True, "values": ["admin", "user"]}
        registry = jwt.JWTClaimsRegistry(now=int(self._clock()), leeway=self.leeway_s, **options)
        try:
            registry.validate(claims)
        except JoseError:
            return None
        if not all(isinstance(claims[name], str) for name in ("sub", "jti", "role")):
            return None
        return AccessClaims(sub=claims["sub"], jti=claims["jti"], role=claims["role"], exp=claims["exp"], iat=claims["iat"])

    def _key_for(self, obj: GuestProtocol) -> Key:
        """Our key, if the token names it; any other kid (or none) is refused. Nothing else in
        the header is used to find a key."""
        kid = obj.headers().get("kid")
        if not isinstance(kid, str) or not secrets.compare_digest(kid.encode(), self.key.kid.encode()):
            raise ValueError("unknown kid")
        return self._verify_key

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The public keys that verify our tokens (none for HS256: its key is a secret)."""
        if self.key.algorithm == "HS256":
            return {"keys": []}
        public = dict(self._verify_key.as_dict(private=False))
        public.update({"kid": self.key.kid, "alg": self.key.algorithm, "use": "sig"})
        return {"keys": [public]}


def _is_access_token_type(typ: object) -> bool:
    if not isinstance(typ, str):
        return False
    value = typ.lower()
    return value == TOKEN_TYPE or value == f"application/{TOKEN_TYPE}"


def new_jti() -> str:
    return urlsafe_b64encode(secrets.token_bytes(16)).decode()
