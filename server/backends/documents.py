"""What every Store shares: records to and from plain documents, and the pure parts of
compare-and-set (the state/attempt check and applying validated changes).

Documents are what `msgspec.to_builtins` makes of a record, with bytes kept as bytes (BSON and
our SQLite columns store them natively). JSON text (for SQLite `doc` columns) comes from the
same structs through msgspec.json.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from functools import cache
import types
import typing
from typing import Any, TypeVar

import msgspec

from yardmaster.server.backends.records import AuditRecord, JobRecord, UserRecord

T = TypeVar("T", bound=msgspec.Struct)

_BUILTIN_TYPES = (bytes,)


def to_document(rec: msgspec.Struct) -> dict[str, Any]:
    doc = msgspec.to_builtins(rec, builtin_types=_BUILTIN_TYPES)
    assert isinstance(doc, dict)
    return doc


def from_document(doc: Mapping[str, Any], cls: type[T]) -> T:
    """Unknown keys (Mongo's `_id`, counters, TTL fields) are ignored."""
    return msgspec.convert(dict(doc), cls)


def to_json(rec: msgspec.Struct) -> bytes:
    return msgspec.json.encode(rec)


def from_json(data: bytes | str, cls: type[T]) -> T:
    return msgspec.json.decode(data, type=cls)


@cache
def _field_types(cls: type[msgspec.Struct]) -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(cls)}


def change_document(cls: type[msgspec.Struct], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Validate `changes` against the fields of `cls` and return them as document values.

    Raises ValueError for an unknown field name and msgspec.ValidationError (a ValueError too)
    for a value of the wrong type, so a bad change never reaches storage."""
    types = _field_types(cls)
    out: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in types:
            raise ValueError(f"{cls.__name__} has no field {name!r}")
        builtin = msgspec.to_builtins(value, builtin_types=_BUILTIN_TYPES)
        msgspec.convert(builtin, types[name])  # validation only
        out[name] = builtin
    return out


@cache
def _plain_types(cls: type[msgspec.Struct]) -> dict[str, frozenset[type]]:
    """Per field of `cls` whose type is made only of int, float, str, bool and None: those
    types. A value of exactly one of them is valid as it is (no conversion, no copy)."""
    plain: dict[str, frozenset[type]] = {}
    for name, tp in _field_types(cls).items():
        args = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
        if args and all(a in _PLAIN for a in args):
            plain[name] = frozenset(args)
    return plain


_PLAIN = (int, float, str, bool, type(None))


def apply_changes(rec: T, changes: Mapping[str, Any], increments: Mapping[str, int] | None = None) -> T:
    """A copy of `rec` with `changes` applied (validated as in `change_document`) and
    `increments` added (see `check_increments`)."""
    cls = type(rec)
    field_types = _field_types(cls)
    plain = _plain_types(cls)
    values: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for name, value in changes.items():
        # The common case (a float timestamp, a str id, None) needs no validation round trip:
        # this is on every compare-and-set of a job.
        if type(value) in plain.get(name, ()):
            values[name] = value
        else:
            rest[name] = value
    for name, v in change_document(cls, rest).items():
        values[name] = msgspec.convert(v, field_types[name])
    for name, step in check_increments(cls, increments).items():
        values[name] = values.get(name, getattr(rec, name)) + step
    return msgspec.structs.replace(rec, **values)


def check_increments(cls: type[msgspec.Struct], increments: Mapping[str, int] | None) -> Mapping[str, int]:
    """Increments are whole numbers added to integer fields of the record."""
    if not increments:
        return {}
    types = _field_types(cls)
    for name, step in increments.items():
        if types.get(name) is not int or type(step) is not int:
            raise ValueError(f"cannot increment {cls.__name__}.{name} by {step!r}")
    return increments


def matches(
    rec: JobRecord, expect_states: Collection[str], expect_attempt: int | None, expect_agent: str | None = None
) -> bool:
    """The compare part of compare-and-set on a job (None: that part is not checked)."""
    if rec.state not in expect_states:
        return False
    if expect_attempt is not None and rec.attempt != expect_attempt:
        return False
    return expect_agent is None or rec.agent_id == expect_agent


def job_changes(changes: Mapping[str, Any], fence_epoch: int | None) -> Mapping[str, Any]:
    """The changes an `update_job` applies: never the id; a fenced change also records its epoch."""
    if "id" in changes:
        raise ValueError("a job's id cannot change")
    return {**changes, "epoch": fence_epoch} if fence_epoch is not None else changes


def user_keys(rec: UserRecord) -> tuple[str, str | None, str | None]:
    """The unique keys of a user: casefolded username and email, and the OIDC identity."""
    identity = None
    if rec.oidc_issuer is not None and rec.oidc_subject is not None:
        identity = f"{rec.oidc_issuer}\n{rec.oidc_subject}"
    return rec.username.casefold(), None if rec.email is None else rec.email.casefold(), identity


def audit_matches(rec: AuditRecord, actor: str | None, action: str | None, since: float | None) -> bool:
    if actor is not None and rec.actor != actor:
        return False
    if action is not None and not (rec.action.startswith(action) if action.endswith(".") else rec.action == action):
        return False
    return since is None or rec.at >= since
