"""OIDC single sign-on against a real OpenID provider on a loopback port (tests/support/oidc_provider.py,
built from authlib's authorization-server components), driven through the real redirects.

Yardmaster runs in-process (its lifespan, its real SqliteStore and Broker); the test is the browser:
it follows each 302 by hand, keeping Yardmaster's cookies, while Yardmaster itself talks to the
provider over loopback HTTP (discovery, token endpoint, JWKS).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import msgspec
import pytest

from tests.support.cluster import free_port
from tests.support.oidc_provider import Misbehaviour, OidcProvider, serve
from tests.support.redis_plugin import RedisBrokerFactory
from yardmaster.server.app import build_app
from yardmaster.server.backends.base import Broker
from yardmaster.server.runtime import Runtime
from yardmaster.server.security.oidc import BINDING_COOKIE
from yardmaster.server.security.sessions import ACCESS_COOKIE, REFRESH_COOKIE
from yardmaster.server.settings import load_settings

BASE = "http://127.0.0.1:8080"
CALLBACK = f"{BASE}/api/v1/auth/oidc/callback"
CLIENT_ID = "yardmaster-test"
CLIENT_SECRET = "the-test-client-secret-0123456789"


@pytest.fixture
def provider() -> Iterator[OidcProvider]:
    yield from serve(CLIENT_ID, CLIENT_SECRET, CALLBACK)


@dataclass
class Yardmaster:
    rt: Runtime
    browser: httpx.AsyncClient
    app: Any

    def new_browser(self) -> httpx.AsyncClient:
        """Another browser: no cookies of the first."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url=BASE)


def oidc_env(tmp_path: Path, issuer: str, **extra: str) -> dict[str, str]:
    return {
        "YM_DATA_DIR": str(tmp_path / "data"),
        "YM_OIDC_ISSUER": issuer,
        "YM_OIDC_CLIENT_ID": CLIENT_ID,
        "YM_OIDC_CLIENT_SECRET": CLIENT_SECRET,
        "YM_OIDC_REDIRECT_URI": CALLBACK,
        **extra,
    }


@asynccontextmanager
async def yardmaster(env: dict[str, str], broker: Broker | None = None) -> AsyncIterator[Yardmaster]:
    app = build_app(load_settings(env), broker=broker)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as browser:
            yield Yardmaster(app.state.runtime, browser, app)


@pytest.fixture
async def ym(tmp_path: Path, provider: OidcProvider) -> AsyncIterator[Yardmaster]:
    async with yardmaster(oidc_env(tmp_path, provider.issuer, YM_OIDC_ALLOW_SIGNUP="true")) as y:
        yield y


# ---- the browser's part ------------------------------------------------------------------------------


def local(url: str) -> str:
    """A URL on Yardmaster as the path and query an in-process client asks for."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


async def begin(browser: httpx.AsyncClient, provider: OidcProvider, next_path: str | None = "/jobs") -> str:
    """GET the login route; the provider's authorization URL it redirects to."""
    params = {} if next_path is None else {"next": next_path}
    r = await browser.get("/api/v1/auth/oidc/login", params=params)
    assert r.status_code == 302, r.text
    assert r.headers["location"].startswith(f"{provider.issuer}/authorize?")
    assert BINDING_COOKIE in browser.cookies
    return r.headers["location"]


async def at_provider(authorize_url: str) -> str:
    """The provider signs its user in and redirects back: the callback URL (path and query)."""
    async with httpx.AsyncClient() as to_provider:
        r = await to_provider.get(authorize_url)
    assert r.status_code == 302, r.text
    assert r.headers["location"].startswith(CALLBACK + "?")
    return local(r.headers["location"])


async def sign_in(browser: httpx.AsyncClient, provider: OidcProvider, next_path: str | None = "/jobs") -> httpx.Response:
    callback = await at_provider(await begin(browser, provider, next_path))
    return await browser.get(callback)


def error_code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


async def audit(rt: Runtime, action: str) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(a) for a in await rt.store.list_audit(action=action, limit=100)]


async def user_count(rt: Runtime) -> int:
    return len(await rt.store.list_users(limit=1000))


# ---- signing in ---------------------------------------------------------------------------------------


