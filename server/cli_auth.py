"""Where `yardmaster login` keeps its sessions, and which credential a CLI command uses.

The file is `$XDG_CONFIG_HOME/yardmaster/credentials.json` (else `~/.config/yardmaster/…`),
directory 0700, file 0600, replaced atomically. It holds, per server URL, the refresh token and
the latest access token with its expiry (never a password), and which server `login` saw last:

    {"version": 1, "default": "https://yard.example",
     "sessions": {"https://yard.example": {"username": "ada", "refresh_token": "ymr_…", ...}}}

Refresh tokens are single use: two commands refreshing at once with the same token would look
like a stolen token to the server (which then revokes the whole session). So a refresh happens
under an exclusive lock on a file beside the credentials, and re-reads the file first: a
command that finds the token already rotated by another uses the new tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
    fcntl = None  # type: ignore[assignment]

from yardmaster.server.sdk import Tokens

DIR_MODE = 0o700
FILE_MODE = 0o600
FILE_NAME = "credentials.json"
LOCK_NAME = "credentials.lock"
FORMAT_VERSION = 1
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_DATA_DIR = "./.yardmaster"
# An access token this close to its expiry is renewed before use rather than after a 401.
RENEW_MARGIN_S = 60.0

Environ = Mapping[str, str]
Exchange = Callable[[str], Tokens]


class CredentialsError(Exception):
    """The credentials file cannot be read or written (the message names the file, never a token)."""


class NotSignedIn(Exception):
    """No credential at all for the command."""


def config_dir(environ: Environ) -> Path:
    """`$XDG_CONFIG_HOME/yardmaster`, else `~/.config/yardmaster` (a relative XDG_CONFIG_HOME
    is ignored, as the XDG base directory specification says)."""
    xdg = environ.get("XDG_CONFIG_HOME") or ""
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "yardmaster"
    home = environ.get("HOME") or str(Path.home())
    return Path(home) / ".config" / "yardmaster"


def normalize_url(url: str) -> str:
    """The form a server URL is stored under: scheme and host lower-case, no trailing slash."""
    parts = urlsplit(url.strip())
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class StoredSession:
    """One server's session as kept in the file. Tokens are left out of repr."""

    url: str
    username: str
    refresh_token: str = field(repr=False)
    user_id: str | None = None
    access_token: str | None = field(default=None, repr=False)
    access_expires_at: float = 0.0
    saved_at: float = 0.0

    def tokens(self) -> Tokens:
        return Tokens(access_token=self.access_token or "", refresh_token=self.refresh_token,
                      expires_at=self.access_expires_at if self.access_token else 0.0)

    def with_tokens(self, tokens: Tokens, now: float) -> StoredSession:
        return replace(self, refresh_token=tokens.refresh_token or self.refresh_token,
                       access_token=tokens.access_token, access_expires_at=tokens.expires_at, saved_at=now)

    def to_json(self) -> dict[str, Any]:
        return {"username": self.username, "user_id": self.user_id, "refresh_token": self.refresh_token,
                "access_token": self.access_token, "access_expires_at": self.access_expires_at,
                "saved_at": self.saved_at}

    @classmethod
    def from_json(cls, url: str, data: Any) -> StoredSession | None:
        if not isinstance(data, dict) or not isinstance(data.get("refresh_token"), str) or not data["refresh_token"]:
            return None
        access = data.get("access_token")
        return cls(url=url, username=str(data.get("username") or ""), refresh_token=data["refresh_token"],
                   user_id=data.get("user_id") if isinstance(data.get("user_id"), str) else None,
                   access_token=access if isinstance(access, str) and access else None,
                   access_expires_at=_number(data.get("access_expires_at")), saved_at=_number(data.get("saved_at")))


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


