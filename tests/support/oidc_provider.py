"""A real OpenID provider for tests, on a loopback port, built from authlib's own
authorization-server components: `AuthorizationServer` with the authorization-code grant, the
`OpenIDCode` extension (ID tokens) and `CodeChallenge` (PKCE, here S256 required of every client).

It serves the discovery document, its JWKS, /authorize (which signs in `provider.user` at once,
no login page, and redirects back with code and state) and /token. A test may make it misbehave
(`provider.misbehave.add(...)`): sign ID tokens with a key it does not publish, put a wrong nonce,
audience or issuer in them, issue them already expired, or name another issuer in its discovery
document.

Runs uvicorn in a thread; Starlette endpoints adapt each request to authlib's OAuth2Request.
"""

from __future__ import annotations

import hmac
import secrets
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl

import uvicorn
from authlib.oauth2.rfc6749 import AuthorizationServer, ClientMixin, OAuth2Payload, OAuth2Request, grants
from authlib.oauth2.rfc6749.errors import InvalidRequestError, OAuth2Error
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDCode
from authlib.oidc.core.models import AuthorizationCodeMixin
from joserfc.jwk import KeySet, RSAKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

Misbehaviour = Literal[
    "other-key", "unknown-kid", "wrong-nonce", "wrong-audience", "wrong-issuer", "expired", "discovery-names-another-issuer"
]

SCOPES = ["openid", "email", "profile"]
KID = "provider-key-1"


@dataclass
class ProviderUser:
    """The person the provider signs in: their claims, as the provider tells them."""

    sub: str = "subject-1"
    email: str | None = "ada@example.com"
    email_verified: bool = True
    preferred_username: str | None = "ada"
    given_name: str | None = "Ada"
    family_name: str | None = "Lovelace"
    picture: str | None = "https://example.com/ada.png"

    def claims(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sub": self.sub}
        if self.email is not None:
            out["email"] = self.email
            out["email_verified"] = self.email_verified
        for name in ("preferred_username", "given_name", "family_name", "picture"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


# ---- authlib models --------------------------------------------------------------------------------


@dataclass
class _Client(ClientMixin):
    client_id: str
    client_secret: str | None
    redirect_uris: list[str]

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope: str | None) -> str:
        return " ".join(s for s in (scope or "").split() if s in SCOPES)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return self.client_secret is not None and hmac.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.client_secret is None:
            return method == "none"
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type == "authorization_code"


@dataclass
class _Code(AuthorizationCodeMixin):
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: ProviderUser
    nonce: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    auth_time: int = field(default_factory=lambda: int(time.time()))

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time


class _Payload(OAuth2Payload):
    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._data = dict(items)
        self._datalist: defaultdict[str, list[str]] = defaultdict(list)
        for key, value in items:
            self._datalist[key].append(value)

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class _Request(OAuth2Request):
    """A Starlette request as authlib's OAuth2Request (query and form read beforehand)."""

    def __init__(self, request: Request, form: list[tuple[str, str]]) -> None:
        super().__init__(request.method, str(request.url), headers=request.headers)
        self._args = dict(request.query_params)
        self._form = dict(form)
        self.payload = _Payload([*request.query_params.multi_items(), *form])

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


class _CodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]

    @property
    def provider(self) -> OidcProvider:
        return self.server.provider  # type: ignore[no-any-return]

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        data = request.payload.data
        self.provider.codes[code] = _Code(
            code=code,
            client_id=request.client.get_client_id(),
            redirect_uri=data.get("redirect_uri", ""),
            scope=request.scope,
            user=request.user,
            nonce=data.get("nonce"),
            code_challenge=data.get("code_challenge"),
            code_challenge_method=data.get("code_challenge_method"),
        )

    def query_authorization_code(self, code: str, client: _Client) -> _Code | None:
        found = self.provider.codes.get(code)
        return found if found is not None and found.client_id == client.client_id else None

    def delete_authorization_code(self, authorization_code: _Code) -> None:
        # Spent codes are remembered so a test can tell a replay from a typo.
        self.provider.codes.pop(authorization_code.code, None)
        self.provider.spent_codes.add(authorization_code.code)

    def authenticate_user(self, authorization_code: _Code) -> ProviderUser:
        return authorization_code.user


class _S256Required(CodeChallenge):
    """PKCE for every client, and only with S256 (authlib's own extension allows plain, and
    requires PKCE of public clients only)."""

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge") or data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("PKCE with code_challenge_method=S256 is required")
        super().validate_code_challenge(grant, redirect_uri)


