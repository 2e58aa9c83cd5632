"""A small synchronous Python client for the Yardmaster HTTP API and the client WebSocket.

    client = YardmasterClient("http://127.0.0.1:8080", api_key)
    job = client.submit_job({"image": "busybox", "command": ["echo", "hi"]})
    final = client.follow_logs(job["id"], on_log=lambda e: print(e.text, end=""))

Errors from the server raise `RequestRefused`; a server that cannot be reached raises
`ServerUnreachable`. Neither ever carries the API key.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
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

__all__ = ["RequestRefused", "ServerUnreachable", "YardmasterClient", "LogHandler", "StateHandler"]

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

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status = status
        self.code = code
        self.message = message
        self.field = field


class ServerUnreachable(Exception):
    """No connection to the server could be made (refused, DNS, TLS, timeout)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach the server at {url}: {reason}")
        self.url = url
        self.reason = reason


def _error_from_body(status: int, body: bytes, reason: str) -> RequestRefused:
    try:
        err = json.loads(body)["error"]
        return RequestRefused(status, str(err.get("code") or f"http-{status}"), str(err.get("message") or reason),
                        err.get("field"))
    except (ValueError, KeyError, TypeError, AttributeError):
        snippet = body[:200].decode("utf-8", "replace").strip()
        return RequestRefused(status, f"http-{status}", snippet or reason)


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
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, ca_file: str | None = None) -> None:
        """`ca_file` (default: $YM_CA_FILE): PEM CA certificate(s) to trust for https:// and wss://."""
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._tls = tls_context(ca_file if ca_file is not None else os.environ.get("YM_CA_FILE") or None)
        self._http = httpx.Client(
            verify=self._tls if self._tls is not None else True,
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT},
            timeout=timeout,
            transport=transport,
        )

    def __repr__(self) -> str:  # never show the key
        return f"YardmasterClient({self.base_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> YardmasterClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- HTTP ------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.base_url, _tls_reason(exc) or str(exc) or type(exc).__name__) from None
        if resp.status_code >= 400:
            raise _error_from_body(resp.status_code, resp.content, resp.reason_phrase)
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

    @property
    def next_offset(self) -> int:
        return self.feed.next_offset or 0

    def run(self) -> m.JobStateMsg:
        failures = 0
        while self.final is None:
            try:
                if self._session():
                    failures = 0
            except InvalidStatus as exc:
                resp = exc.response
                raise _error_from_body(resp.status_code, resp.body or b"", resp.reason_phrase) from None
            except InvalidURI as exc:
                raise ServerUnreachable(self.client.base_url, str(exc)) from None
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
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
        with ws_connect(
            url,
            ssl=self.client._tls if url.startswith("wss://") else None,
            additional_headers={"Authorization": f"Bearer {self.client._api_key}"},
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
