"""The pure rules of OIDC sign-in (server/security/oidc.py): where `next` may lead, which email
counts, the domain policy, and the profile a first sign-in creates."""

from __future__ import annotations

import pytest

from yardmaster.server.security.oidc import (
    domain_allowed,
    new_user_from,
    safe_next,
    username_base,
    username_candidates,
    verified_email,
)


@pytest.mark.parametrize(
    "value",
    [
        "/",
        "/jobs",
        "/jobs/job_1?view=logs&from=3#end",
        "/a//b",
    ],
)
def test_next_keeps_a_path_on_this_origin(value: str) -> None:
    assert safe_next(value) == value


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "jobs",
        "https://evil.example/",
        "http:/evil.example",
        "//evil.example/x",
        "/\\evil.example",
        "/\\/evil.example",
        "javascript:alert(1)",
        "/jobs\r\nSet-Cookie: x=1",
        "/\tevil",
        "/" + "a" * 3000,
    ],
)
def test_next_anywhere_else_is_root(value: str | None) -> None:
    assert safe_next(value) == "/"


def test_only_a_verified_well_formed_email_counts() -> None:
    assert verified_email({"email": "ada@example.com", "email_verified": True}) == "ada@example.com"
    assert verified_email({"email": "ada@example.com", "email_verified": "true"}) == "ada@example.com"
    assert verified_email({"email": "ada@example.com", "email_verified": False}) is None
    assert verified_email({"email": "ada@example.com"}) is None
    assert verified_email({"email": "not an email", "email_verified": True}) is None
    assert verified_email({"email": 42, "email_verified": True}) is None


def test_domain_policy() -> None:
    assert domain_allowed(None, ())
    assert domain_allowed("a@anything.example", ())
    allowed = ("Example.org", "@corp.example")
    assert domain_allowed("a@example.ORG", allowed)
    assert domain_allowed("a@corp.example", allowed)
    assert not domain_allowed(None, allowed)
    assert not domain_allowed("a@sub.example.org", allowed)
    assert not domain_allowed("a@example.org.evil.example", allowed)
    assert not domain_allowed("a@notexample.org", allowed)


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"preferred_username": "Ada"}, "ada"),
        ({"preferred_username": "ada lovelace!", "email": "x@y.z"}, "ada-lovelace"),
        ({"preferred_username": "Zoë"}, "zoe"),
        ({"preferred_username": "..._x"}, "x"),
        ({"preferred_username": "日本", "email": "kenji.t@example.com"}, "kenji.t"),
        ({"email": "+tag@example.com"}, "tag"),
        ({}, "user"),
        ({"preferred_username": "a" * 100}, "a" * 48),
    ],
)
def test_username_from_claims(claims: dict[str, str], expected: str) -> None:
    assert username_base(claims) == expected


def test_username_candidates_start_with_the_base_and_never_repeat() -> None:
    got = list(username_candidates("ada"))
    assert got[:3] == ["ada", "ada-2", "ada-3"] and len(set(got)) == len(got)


def test_a_claim_that_does_not_fit_is_left_out_of_the_new_profile() -> None:
    new = new_user_from(
        {"given_name": "A\x00da", "family_name": "L" * 300, "picture": "javascript:alert(1)"}, "ada", None
    )
    assert (new.username, new.first_name, len(new.last_name), new.image_url, new.role) == ("ada", "Ada", 100, None, "user")
    assert new.password is None
    assert new_user_from({"name": "Ada Lovelace"}, "ada", "ada@example.com").first_name == "Ada Lovelace"
