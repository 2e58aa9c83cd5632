"""Forged access tokens for the JWT negative matrix: each is what an attacker (or a broken
client) could send, built by hand where joserfc would refuse to make it (alg none, HS256 keyed
with a public key). `matrix(tokens, ...)` gives them all by name."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import http.server
import threading
import time
import warnings
from typing import Any

from joserfc import jwt as jose_jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import OKPKey

from yardmaster.server.security.jwt import AccessTokens


class jwt:  # noqa: N801 (joserfc's jwt, minus the warning that "EdDSA" is deprecated)
    @staticmethod
    def encode(*args: Any, **kwargs: Any) -> str:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SecurityWarning)
            return jose_jwt.encode(*args, **kwargs)

    @staticmethod
    def decode(*args: Any, **kwargs: Any) -> jose_jwt.Token:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SecurityWarning)
            return jose_jwt.decode(*args, **kwargs)


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (header, claims) of a compact JWT, unverified."""
    head, payload, _ = token.split(".")
    return tuple(json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in (head, payload))  # type: ignore[return-value]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> tuple[str, str]:
    """(signing input, token with `signature`)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return signing_input, f"{signing_input}.{b64(signature)}"


def good_claims(issuer: AccessTokens, user: str = "u1", user_role: str = "user", **changes: Any) -> dict[str, Any]:
    """Claims the server would accept; `changes` override (None drops a claim)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer.issuer, "aud": issuer.audience, "sub": user, "jti": f"jti-{now}-{user}", "role": user_role,
        "iat": now, "nbf": now, "exp": now + 600,
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def signed(issuer: AccessTokens, claims: dict[str, Any], **header: Any) -> str:
    """Signed with the server's own key and algorithm; `header` overrides (None drops a field)."""
    head: dict[str, Any] = {"alg": issuer.key.algorithm, "kid": issuer.key.kid, "typ": "at+jwt"}
    for name, value in header.items():
        if value is None:
            head.pop(name, None)
        else:
            head[name] = value
    return jwt.encode(head, claims, issuer.key.key, algorithms=[issuer.key.algorithm], default_type=None)


def alg_none(issuer: AccessTokens, claims: dict[str, Any]) -> str:
    return compact({"alg": "none", "typ": "at+jwt", "kid": issuer.key.kid}, claims)[1]


def hs256_with_public_key(issuer: AccessTokens, claims: dict[str, Any], public_key: bytes) -> str:
    """Algorithm confusion: HMAC-SHA256 keyed with bytes of our public key (which anyone has)."""
    signing_input, _ = compact({"alg": "HS256", "typ": "at+jwt", "kid": issuer.key.kid}, claims)
    signature = hmac.new(public_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def public_key_forms(issuer: AccessTokens) -> list[bytes]:
    """What an attacker might use as the HMAC key: the PEM, the JWK JSON, the raw `x`."""
    jwk = issuer.jwks()["keys"][0]
    pem = issuer._verify_key.as_pem(private=False)  # noqa: SLF001 (the public half)
    return [pem, json.dumps(jwk).encode(), jwk["x"].encode()]


def with_embedded_key(issuer: AccessTokens, claims: dict[str, Any], url: str) -> tuple[str, OKPKey]:
    """Signed by an attacker's key, whose public half the header carries (`jwk`) and points to
    (`jku`, `x5u`), with our kid: a verifier that trusted the header would accept it."""
    attacker = OKPKey.generate_key("Ed25519")
    header = {
        "alg": "EdDSA", "typ": "at+jwt", "kid": issuer.key.kid,
        "jwk": attacker.as_dict(private=False), "jku": f"{url}/jwks.json", "x5u": f"{url}/cert.pem",
    }
    return jwt.encode(header, claims, attacker, algorithms=["EdDSA"], default_type=None), attacker


def tampered(token: str, **changes: Any) -> str:
    """The token's signature over a payload changed afterwards (e.g. role=admin)."""
    head, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{head}.{b64(json.dumps(claims).encode())}.{signature}"


def matrix(issuer: AccessTokens, sub: str, role: str, url: str) -> dict[str, str]:
    """Every forged or broken token the issue names, for user `sub`; each must be refused.
    `url`: where jku/x5u point (a local server that must get no request)."""
    ok = good_claims(issuer, sub, role)
    now = int(time.time())
    other = OKPKey.generate_key("Ed25519")
    forged = {
        "alg-none": alg_none(issuer, ok),
        "missing-exp": signed(issuer, good_claims(issuer, sub, role, exp=None)),
        "past-exp": signed(issuer, good_claims(issuer, sub, role, iat=now - 4000, nbf=now - 4000, exp=now - 3000)),
        "future-nbf": signed(issuer, good_claims(issuer, sub, role, nbf=now + 3000)),
        "future-iat": signed(issuer, good_claims(issuer, sub, role, iat=now + 3000)),
        "wrong-iss": signed(issuer, good_claims(issuer, sub, role, iss="someone-else")),
        "wrong-aud": signed(issuer, good_claims(issuer, sub, role, aud="another-service")),
        "missing-sub": signed(issuer, good_claims(issuer, sub, role, sub=None)),
        "missing-jti": signed(issuer, good_claims(issuer, sub, role, jti=None)),
        "wrong-typ": signed(issuer, ok, typ="JWT"),
        "missing-typ": signed(issuer, ok, typ=None),
        "unknown-kid": signed(issuer, ok, kid="not-our-key"),
        "missing-kid": signed(issuer, ok, kid=None),
        "another-key-our-kid": jwt.encode(
            {"alg": "EdDSA", "typ": "at+jwt", "kid": issuer.key.kid}, ok, other, algorithms=["EdDSA"], default_type=None
        ),
        "jku-jwk-x5u": with_embedded_key(issuer, ok, url)[0],
        "tampered-payload": tampered(signed(issuer, ok), role="admin", sub="admin"),
    }
    if issuer.key.algorithm != "HS256":
        for i, key in enumerate(public_key_forms(issuer)):
            forged[f"hs256-with-public-key-{i}"] = hs256_with_public_key(issuer, ok, key)
    return forged


class CountingServer:
    """A local HTTP server that counts the requests it gets (it must get none)."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.requests.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
