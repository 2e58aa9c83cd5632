"""A small synchronous Python client for the Yardmaster HTTP API and the client WebSocket.

    client = YardmasterClient("http://127.0.0.1:8080", api_key)
    job = client.submit_job({"image": "busybox", "command": ["echo", "hi"]})
    final = client.follow_logs(job["id"], on_log=lambda e: print(e.text, end=""))

A user signs in with a password instead of an API key; the client then sends the access token
and, when it expires (or a request is answered 401), swaps the refresh token for new tokens once:

    client = YardmasterClient.login("https://yard.example", "ada", password)
    client.whoami()

Errors from the server raise `RequestRefused`; a server that cannot be reached raises
`ServerUnreachable`. Neither (nor any repr) ever carries a key, token or password.
"""

from __future__ import annotations

import json
import math
import os
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import msgspec
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import connect as ws_connect

from yardmaster.protocol import messages as m
from yardmaster.protocol import urls
from yardmaster.protocol.close_codes import CloseCode
from yardmaster.protocol.codec import SUBPROTOCOL_JSON, DecodeError, client_reader_codec
from yardmaster.protocol.feed import Action, Deliver, FetchHistory, JobFeed, Skipped
from yardmaster.protocol.jobs import TERMINAL_STATES

__all__ = ["RequestRefused", "ServerUnreachable", "Tokens", "YardmasterClient", "LogHandler", "StateHandler"]

LogHandler = Callable[[m.Log], None]
StateHandler = Callable[[m.JobStateMsg], None]
TruncatedHandler = Callable[[m.Truncated], None]

USER_AGENT = "yardmaster-client/0.1"
_LOG_PAGE = 1000
_WS_MAX_BYTES = 16 << 20
_MAX_RECONNECTS = 8  # consecutive failed WebSocket sessions before giving up
# Closes after which a reconnect would be refused the same way (a 4008 or 1012 is resumed).
_FINAL_CLOSES = frozenset({CloseCode.REVOKED, CloseCode.PROTOCOL_ERROR, CloseCode.POLICY, CloseCode.TOO_BIG})


class RequestRefused(Exception):
    """The server refused a request. `status` is the HTTP status (0 for an `error` message
    received over the WebSocket); `code` is the machine-readable error code."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else "") + retry_hint(message, retry_after))
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after  # seconds, from a 429's Retry-After


class ServerUnreachable(Exception):
    """No connection to the server could be made (refused, DNS, TLS, timeout)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the server at {url}: {reason}")
        self.url = url
        self.reason = reason


def retry_hint(message: str, retry_after: float | None) -> str:
    """"; retry in N s" for a refusal that says when to come back (unless its message says so)."""
    if retry_after is None or "retry in" in message:
        return ""
    return f"; retry in {math.ceil(retry_after)} s"


def _error_from_body(status: int, body: bytes, reason: str, retry_after: str | None = None) -> RequestRefused:
    wait = _seconds(retry_after)
    try:
        err = json.loads(body)["error"]
        return RequestRefused(status, str(err.get("code") or f"http-{status}"), str(err.get("message") or reason),
                              err.get("field"), retry_after=wait)
    except (ValueError, KeyError, TypeError, AttributeError):
        snippet = body[:200].decode("utf-8", "replace").strip()
        return RequestRefused(status, f"http-{status}", snippet or reason, retry_after=wait)


def _seconds(header: str | None) -> float | None:
    try:
        return max(0.0, float(header)) if header is not None else None
    except ValueError:
        return None  # an HTTP date: not sent by Yardmaster


@dataclass(frozen=True)
class Tokens:
    """The tokens of a signed-in user (the OAuth 2.0 token response): a short-lived access token
    sent as `Authorization: Bearer`, and the single-use refresh token that gets new ones.
    `expires_at` is the access token's expiry in Unix seconds. Tokens never show in repr."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: float = 0.0

    @classmethod
    def from_response(cls, body: Any, now: float) -> Tokens:
        try:
            access = body["access_token"]
            if not isinstance(access, str) or not access:
                raise TypeError
            refresh = body.get("refresh_token")
            return cls(access, refresh if isinstance(refresh, str) and refresh else None,
                       now + float(body.get("expires_in") or 0))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise RequestRefused(200, "bad-response", "the server's token response has no access token") from None


# Swaps a refresh token for new tokens (POST /api/v1/auth/refresh); raises RequestRefused.
Exchange = Callable[[str], Tokens]
# How a client gets new tokens: called with the tokens the server refused (None: they are about
# to expire) and the exchange. The default exchanges the client's own refresh token; the CLI's
# re-reads its credentials file under a lock first (server/cli_auth.py).
Renew = Callable[[Tokens | None, Exchange], Tokens]
# An access token with less than this left is renewed before it is sent.
RENEW_BEFORE_S = 30.0


def tls_context(ca_file: str | None) -> ssl.SSLContext | None:
    """A TLS context trusting the PEM CA certificate(s) in `ca_file` instead of the defaults;
    None for None. Raises ValueError naming the file when it cannot be used."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use CA file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None