class _IdTokens(OpenIDCode):
    def __init__(self, provider: OidcProvider) -> None:
        super().__init__(require_nonce=True)
        self.provider = provider

    def exists_nonce(self, nonce: str, request: OAuth2Request) -> bool:
        return any(c.nonce == nonce for c in self.provider.codes.values())

    def get_client_algorithm(self, client: _Client) -> str:
        return "RS256"

    def get_encode_header(self, client: _Client) -> dict[str, str]:
        kid = "unpublished-key" if "unknown-kid" in self.provider.misbehave else KID
        return {"alg": "RS256", "kid": kid}

    def resolve_client_private_key(self, client: _Client) -> RSAKey:
        bad = self.provider.misbehave & {"other-key", "unknown-kid"}
        return self.provider.rogue_key if bad else self.provider.key

    def get_client_claims(self, client: _Client) -> dict[str, Any]:
        p = self.provider
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": "http://127.0.0.1:1/not-the-issuer" if "wrong-issuer" in p.misbehave else p.issuer,
            "aud": [client.client_id],
            "iat": now - 900 if "expired" in p.misbehave else now,
            "exp": now - 600 if "expired" in p.misbehave else now + 300,
        }
        if "wrong-audience" in p.misbehave:
            # azp names the client: authlib's own checks let this through unless the client
            # insists on its id in `aud` (OIDC Core 3.1.3.7 step 3).
            claims["aud"] = ["another-client"]
            claims["azp"] = client.client_id
        return claims

    def get_authorization_code_claims(self, authorization_code: AuthorizationCodeMixin) -> dict[str, Any]:
        claims: dict[str, Any] = super().get_authorization_code_claims(authorization_code)
        if "wrong-nonce" in self.provider.misbehave:
            claims["nonce"] = "not-the-nonce-that-was-sent"
        return claims

    def generate_user_info(self, user: ProviderUser, scope: str) -> UserInfo:
        return UserInfo(user.claims())


class _Server(AuthorizationServer):
    def __init__(self, provider: OidcProvider) -> None:
        super().__init__(scopes_supported=SCOPES)
        self.provider = provider
        self.register_token_generator("default", BearerTokenGenerator(lambda **_: secrets.token_urlsafe(32)))
        self.register_grant(_CodeGrant, [_S256Required(required=True), _IdTokens(provider)])

    def query_client(self, client_id: str) -> _Client | None:
        client = self.provider.client
        return client if client_id == client.client_id else None

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        self.provider.tokens_issued += 1

    def create_oauth2_request(self, request: OAuth2Request) -> OAuth2Request:
        return request

    def create_json_request(self, request: Any) -> Any:
        raise NotImplementedError

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> Response:
        if isinstance(body, dict):
            return JSONResponse(body, status_code=status, headers=dict(headers))
        return Response(body, status_code=status, headers=dict(headers))

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass


# ---- the provider ------------------------------------------------------------------------------------


class OidcProvider:
    """`with OidcProvider(client_id, secret, redirect_uri) as provider:` serves on
    `provider.issuer` (http://127.0.0.1:<port>) until the block ends."""

    def __init__(self, client_id: str, client_secret: str | None, redirect_uri: str) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.client = _Client(client_id, client_secret, [redirect_uri])
        self.key = RSAKey.generate_key(2048, parameters={"kid": KID})
        self.rogue_key = RSAKey.generate_key(2048, parameters={"kid": KID})  # same kid, not published
        self.user = ProviderUser()
        self.misbehave: set[Misbehaviour] = set()
        self.codes: dict[str, _Code] = {}
        self.spent_codes: set[str] = set()
        self.authorize_requests: list[dict[str, str]] = []  # each /authorize query, for assertions
        self.token_requests = 0
        self.tokens_issued = 0
        self._server = _Server(self)
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- HTTP endpoints --------------------------------------------------------------------------------

    async def _discovery(self, request: Request) -> Response:
        return JSONResponse(
            {
                "issuer": "https://impostor.example" if "discovery-names-another-issuer" in self.misbehave else self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "jwks_uri": f"{self.issuer}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                "scopes_supported": SCOPES,
                "claims_supported": ["sub", "email", "email_verified", "preferred_username", "given_name", "family_name", "picture"],
            }
        )

    async def _jwks(self, request: Request) -> Response:
        return JSONResponse(KeySet([self.key]).as_dict(private=False))

    async def _authorize(self, request: Request) -> Response:
        self.authorize_requests.append(dict(request.query_params))
        req = _Request(request, [])
        try:
            grant = self._server.get_consent_grant(req, end_user=self.user)
        except OAuth2Error as error:
            return self._server.handle_error_response(req, error)  # type: ignore[no-any-return]
        return self._server.create_authorization_response(req, grant_user=self.user, grant=grant)  # type: ignore[no-any-return]

    async def _token(self, request: Request) -> Response:
        self.token_requests += 1
        # urlencoded by hand: Starlette's form parser needs python-multipart, not installed here
        items = parse_qsl((await request.body()).decode(), keep_blank_values=True)
        return self._server.create_token_response(_Request(request, items))  # type: ignore[no-any-return]

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self._discovery),
                Route("/jwks", self._jwks),
                Route("/authorize", self._authorize),
                Route("/token", self._token, methods=["POST"]),
            ]
        )

    # -- life ------------------------------------------------------------------------------------------

    def start(self) -> OidcProvider:
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="off", access_log=False)
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test OpenID provider did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._uvicorn is not None and self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> OidcProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(client_id: str, client_secret: str | None, redirect_uri: str) -> Iterator[OidcProvider]:
    """For a pytest fixture: `yield from serve(...)`."""
    with OidcProvider(client_id, client_secret, redirect_uri) as provider:
        yield provider