async def test_first_sign_in_creates_the_user_and_its_session_cookie_works(ym: Yardmaster, provider: OidcProvider) -> None:
    r = await sign_in(ym.browser, provider, "/jobs?view=mine")

    assert r.status_code == 302, r.text
    assert r.headers["location"] == "/jobs?view=mine"
    assert ACCESS_COOKIE in ym.browser.cookies and BINDING_COOKIE not in ym.browser.cookies
    me = (await ym.browser.get("/api/v1/users/me")).json()
    assert me["username"] == "ada" and me["email"] == "ada@example.com"
    assert (me["first_name"], me["last_name"], me["image_url"]) == ("Ada", "Lovelace", "https://example.com/ada.png")
    assert me["role"] == "user" and me["last_login_at"] is not None
    stored = await ym.rt.store.get_user(me["id"])
    assert stored is not None and (stored.oidc_issuer, stored.oidc_subject) == (provider.issuer, "subject-1")
    assert stored.password_hash is None

    # The authorization request carried PKCE (S256), a nonce, a state and the openid scope.
    sent = provider.authorize_requests[-1]
    assert sent["code_challenge_method"] == "S256" and sent["code_challenge"]
    assert sent["nonce"] and sent["state"] and "openid" in sent["scope"].split()
    assert sent["client_id"] == CLIENT_ID and sent["redirect_uri"] == CALLBACK

    created = await audit(ym.rt, "oidc.user-created")
    signed = await audit(ym.rt, "oidc.signed-in")
    assert [a["target"] for a in created] == [me["id"]] and [a["target"] for a in signed] == [me["id"]]
    assert signed[0]["client_address"] == "127.0.0.1" and signed[0]["details"]["created"] is True
    # No secret of the exchange in the audit trail.
    trail = json.dumps([msgspec.to_builtins(a) for a in await ym.rt.store.list_audit(limit=100)])
    code = parse_qs(r.request.url.query.decode())["code"][0]
    for secret in (ym.browser.cookies[ACCESS_COOKIE], ym.browser.cookies[REFRESH_COOKIE], code, CLIENT_SECRET, sent["nonce"]):
        assert secret not in trail


async def test_a_second_sign_in_finds_the_same_user_by_issuer_and_subject_even_with_a_new_email(
    ym: Yardmaster, provider: OidcProvider
) -> None:
    assert (await sign_in(ym.browser, provider)).status_code == 302
    first = (await ym.browser.get("/api/v1/users/me")).json()

    provider.user.email = "ada.lovelace@example.org"
    provider.user.preferred_username = "countess"
    async with ym.new_browser() as other:
        r = await sign_in(other, provider)
        assert r.status_code == 302, r.text
        again = (await other.get("/api/v1/users/me")).json()

    assert again["id"] == first["id"] and again["username"] == "ada"
    assert await user_count(ym.rt) == 2  # the bootstrap admin and Ada
    assert again["last_login_at"] >= first["last_login_at"]
    assert [a["details"]["created"] for a in await audit(ym.rt, "oidc.signed-in")] == [False, True]


async def test_usernames_are_made_unique_and_unverified_emails_are_not_kept(ym: Yardmaster, provider: OidcProvider) -> None:
    assert (await sign_in(ym.browser, provider)).status_code == 302
    provider.user.sub, provider.user.email, provider.user.email_verified = "subject-2", "ada@elsewhere.example", False
    async with ym.new_browser() as other:
        assert (await sign_in(other, provider)).status_code == 302
        second = (await other.get("/api/v1/users/me")).json()
    assert second["username"] == "ada-2" and second["email"] is None


async def test_another_subject_with_a_taken_email_is_not_linked_to_that_account(ym: Yardmaster, provider: OidcProvider) -> None:
    assert (await sign_in(ym.browser, provider)).status_code == 302
    provider.user.sub = "someone-else"  # same (verified) email: never enough to take over the account
    async with ym.new_browser() as other:
        r = await sign_in(other, provider)
        assert r.status_code == 409 and error_code(r) == "email-taken"
        assert ACCESS_COOKIE not in other.cookies
    assert await user_count(ym.rt) == 2


# ---- refusals by policy -------------------------------------------------------------------------------