def plaintext_credential_warning(url: str) -> str | None:
    return urls.plaintext_credential_warning(url, "the API key and job output", "use https://")


def _tls_reason(exc: BaseException) -> str | None:
    """What to say when `exc` (or what caused it) is a refused server certificate."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (f"the server's TLS certificate is not trusted ({getattr(seen, 'verify_message', None) or seen}); "
                    "pass --ca-file or set YM_CA_FILE to the CA certificate that signed it")
        seen = seen.__cause__ or seen.__context__
    return None


def _ws_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/client", "", ""))


def entry_to_log(job_id: str, entry: dict[str, Any]) -> m.Log:
    """A log entry of the HTTP API as the same `Log` message the WebSocket delivers."""
    return m.Log(job_id=job_id, attempt=int(entry.get("attempt", 0)), offset=int(entry["offset"]),
                 stream=entry.get("stream", "stdout"), text=str(entry.get("text", "")))


def job_to_state(job: dict[str, Any]) -> m.JobStateMsg:
    return m.JobStateMsg(job_id=job["id"], state=job["state"], attempt=int(job.get("attempt") or 0),
                         exit_code=job.get("exit_code"), error=job.get("error"), agent_id=job.get("agent_id"))


class YardmasterClient:
    def __init__(self, base_url: str, api_key: str | None = None, *, tokens: Tokens | None = None,
                 renew: Renew | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, ca_file: str | None = None) -> None:
        """Authenticates with `api_key`, or with `tokens` (see `login`), or not at all (only the
        public routes then answer). `renew` replaces the default refresh (see `Renew`).
        `ca_file` (default: $YM_CA_FILE): PEM CA certificate(s) to trust for https:// and wss://."""
        if api_key is not None and tokens is not None:
            raise ValueError("give an API key or tokens, not both")
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._tokens = tokens
        self._renew_with = renew
        self._tls = tls_context(ca_file if ca_file is not None else os.environ.get("YM_CA_FILE") or None)
        self._http = httpx.Client(
            verify=self._tls if self._tls is not None else True,
            base_url=self.base_url,
            headers={"User-Agent": USER_AGENT},
            timeout=timeout,
            transport=transport,
        )

    @classmethod
    def login(cls, base_url: str, username: str, password: str, **options: Any) -> YardmasterClient:
        """Sign in with a username (or email) and password: a client holding the user's tokens.
        A refused sign-in raises RequestRefused (401 invalid-credentials, or 429
        too-many-attempts with `retry_after`)."""
        client = cls(base_url, **options)
        try:
            client.sign_in(username, password)
        except BaseException:
            client.close()
            raise
        return client

    def __repr__(self) -> str:  # never show a key or token
        return f"YardmasterClient({self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> YardmasterClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- credentials -----------------------------------------------------------------------

    @property
    def tokens(self) -> Tokens | None:
        """The current tokens (they change on every refresh: keep the latest to resume later)."""
        return self._tokens

    def sign_in(self, username: str, password: str) -> Tokens:
        """POST /api/v1/auth/login; from now on the client uses the new tokens."""
        body = self._json("POST", "/api/v1/auth/login", json={"username": username, "password": password},
                          auth=False)
        self._api_key = None
        self._tokens = Tokens.from_response(body, time.time())
        return self._tokens

    def refresh(self) -> Tokens:
        """Swap the refresh token for new tokens now (the old refresh token is spent)."""
        return self._renew(self._tokens)

    def logout(self) -> None:
        """POST /api/v1/auth/logout: the server revokes the refresh token's session and refuses
        the access token from now on, on every replica. The client then holds no tokens."""
        tokens = self._tokens
        if tokens is None:
            raise ValueError("this client is not signed in with tokens")
        # No renewal first: that would spend the refresh token only to revoke it. The refresh
        # token alone is enough; the access token goes along while it is still good.
        bearer = tokens.access_token if tokens.access_token and tokens.expires_at > time.time() else None
        body = {"refresh_token": tokens.refresh_token} if tokens.refresh_token else None
        resp = self._send("POST", "/api/v1/auth/logout", bearer, json=body)
        if resp.status_code >= 400:
            raise _error_from_body(resp.status_code, resp.content, resp.reason_phrase, resp.headers.get("retry-after"))
        self._tokens = None

    def _exchange(self, refresh_token: str) -> Tokens:
        body = self._json("POST", "/api/v1/auth/refresh", json={"refresh_token": refresh_token}, auth=False)
        return Tokens.from_response(body, time.time())

    def _renew(self, stale: Tokens | None) -> Tokens:
        if self._renew_with is not None:
            tokens = self._renew_with(stale, self._exchange)
        elif self._tokens is not None and self._tokens.refresh_token:
            tokens = self._exchange(self._tokens.refresh_token)
        else:
            raise RequestRefused(401, "unauthorized", "the access token was refused and there is no refresh token")
        self._tokens = tokens
        return tokens

    def _can_renew(self) -> bool:
        return self._tokens is not None and (self._renew_with is not None or bool(self._tokens.refresh_token))

    def _bearer(self) -> str | None:
        """The credential to send now, renewing an access token that is about to expire."""
        if self._api_key is not None:
            return self._api_key
        if self._tokens is None:
            return None
        if self._tokens.expires_at - time.time() < RENEW_BEFORE_S and self._can_renew():
            self._renew(None)
        return self._tokens.access_token

    # ---- HTTP ------------------------------------------------------------------------------

    def _send(self, method: str, path: str, bearer: str | None, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else None
        try:
            return self._http.request(method, path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.base_url, _tls_reason(exc) or str(exc) or type(exc).__name__) from None

    def _request(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> httpx.Response:
        """`auth=False`: send no credential (sign-in and refresh carry their own)."""
        resp = self._send(method, path, self._bearer() if auth else None, **kwargs)
        if resp.status_code == 401 and auth and self._api_key is None and self._can_renew():
            # The access token may have been refused for its age alone: renew once and retry
            # (a refused request changed nothing on the server). self._tokens are the ones sent.
            self._renew(self._tokens)
            resp = self._send(method, path, self._bearer(), **kwargs)
        if resp.status_code >= 400:
            raise _error_from_body(resp.status_code, resp.content, resp.reason_phrase, resp.headers.get("retry-after"))
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._request(method, path, **kwargs)
        try:
            return resp.json()
        except ValueError:
            raise RequestRefused(resp.status_code, "bad-response", "the server sent a response that is not JSON") from None

    def submit_job(self, spec: dict[str, Any] | msgspec.Struct) -> dict[str, Any]:
        body = msgspec.to_builtins(spec) if isinstance(spec, msgspec.Struct) else spec
        return self._json("POST", "/api/v1/jobs", json=body)  # type: ignore[no-any-return]

    def submit_jobs(self, specs: Sequence[dict[str, Any] | msgspec.Struct]) -> list[dict[str, Any]]:
        """Submit 1 to 1000 jobs in one request, all or none: a refused spec raises RequestRefused
        whose `field` starts with the spec's index (`[3].resources.memory_mb`) and stores nothing.
        Returns the jobs in the order of `specs`."""
        body = [msgspec.to_builtins(s) if isinstance(s, msgspec.Struct) else s for s in specs]
        return self._json("POST", "/api/v1/jobs", json=body)["jobs"]  # type: ignore[no-any-return]

    def list_jobs(self, state: str | None = None, limit: int | None = None,
                  before: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in (("state", state), ("limit", limit), ("before", before)) if v is not None}
        return self._json("GET", "/api/v1/jobs", params=params)  # type: ignore[no-any-return]

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/jobs/{quote(job_id, safe='')}")  # type: ignore[no-any-return]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/api/v1/jobs/{quote(job_id, safe='')}/cancel")  # type: ignore[no-any-return]

    def get_logs(self, job_id: str, from_offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        params: dict[str, int] = {"from_offset": from_offset}
        if limit is not None:
            params["limit"] = limit
        return self._json("GET", f"/api/v1/jobs/{quote(job_id, safe='')}/logs",  # type: ignore[no-any-return]
                          params=params)

    def get_logs_text(self, job_id: str) -> str:
        return self._request("GET", f"/api/v1/jobs/{quote(job_id, safe='')}/logs",
                             params={"format": "text"}).text

    def iter_logs(self, job_id: str, from_offset: int = 0) -> Iterator[m.Log]:
        """Every stored log entry from `from_offset` on, page by page, in offset order."""
        offset = from_offset
        while True:
            page = self.get_logs(job_id, from_offset=offset, limit=_LOG_PAGE)
            progressed = False
            for entry in page.get("entries") or []:
                log = entry_to_log(job_id, entry)
                if log.offset < offset:
                    continue
                yield log
                offset = log.offset + 1
                progressed = True
            if not progressed:
                return

    def list_agents(self) -> list[dict[str, Any]]:
        return self._json("GET", "/api/v1/agents")["agents"]  # type: ignore[no-any-return]

    def create_agent(self, name: str, labels: list[str] | None = None, capacity: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "labels": labels or []}
        if capacity is not None:
            body["capacity"] = capacity
        return self._json("POST", "/api/v1/agents", json=body)  # type: ignore[no-any-return]

    def revoke_agent(self, agent_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/api/v1/agents/{quote(agent_id, safe='')}")  # type: ignore[no-any-return]

    def update_agent(self, agent_id: str, labels: list[str] | None = None, capacity: int | None = None) -> dict[str, Any]:
        """Change an agent's registered labels (`[]` clears them) and/or capacity; None leaves one as it is."""
        body: dict[str, Any] = {}
        if labels is not None:
            body["labels"] = labels
        if capacity is not None:
            body["capacity"] = capacity
        return self._json("PATCH", f"/api/v1/agents/{quote(agent_id, safe='')}", json=body)  # type: ignore[no-any-return]

    def drain_agent(self, agent_id: str) -> dict[str, Any]:
        return self._json("POST", f"/api/v1/agents/{agent_id}/drain")  # type: ignore[no-any-return]

    def create_ws_ticket(self) -> dict[str, Any]:
        return self._json("POST", "/api/v1/ws-tickets")  # type: ignore[no-any-return]

    # ---- users, keys, audit ----------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        """The caller's own user (GET /api/v1/users/me)."""
        return self._json("GET", "/api/v1/users/me")  # type: ignore[no-any-return]

    def update_me(self, **profile: Any) -> dict[str, Any]:
        """Change the caller's first_name, last_name, image_url, phone or metadata."""
        return self._json("PATCH", "/api/v1/users/me", json=profile)  # type: ignore[no-any-return]

    def change_password(self, current_password: str | None, new_password: str) -> None:
        """Also signs out the user's other sessions (their refresh tokens are revoked)."""
        body: dict[str, Any] = {"new_password": new_password}
        if current_password is not None:
            body["current_password"] = current_password
        self._request("POST", "/api/v1/users/me/password", json=body)

    def create_key(self, name: str, expires_in_days: int | None = None,
                   scopes: Sequence[str] | None = None) -> dict[str, Any]:
        """A new API key of the caller: its view plus the secret in "key" (shown this once).
        `scopes` None: every scope of the caller's role."""
        body: dict[str, Any] = {"name": name}
        if expires_in_days is not None:
            body["expires_in_days"] = expires_in_days
        if scopes is not None:
            body["scopes"] = list(scopes)
        return self._json("POST", "/api/v1/keys", json=body)  # type: ignore[no-any-return]

    def list_keys(self, all_users: bool = False) -> list[dict[str, Any]]:
        """The caller's keys; `all_users` (users:admin): everyone's."""
        params = {"all": "true"} if all_users else None
        return self._json("GET", "/api/v1/keys", params=params)["keys"]  # type: ignore[no-any-return]

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        """Revoke one of the caller's keys (an admin: anyone's). The key's view, or {} when the
        server sends none."""
        resp = self._request("DELETE", f"/api/v1/keys/{quote(key_id, safe='')}")
        return resp.json() if resp.content else {}  # type: ignore[no-any-return]

    def create_user(self, username: str, password: str | None = None, **profile: Any) -> dict[str, Any]:
        """(users:admin) `profile`: email, first_name, last_name, image_url, phone, metadata, role.
        Without a password the user can sign in only by single sign-on."""
        body: dict[str, Any] = {"username": username, **{k: v for k, v in profile.items() if v is not None}}
        if password is not None:
            body["password"] = password
        return self._json("POST", "/api/v1/users", json=body)  # type: ignore[no-any-return]

    def list_users(self, limit: int | None = None, after: str | None = None) -> dict[str, Any]:
        """(users:admin) One page: {"users": [...], "next": the `after` of the next page, or None}."""
        params = {k: v for k, v in (("limit", limit), ("after", after)) if v is not None}
        return self._json("GET", "/api/v1/users", params=params)  # type: ignore[no-any-return]

    def get_user(self, user_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/users/{quote(user_id, safe='')}")  # type: ignore[no-any-return]

    def update_user(self, user_id: str, role: str | None = None, disabled: bool | None = None) -> dict[str, Any]:
        """(users:admin) Change a user's role and/or disable (True) or enable (False) them;
        disabling revokes their keys and sessions. None leaves a field as it is."""
        body: dict[str, Any] = {}
        if role is not None:
            body["role"] = role
        if disabled is not None:
            body["disabled"] = disabled
        return self._json("PATCH", f"/api/v1/users/{quote(user_id, safe='')}", json=body)  # type: ignore[no-any-return]

    def delete_user(self, user_id: str) -> None:
        self._request("DELETE", f"/api/v1/users/{quote(user_id, safe='')}")

    def list_audit(self, actor: str | None = None, action: str | None = None, since: str | float | None = None,
                   before: str | None = None, limit: int | None = None) -> dict[str, Any]:
        """(users:admin) Audit entries, newest first: {"entries": [...], "next": the `before` of
        the next page, or None}. `action` is exact, or a prefix ending in "." (`login.`);
        `since` is RFC 3339 or Unix seconds."""
        params = {k: v for k, v in (("actor", actor), ("action", action), ("since", since), ("before", before),
                                    ("limit", limit)) if v is not None}
        return self._json("GET", "/api/v1/audit", params=params)  # type: ignore[no-any-return]

    # ---- WebSocket -------------------------------------------------------------------------

    def follow_logs(self, job_id: str, from_offset: int = 0, on_log: LogHandler | None = None,
                    on_state: StateHandler | None = None,
                    on_truncated: TruncatedHandler | None = None) -> m.JobStateMsg:
        """Stream a job's logs and state changes until it is finished and its logs are complete.

        Returns the terminal `job-state`. Each log entry is handed to `on_log` exactly once, in
        offset order; a dropped connection is resumed from the last offset + 1.
        """
        follower = _Follower(self, job_id, from_offset, on_log, on_state, on_truncated)
        return follower.run()


class _Follower:
    """Follows one job over the client channel. Offsets are kept by a pure `JobFeed`: entries
    come from the socket (and, to fill a gap or finish, from the logs API), each exactly once."""

    def __init__(self, client: YardmasterClient, job_id: str, from_offset: int, on_log: LogHandler | None,
                 on_state: StateHandler | None, on_truncated: TruncatedHandler | None) -> None:
        self.client = client
        self.job_id = job_id
        self.feed: JobFeed[m.Log] = JobFeed(next_offset=max(0, from_offset))
        self.on_log = on_log
        self.on_state = on_state
        self.on_truncated = on_truncated
        self.codec = client_reader_codec(_WS_MAX_BYTES)
        self.final: m.JobStateMsg | None = None
        self._last_state: tuple[str, int] | None = None
        self._renewed = False

    @property
    def next_offset(self) -> int:
        return self.feed.next_offset or 0

    def _renew_once(self) -> bool:
        """After a 401 handshake or a 4001 close: an access token may just have expired. Renew
        it once per subscription (a refused refresh raises RequestRefused)."""
        if self._renewed or self.client._api_key is not None or not self.client._can_renew():
            return False
        self._renewed = True
        self.client._renew(self.client._tokens)
        return True

    def run(self) -> m.JobStateMsg:
        failures = 0
        while self.final is None:
            try:
                if self._session():
                    failures = 0
            except InvalidStatus as exc:
                resp = exc.response
                if resp.status_code == 401 and self._renew_once():
                    continue
                raise _error_from_body(resp.status_code, resp.body or b"", resp.reason_phrase,
                                       resp.headers.get("Retry-After")) from None
            except InvalidURI as exc:
                raise ServerUnreachable(self.client.base_url, str(exc)) from None
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code == CloseCode.REVOKED and self._renew_once():
                    continue
                if code in _FINAL_CLOSES:
                    # Coming back would be refused again: say why instead of retrying.
                    reason = exc.rcvd.reason if exc.rcvd is not None else ""
                    raise RequestRefused(0, CloseCode(code).name.lower().replace("_", "-"),
                                         reason or f"connection closed with {code}") from None
                failures += 1
                if failures > _MAX_RECONNECTS:
                    raise ServerUnreachable(self.client.base_url, f"WebSocket lost: {exc}") from None
            except ssl.SSLCertVerificationError as exc:  # retrying would not make it trusted
                raise ServerUnreachable(self.client.base_url, _tls_reason(exc) or str(exc)) from None
            except (InvalidHandshake, OSError, TimeoutError) as exc:
                failures += 1
                if failures > _MAX_RECONNECTS:
                    raise ServerUnreachable(self.client.base_url, f"WebSocket lost: {exc}") from None
            if self.final is None:
                time.sleep(min(5.0, 0.2 * 2 ** failures))
        # The terminal state can overtake the last stored entries: take the rest from history.
        self._fill_from_history(self.next_offset)
        return self.final

    def _session(self) -> bool:
        """One WebSocket connection. Returns True when it got as far as `subscribed`."""
        subscribed = False
        url = _ws_url(self.client.base_url)
        bearer = self.client._bearer()
        with ws_connect(
            url,
            ssl=self.client._tls if url.startswith("wss://") else None,
            additional_headers={"Authorization": f"Bearer {bearer}"} if bearer else None,
            user_agent_header=USER_AGENT,
            subprotocols=[SUBPROTOCOL_JSON],  # type: ignore[list-item]
            compression=None,
            max_size=_WS_MAX_BYTES,
            open_timeout=10,
        ) as ws:
            ws.send(self.codec.encode(m.Subscribe(topic=f"job:{self.job_id}", from_offset=self.next_offset)))
            for frame in ws:
                try:
                    msg = self.codec.decode(frame)
                except DecodeError:
                    continue  # a message type newer than this client: ignore it
                if isinstance(msg, m.Subscribed):
                    subscribed = True
                    self._renewed = False
                    # The job may have finished before we subscribed, and a server need not
                    # repeat a past state: ask once, over HTTP.
                    job = self.client.get_job(self.job_id)
                    if job.get("state") in TERMINAL_STATES:
                        self._state(job_to_state(job))
                elif isinstance(msg, m.Log) and msg.job_id == self.job_id:
                    self._apply(self.feed.live(msg.offset, msg))
                elif isinstance(msg, m.Truncated) and msg.job_id == self.job_id:
                    self._apply(self.feed.truncated(msg.offset))
                elif isinstance(msg, m.JobStateMsg) and msg.job_id == self.job_id:
                    self._state(msg)
                elif isinstance(msg, m.Error):
                    raise RequestRefused(0, msg.code, msg.message or msg.code)
                if self.final is not None:
                    return subscribed
        return subscribed

    def _apply(self, actions: list[Action[m.Log]]) -> None:
        for action in actions:
            if isinstance(action, Deliver):
                if self.on_log:
                    self.on_log(action.item)
            elif isinstance(action, Skipped):
                if self.on_truncated:
                    self.on_truncated(m.Truncated(job_id=self.job_id, offset=action.offset))
            elif isinstance(action, FetchHistory):
                self._fill_from_history(action.from_offset)

    def _fill_from_history(self, from_offset: int) -> None:
        """Stored entries from `from_offset` on (a gap in the live stream, or the end of the job)."""
        fetch: int | None = from_offset
        while fetch is not None:
            entries = self.client.get_logs(self.job_id, from_offset=fetch, limit=_LOG_PAGE).get("entries") or []
            page = [(log.offset, log) for log in (entry_to_log(self.job_id, e) for e in entries)]
            fetch = None
            for action in self.feed.history(page, complete=len(entries) < _LOG_PAGE):
                if isinstance(action, FetchHistory):
                    fetch = action.from_offset
                else:
                    self._apply([action])
        self._apply(self.feed.release())

    def _state(self, msg: m.JobStateMsg) -> None:
        key = (msg.state, msg.attempt)
        if key != self._last_state:
            self._last_state = key
            if self.on_state:
                self.on_state(msg)
        if msg.state in TERMINAL_STATES:
            self.final = msg