class CredentialStore:
    """The credentials file of one user. Every write replaces the whole file atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILE_NAME

    @classmethod
    def for_environ(cls, environ: Environ) -> CredentialStore:
        return cls(config_dir(environ))

    # ---- reading ---------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": FORMAT_VERSION, "default": None, "sessions": {}}
        except OSError as exc:
            raise CredentialsError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except ValueError:
            raise CredentialsError(f"{self.path} is damaged (not JSON): remove it and run `yardmaster login`") from None
        if not isinstance(data, dict) or not isinstance(data.get("sessions"), dict):
            raise CredentialsError(f"{self.path} is damaged: remove it and run `yardmaster login`")
        if data.get("version") != FORMAT_VERSION:
            raise CredentialsError(f"{self.path} was written by another version of yardmaster (format "
                                   f"{data.get('version')!r}): remove it and run `yardmaster login`")
        return data

    def get(self, url: str) -> StoredSession | None:
        key = normalize_url(url)
        return StoredSession.from_json(key, self._load()["sessions"].get(key))

    def default_url(self) -> str | None:
        default = self._load().get("default")
        return default if isinstance(default, str) and default else None

    # ---- writing ---------------------------------------------------------------------------

    def save(self, session: StoredSession, *, make_default: bool) -> None:
        data = self._load()
        key = normalize_url(session.url)
        data["sessions"][key] = session.to_json()
        if make_default:
            data["default"] = key
        self._write(data)

    def remove(self, url: str) -> bool:
        """Forget the session of `url`; True when there was one. The file goes when it is empty."""
        data = self._load()
        key = normalize_url(url)
        if data["sessions"].pop(key, None) is None:
            return False
        if data.get("default") == key:
            data["default"] = next(iter(data["sessions"]), None)
        if data["sessions"]:
            self._write(data)
        else:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        return True

    def _ensure_dir(self) -> None:
        try:
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            self.directory.mkdir(mode=DIR_MODE, exist_ok=True)
            # mkdir's mode is filtered by the umask, and the directory may predate us.
            os.chmod(self.directory, DIR_MODE)
        except OSError as exc:
            raise CredentialsError(f"cannot create {self.directory}: {exc.strerror or exc}") from None

    def _write(self, data: dict[str, Any]) -> None:
        """Write a new file beside the old one (0600 from its creation) and rename it over: a
        reader sees the old file or the new one, never half of one."""
        self._ensure_dir()
        data["version"] = FORMAT_VERSION
        payload = json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"
        tmp = self.directory / f".{FILE_NAME}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CredentialsError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across processes of this user (a no-op where there is no flock)."""
        self._ensure_dir()
        if fcntl is None:
            yield
            return
        try:
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise CredentialsError(f"cannot lock {self.directory / LOCK_NAME}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # ---- sessions --------------------------------------------------------------------------

    def renew(self, url: str, stale: Tokens | None, exchange: Exchange, now: Callable[[], float] = time.time) -> Tokens:
        """Usable tokens for `url`: the stored access token when it has more than RENEW_MARGIN_S
        left and is not `stale` (the one the server just refused), else a refresh (`exchange`
        swaps a refresh token for new tokens; it raises when the server refuses) whose result
        replaces the stored session."""
        with self.lock():
            session = self.get(url)
            if session is None:
                raise NotSignedIn(f"not signed in to {normalize_url(url)}: run `yardmaster login`")
            stored = session.tokens()
            refused = stale is not None and stale.access_token == stored.access_token
            if stored.access_token and not refused and stored.expires_at - now() > RENEW_MARGIN_S:
                return stored
            fresh = exchange(session.refresh_token)
            self.save(session.with_tokens(fresh, now()), make_default=False)
            return fresh


# ---- which credential a command uses ---------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """What a command authenticates with: an API key (given, or the local admin-key file) or
    the stored session of the server."""

    kind: Literal["api-key", "admin-key-file", "session"]
    url: str
    api_key: str | None = field(default=None, repr=False)
    session: StoredSession | None = None

    def describe(self) -> str:
        if self.kind == "session" and self.session is not None:
            return f"session of {self.session.username or 'a user'} at {self.url}"
        return "the admin key file" if self.kind == "admin-key-file" else "an API key"


def resolve_url(explicit: str | None, environ: Environ, store: CredentialStore | None) -> str:
    """--url, else YM_URL, else the server of the last `yardmaster login`, else the local default."""
    url = explicit or environ.get("YM_URL") or (store.default_url() if store is not None else None) or DEFAULT_URL
    return url.rstrip("/")


def admin_key_file(environ: Environ) -> Path:
    return Path(environ.get("YM_DATA_DIR") or DEFAULT_DATA_DIR) / "admin-key"


def resolve_credential(explicit_key: str | None, url: str, environ: Environ, store: CredentialStore | None) -> Credential:
    """In order: --api-key, YM_API_KEY, the stored session for `url`, $YM_DATA_DIR/admin-key."""
    if explicit_key:
        return Credential("api-key", url, api_key=explicit_key)
    if environ.get("YM_API_KEY"):
        return Credential("api-key", url, api_key=environ["YM_API_KEY"])
    session = store.get(url) if store is not None else None
    if session is not None:
        return Credential("session", url, session=session)
    path = admin_key_file(environ)
    try:
        key = path.read_text().strip()
    except OSError:
        key = ""
    if key:
        return Credential("admin-key-file", url, api_key=key)
    raise NotSignedIn(f"no API key and not signed in to {url}: run `yardmaster login`, pass --api-key, "
                      f"set YM_API_KEY, or start the server so that it writes {path}")