async def test_without_signup_only_people_with_an_account_get_in(tmp_path: Path, provider: OidcProvider) -> None:
    async with yardmaster(oidc_env(tmp_path, provider.issuer)) as y:
        r = await sign_in(y.browser, provider)
        assert r.status_code == 403 and error_code(r) == "no-account"
        assert ACCESS_COOKIE not in y.browser.cookies and await user_count(y.rt) == 1
        failed = await audit(y.rt, "login.failed")
        assert failed[0]["details"] == {"method": "oidc", "reason": "no-account", "issuer": provider.issuer, "subject": "subject-1"}

        # An account an admin linked to this identity may sign in.
        from yardmaster.server.core.users import NewUser

        made = await y.rt.users.create(
            NewUser(username="ada-lovelace"), actor="admin", oidc_issuer=provider.issuer, oidc_subject="subject-1"
        )
        r = await sign_in(y.browser, provider)
        assert r.status_code == 302, r.text
        assert (await y.browser.get("/api/v1/users/me")).json()["id"] == made.id


async def test_emails_outside_the_allowed_domains_are_refused(tmp_path: Path, provider: OidcProvider) -> None:
    env = oidc_env(tmp_path, provider.issuer, YM_OIDC_ALLOW_SIGNUP="true", YM_OIDC_ALLOWED_DOMAINS="example.org, corp.example")
    async with yardmaster(env) as y:
        r = await sign_in(y.browser, provider)  # ada@example.com
        assert r.status_code == 403 and error_code(r) == "domain-not-allowed"

        provider.user.email, provider.user.email_verified = "ada@example.org", False  # unverified proves nothing
        r = await sign_in(y.browser, provider)
        assert r.status_code == 403 and error_code(r) == "domain-not-allowed"

        provider.user.email, provider.user.email_verified = "ada@sub.example.org", True  # a subdomain is not the domain
        r = await sign_in(y.browser, provider)
        assert r.status_code == 403 and error_code(r) == "domain-not-allowed"
        assert await user_count(y.rt) == 1

        provider.user.email = "Ada@Example.ORG"
        r = await sign_in(y.browser, provider)
        assert r.status_code == 302, r.text
        assert [a["details"]["reason"] for a in await audit(y.rt, "login.failed")] == ["domain-not-allowed"] * 3


async def test_a_disabled_user_is_refused(ym: Yardmaster, provider: OidcProvider) -> None:
    assert (await sign_in(ym.browser, provider)).status_code == 302
    me = (await ym.browser.get("/api/v1/users/me")).json()
    await ym.rt.store.update_user(me["id"], {"disabled_at": 1.0})

    async with ym.new_browser() as other:
        r = await sign_in(other, provider)
        assert r.status_code == 403 and error_code(r) == "user-disabled"
        assert ACCESS_COOKIE not in other.cookies


# ---- refusals of the protocol -------------------------------------------------------------------------


async def test_a_missing_or_tampered_state_is_400(ym: Yardmaster, provider: OidcProvider) -> None:
    callback = await at_provider(await begin(ym.browser, provider))
    query = parse_qs(urlsplit(callback).query)
    code, state = query["code"][0], query["state"][0]

    for params in ({"code": code}, {"code": code, "state": state[:-1] + ("A" if state[-1] != "A" else "B")}):
        r = await ym.browser.get("/api/v1/auth/oidc/callback?" + urlencode(params))
        assert r.status_code == 400 and error_code(r) == "invalid-state"

    # The right URL in another browser (a login-CSRF link) finds nothing either: without a binding
    # cookie, or with the one of a sign-in that browser began itself…
    async with ym.new_browser() as other:
        r = await other.get(callback)
        assert r.status_code == 400 and error_code(r) == "invalid-state"
        await begin(other, provider)
        r = await other.get(callback)
        assert r.status_code == 400 and error_code(r) == "invalid-state"
    assert provider.token_requests == 0
    # …and leaves the sign-in of the browser that began it intact.
    r = await ym.browser.get(callback)
    assert r.status_code == 302, r.text


async def test_a_replayed_callback_or_a_spent_code_is_refused(ym: Yardmaster, provider: OidcProvider) -> None:
    binding_path = "/api/v1/auth/oidc"
    callback = await at_provider(await begin(ym.browser, provider))
    binding = ym.browser.cookies[BINDING_COOKIE]
    assert (await ym.browser.get(callback)).status_code == 302

    # The same callback again, cookie and all: the sign-in was used up.
    ym.browser.cookies.set(BINDING_COOKIE, binding, domain="127.0.0.1", path=binding_path)
    r = await ym.browser.get(callback)
    assert r.status_code == 400 and error_code(r) == "invalid-state"
    assert provider.token_requests == 1

    # The spent code with a fresh state: the provider refuses it.
    spent = parse_qs(urlsplit(callback).query)["code"][0]
    fresh = parse_qs(urlsplit(await at_provider(await begin(ym.browser, provider))).query)
    r = await ym.browser.get("/api/v1/auth/oidc/callback?" + urlencode({"code": spent, "state": fresh["state"][0]}))
    assert r.status_code == 400 and error_code(r) == "oidc-exchange-failed"
    assert spent in provider.spent_codes and provider.tokens_issued == 1


