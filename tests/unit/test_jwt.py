"""Access tokens (server/security/jwt.py): the signing key (made once, 0600, shared by replicas
on one data dir, or from YM_JWT_PRIVATE_KEY_FILE / YM_JWT_SECRET), the claims and header of an
issued token, and the negative matrix: every forged or broken token is refused, and a header
naming keys elsewhere (jku, jwk, x5u) makes no request."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support import jwts
from tests.support.jwts import CountingServer
from yardmaster.server.security.jwt import (
    KEY_FILES,
    LEEWAY_S,
    AccessTokens,
    SigningKey,
    generate_pem,
    load_signing_key,
)
from yardmaster.server.settings import Settings, SettingsError, load_settings

SECRET = "s" * 40


def settings(data_dir: Path, **env: str) -> Settings:
    return load_settings({"YM_DATA_DIR": str(data_dir), **{f"YM_{k.upper()}": v for k, v in env.items()}})


def issuer_for(key: SigningKey, clock: float | None = None) -> AccessTokens:
    return AccessTokens(key, issuer="yardmaster", audience="yardmaster", ttl_s=900,
                        clock=(lambda: clock) if clock is not None else time.time)


@pytest.fixture(params=["EdDSA", "ES256", "HS256"])
def issuer(request: pytest.FixtureRequest, tmp_path: Path) -> AccessTokens:
    env = {"jwt_algorithm": request.param}
    if request.param == "HS256":
        env["jwt_secret"] = SECRET
    return issuer_for(load_signing_key(settings(tmp_path, **env)))


@pytest.fixture
def key_server() -> Iterator[CountingServer]:
    server = CountingServer()
    yield server
    server.close()


# ---- what a token is --------------------------------------------------------------------------------


def test_an_issued_token_carries_the_claims_and_header_the_issue_names(issuer: AccessTokens) -> None:
    token, claims = issuer.issue("u1", "admin")
    header, body = jwts.parts(token)
    assert header == {"alg": issuer.key.algorithm, "kid": issuer.key.kid, "typ": "at+jwt"}
    assert set(body) == {"exp", "iat", "nbf", "iss", "aud", "sub", "jti", "role"}
    assert (body["sub"], body["role"], body["iss"], body["aud"]) == ("u1", "admin", "yardmaster", "yardmaster")
    assert body["exp"] - body["nbf"] == 900 and body["nbf"] == int(body["iat"]) <= body["iat"]
    assert issuer.verify(token) == claims
    assert issuer.issue("u1", "admin")[1].jti != claims.jti


def test_the_jwks_publishes_the_public_key_only_and_nothing_for_hs256(issuer: AccessTokens) -> None:
    keys = issuer.jwks()["keys"]
    if issuer.key.algorithm == "HS256":
        assert keys == []
        return
    (jwk,) = keys
    assert jwk["kid"] == issuer.key.kid and jwk["alg"] == issuer.key.algorithm and jwk["use"] == "sig"
    assert "d" not in jwk  # the private part
    # The kid is the RFC 7638 thumbprint of the published key.
    from joserfc.jwk import import_key

    assert import_key(jwk).thumbprint() == issuer.key.kid


def test_the_hs256_kid_reveals_nothing_of_the_secret(tmp_path: Path) -> None:
    key = load_signing_key(settings(tmp_path, jwt_algorithm="HS256", jwt_secret=SECRET))
    assert SECRET not in key.kid and SECRET[:8] not in key.kid
    other = load_signing_key(settings(tmp_path, jwt_algorithm="HS256", jwt_secret="t" * 40))
    assert other.kid != key.kid
    token, _ = issuer_for(other).issue("u1", "user")
    assert issuer_for(key).verify(token) is None  # another secret's token


# ---- the key file -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_the_key_pair_is_made_on_first_start_0600_and_reused(tmp_path: Path, alg: str) -> None:
    first = load_signing_key(settings(tmp_path, jwt_algorithm=alg))
    path = tmp_path / KEY_FILES[alg]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
    again = load_signing_key(settings(tmp_path, jwt_algorithm=alg))
    assert again.kid == first.kid
    token, _ = issuer_for(first).issue("u1", "user")
    assert issuer_for(again).verify(token) is not None  # what one replica signs, another accepts
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_replicas_starting_at_once_on_one_data_dir_agree_on_one_key(tmp_path: Path) -> None:
    config = settings(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        kids = set(pool.map(lambda _: load_signing_key(config).kid, range(16)))
    assert len(kids) == 1


def test_YM_JWT_PRIVATE_KEY_FILE_is_used_instead_of_the_data_dir(tmp_path: Path) -> None:
    pem = tmp_path / "shared.pem"
    pem.write_bytes(generate_pem("ES256"))
    os.chmod(pem, 0o644)
    data = tmp_path / "data"
    on_host_a = load_signing_key(settings(data, jwt_algorithm="ES256", jwt_private_key_file=str(pem)))
    on_host_b = load_signing_key(settings(tmp_path / "other", jwt_algorithm="ES256", jwt_private_key_file=str(pem)))
    assert on_host_a.kid == on_host_b.kid
    assert not (data / KEY_FILES["ES256"]).exists()


@pytest.mark.parametrize(
    ("content", "alg"),
    [(b"not a key", "EdDSA"), (None, "EdDSA"), ("ES256", "EdDSA"), ("EdDSA", "ES256")],
    ids=["garbage", "missing", "p256-for-eddsa", "ed25519-for-es256"],
)
def test_an_unusable_key_file_stops_the_start_with_the_variable_named(tmp_path: Path, content: object, alg: str) -> None:
    pem = tmp_path / "key.pem"
    if isinstance(content, bytes):
        pem.write_bytes(content)
    elif isinstance(content, str):
        pem.write_bytes(generate_pem(content))  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="YM_JWT_PRIVATE_KEY_FILE"):
        load_signing_key(settings(tmp_path, jwt_algorithm=alg, jwt_private_key_file=str(pem)))


def test_settings_refuse_a_key_file_with_hs256(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="YM_JWT_PRIVATE_KEY_FILE"):
        settings(tmp_path, jwt_algorithm="HS256", jwt_secret=SECRET, jwt_private_key_file="/x.pem")


# ---- the negative matrix --------------------------------------------------------------------------------


def test_every_forged_or_broken_token_is_refused(issuer: AccessTokens, key_server: CountingServer) -> None:
    good = jwts.signed(issuer, jwts.good_claims(issuer))
    assert issuer.verify(good) is not None  # the forging itself is right: only the flaw differs
    forged = jwts.matrix(issuer, "u1", "user", key_server.url)
    assert len(forged) >= 16
    refused = {name for name, token in forged.items() if issuer.verify(token) is None}
    assert refused == set(forged)
    assert key_server.requests == []  # jku / x5u were never fetched


def test_a_token_signed_by_the_key_its_own_header_carries_is_refused(tmp_path: Path, key_server: CountingServer) -> None:
    issuer = issuer_for(load_signing_key(settings(tmp_path)))
    token, attacker = jwts.with_embedded_key(issuer, jwts.good_claims(issuer), key_server.url)
    assert jwts.jwt.decode(token, attacker, algorithms=["EdDSA"]).claims["sub"] == "u1"  # validly signed…
    assert issuer.verify(token) is None  # …by a key that is not ours
    assert key_server.requests == []


def test_clock_skew_within_the_leeway_is_tolerated_and_beyond_it_refused(tmp_path: Path) -> None:
    key = load_signing_key(settings(tmp_path))
    now = time.time()
    token, _ = issuer_for(key, clock=now).issue("u1", "user")
    assert issuer_for(key, clock=now - LEEWAY_S + 5).verify(token) is not None  # a verifier a bit behind
    assert issuer_for(key, clock=now - LEEWAY_S - 5).verify(token) is None  # nbf too far ahead
    assert issuer_for(key, clock=now + 900 + LEEWAY_S - 5).verify(token) is not None
    assert issuer_for(key, clock=now + 900 + LEEWAY_S + 5).verify(token) is None  # expired


@pytest.mark.parametrize(
    "garbage",
    ["", ".", "..", "a.b.c", "eyJ.eyJ.sig", "x" * 5000, "\u00e9.\u00e9.\u00e9", "e30.e30.", "W10.e30.", "e30.W10.AA"],
)
def test_garbage_is_refused_without_an_exception(issuer: AccessTokens, garbage: str) -> None:
    assert issuer.verify(garbage) is None


def test_claims_of_the_wrong_type_are_refused(issuer: AccessTokens) -> None:
    for changes in ({"role": ["admin"]}, {"role": "root"}, {"sub": 7}, {"exp": "later"}, {"aud": 3}):
        assert issuer.verify(jwts.signed(issuer, jwts.good_claims(issuer, **changes))) is None, changes
