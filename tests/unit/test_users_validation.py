"""What a user record may hold: the rules of core.users' request structs and checks (pure)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from yardmaster.protocol.jobs import validation_field
from yardmaster.server.core.users import (
    METADATA_MAX_BYTES,
    AdminChange,
    InvalidUser,
    NewUser,
    PasswordChange,
    Profile,
    Registration,
    check_metadata,
    check_password,
)


def decode(cls: type[Any], body: dict[str, Any]) -> Any:
    return msgspec.json.decode(json.dumps(body).encode(), type=cls)


def refused_field(cls: type[Any], body: dict[str, Any]) -> str | None:
    with pytest.raises(msgspec.ValidationError) as err:
        decode(cls, body)
    return validation_field(err.value)


@pytest.mark.parametrize(
    "username", ["a", "A", "0", "alice", "Alice.Smith", "bob_the-builder", "x" * 64, "u.2-_"]
)
def test_good_usernames(username: str) -> None:
    assert decode(NewUser, {"username": username}).username == username


@pytest.mark.parametrize(
    "username",
    ["", "x" * 65, ".alice", "-alice", "_alice", "al ice", "alice@example.com", "alice/..", "ålice", "alice\n", "al\x00ice"],
)
def test_bad_usernames_are_refused_naming_the_field(username: str) -> None:
    assert refused_field(NewUser, {"username": username}) == "username"


@pytest.mark.parametrize("email", ["a@b.co", "Alice.Smith+ci@mail.example.com", "x@" + "d" * 240 + ".com"])
def test_good_emails(email: str) -> None:
    assert decode(NewUser, {"username": "u", "email": email}).email == email


@pytest.mark.parametrize(
    "email", ["", "alice", "alice@", "@example.com", "alice@example", "a b@example.com", "a@@example.com",
              "a@example.com\n", "x@" + "d" * 250 + ".com"]
)
def test_bad_emails_are_refused(email: str) -> None:
    assert refused_field(NewUser, {"username": "u", "email": email}) == "email"


@pytest.mark.parametrize("field", ["first_name", "last_name"])
def test_names_are_at_most_100_characters_without_control_characters(field: str) -> None:
    assert getattr(decode(Profile, {field: "Zoë " + "x" * 96}), field) == "Zoë " + "x" * 96
    assert refused_field(Profile, {field: "x" * 101}) == field
    assert refused_field(Profile, {field: "Eve\x1b[31m"}) == field


def test_image_urls_are_http_or_https_and_at_most_2048_characters() -> None:
    for url in ("https://example.com/a.png", "http://127.0.0.1:8080/x?y=1", "HTTPS://EXAMPLE.COM/" + "a" * 2028):
        assert decode(Profile, {"image_url": url}).image_url == url
    for url in ("javascript:alert(1)", "ftp://example.com/a", "data:image/png;base64,AA", "https://", "https://a b",
                "//example.com/a", "https://example.com/" + "a" * 2029):
        assert refused_field(Profile, {"image_url": url}) == "image_url", url


def test_phone_numbers_are_at_most_32_of_digits_plus_spaces_parentheses_and_dashes() -> None:
    for phone in ("+1 (555) 010-0199", "0049 30 1234567", "1" * 32):
        assert decode(Profile, {"phone": phone}).phone == phone
    for phone in ("", "call me", "+1.555.0100", "1" * 33, "555\n0100", "555 0100\n"):
        assert refused_field(Profile, {"phone": phone}) == "phone", phone


def test_metadata_is_a_json_object_of_at_most_16_KiB() -> None:
    assert refused_field(Profile, {"metadata": ["a list"]}) == "metadata"
    assert refused_field(Profile, {"metadata": "text"}) == "metadata"
    check_metadata({"team": "infra", "nested": {"list": [1, 2.5, None, True]}})
    fits = {"k": "x" * (METADATA_MAX_BYTES - len('{"k":""}'))}
    assert len(msgspec.json.encode(fits)) == METADATA_MAX_BYTES
    check_metadata(fits)
    with pytest.raises(InvalidUser) as err:
        check_metadata({"k": "x" * (METADATA_MAX_BYTES - len('{"k":""}') + 1)})
    assert err.value.field == "metadata" and err.value.status == 422


def test_roles_are_admin_or_user() -> None:
    assert decode(NewUser, {"username": "u"}).role == "user"
    assert decode(NewUser, {"username": "u", "role": "admin"}).role == "admin"
    assert refused_field(NewUser, {"username": "u", "role": "root"}) == "role"
    assert refused_field(AdminChange, {"role": "Admin"}) == "role"


def test_a_profile_change_cannot_carry_a_role_or_anything_else_unknown() -> None:
    for field in ("role", "username", "email", "password_hash", "disabled"):
        assert refused_field(Profile, {field: "admin"}) == field
    assert refused_field(Registration, {"username": "u", "password": "p" * 12, "role": "admin"}) == "role"


def test_profile_fields_left_out_are_unset_and_nullable_ones_may_be_cleared() -> None:
    profile = decode(Profile, {"image_url": None, "phone": None})
    assert profile.image_url is None and profile.phone is None
    assert profile.first_name is msgspec.UNSET and profile.metadata is msgspec.UNSET
    assert refused_field(Profile, {"first_name": None}) == "first_name"


def test_a_registration_needs_a_password_and_an_admin_change_a_known_field() -> None:
    assert refused_field(Registration, {"username": "u"}) == "password"
    assert refused_field(AdminChange, {"username": "x"}) == "username"
    assert refused_field(AdminChange, {"disabled": "yes"}) == "disabled"
    assert refused_field(PasswordChange, {"current_password": "x" * 12}) == "new_password"


def test_password_rules_name_the_field_and_never_echo_the_password() -> None:
    check_password("twelve chars")
    for bad in ("eleven char", "ü" * 513):  # too short; over 1,024 bytes in UTF-8
        with pytest.raises(InvalidUser) as err:
            check_password(bad, "new_password")
        assert err.value.field == "new_password" and bad not in err.value.message