async def test_the_provider_refusing_is_400(ym: Yardmaster, provider: OidcProvider) -> None:
    authorize = await begin(ym.browser, provider)
    state = parse_qs(urlsplit(authorize).query)["state"][0]
    r = await ym.browser.get("/api/v1/auth/oidc/callback?" + urlencode({"error": "access_denied", "state": state}))
    assert r.status_code == 400 and error_code(r) == "oidc-denied"
    assert "access_denied" in r.json()["error"]["message"]


@pytest.mark.parametrize("misbehaviour", ["other-key", "unknown-kid", "wrong-nonce", "wrong-audience", "wrong-issuer", "expired"])
async def test_an_id_token_that_does_not_verify_is_refused(ym: Yardmaster, provider: OidcProvider, misbehaviour: Misbehaviour) -> None:
    provider.misbehave.add(misbehaviour)
    r = await sign_in(ym.browser, provider)
    assert r.status_code == 401 and error_code(r) == "invalid-id-token"
    assert provider.tokens_issued == 1  # the provider did issue it: the refusal is ours
    assert ACCESS_COOKIE not in ym.browser.cookies and await user_count(ym.rt) == 1

    provider.misbehave.clear()  # the same server, the provider behaving: it works
    assert (await sign_in(ym.browser, provider)).status_code == 302


@pytest.mark.parametrize("next_path", ["https://evil.example/x", "//evil.example/x", "/\\evil.example", "javascript:alert(1)", None])
async def test_next_elsewhere_than_this_origin_lands_on_root(ym: Yardmaster, provider: OidcProvider, next_path: str | None) -> None:
    r = await sign_in(ym.browser, provider, next_path)
    assert r.status_code == 302 and r.headers["location"] == "/"


# ---- configuration and availability -------------------------------------------------------------------


async def test_the_routes_are_404_without_oidc(tmp_path: Path) -> None:
    async with yardmaster({"YM_DATA_DIR": str(tmp_path / "data")}) as y:
        for path in ("/api/v1/auth/oidc/login", "/api/v1/auth/oidc/callback?code=x&state=y"):
            r = await y.browser.get(path)
            assert r.status_code == 404 and error_code(r) == "not-found"


async def test_an_unreachable_provider_is_502(tmp_path: Path) -> None:
    async with yardmaster(oidc_env(tmp_path, f"http://127.0.0.1:{free_port()}")) as y:
        r = await y.browser.get("/api/v1/auth/oidc/login")
        assert r.status_code == 502 and error_code(r) == "oidc-unavailable"


@pytest.mark.redis
async def test_a_sign_in_begun_on_one_replica_finishes_on_another(
    tmp_path: Path, provider: OidcProvider, redis_broker: RedisBrokerFactory
) -> None:
    env = oidc_env(tmp_path, provider.issuer, YM_OIDC_ALLOW_SIGNUP="true")
    async with yardmaster({**env, "YM_REPLICA_ID": "a"}, redis_broker()) as a:
        async with yardmaster({**env, "YM_REPLICA_ID": "b"}, redis_broker()) as b:
            callback = await at_provider(await begin(a.browser, provider))
            b.browser.cookies.set(BINDING_COOKIE, a.browser.cookies[BINDING_COOKIE], domain="127.0.0.1", path="/api/v1/auth/oidc")
            r = await b.browser.get(callback)
            assert r.status_code == 302, r.text
            assert (await b.browser.get("/api/v1/users/me")).json()["username"] == "ada"
            # …once: replica a cannot finish it again.
            r = await a.browser.get(callback)
            assert r.status_code == 400 and error_code(r) == "invalid-state"


async def test_a_discovery_document_naming_another_issuer_is_not_trusted(ym: Yardmaster, provider: OidcProvider) -> None:
    provider.misbehave.add("discovery-names-another-issuer")
    r = await ym.browser.get("/api/v1/auth/oidc/login")
    assert r.status_code == 502 and error_code(r) == "oidc-unavailable"
    assert provider.authorize_requests == []
    provider.misbehave.clear()  # looked at again on the next sign-in, not remembered
    assert (await sign_in(ym.browser, provider)).status_code == 302
