"""The agent's WebSocket client: connect, authenticate, resume, reconnect with backoff.

Protocol decisions live in `Supervisor`; this module only moves frames and decides when and
where to reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import urllib.parse
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from yardmaster.agent.supervisor import Emit, Supervisor
from yardmaster.protocol import messages as m
from yardmaster.protocol import urls
from yardmaster.protocol.close_codes import AGENT_FATAL, CloseCode
from yardmaster.protocol.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    SUBPROTOCOL_JSON,
    SUBPROTOCOL_MSGPACK,
    Codec,
    DecodeError,
    agent_client_codec,
)

log = logging.getLogger(__name__)

EXIT_FATAL_CLOSE = 3
# Closes after which coming back would not help (docs/protocol.md): the agent exits instead.
_FATAL_CLOSES = {
    CloseCode.REVOKED: "the server revoked the agent token",
    CloseCode.SUPERSEDED: "another connection of this agent superseded this one",
    CloseCode.PROTOCOL_ERROR: "the server refused this agent's protocol (upgrade the agent or the server)",
}
assert set(_FATAL_CLOSES) == AGENT_FATAL


class AuthRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"server refused the agent token (HTTP {status})")
        self.status = status


class TryLater(Exception):
    """The server refused the handshake for now (429: a rate limit), saying how long to wait."""

    def __init__(self, status: int, retry_after_s: float) -> None:
        super().__init__(f"server refused the handshake (HTTP {status}); retrying in at least {retry_after_s:g} s")
        self.status = status
        self.retry_after_s = retry_after_s


# A Retry-After longer than this is not believed (a misconfigured proxy must not park the agent).
MAX_RETRY_AFTER_S = 15 * 60


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header of delay-seconds (an HTTP date is not sent by Yardmaster)."""
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


class FatalClose(Exception):
    """The server closed in a way that means: do not come back (4001, 4002, 4003)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"{_FATAL_CLOSES[CloseCode(code)]} (close {int(code)})")
        self.code = code


def agent_ws_url(base: str) -> str:
    """`http://host:8000` → `ws://host:8000/ws/agent`; ws(s):// kept; path joined once."""
    url = urllib.parse.urlsplit(base.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(url.scheme.lower())
    if scheme is None or not url.netloc:
        raise ValueError(f"not an http(s):// or ws(s):// URL: {base!r}")
    path = url.path.rstrip("/")
    if not path.endswith("/ws/agent"):
        path += "/ws/agent"
    return urllib.parse.urlunsplit((scheme, url.netloc, path, url.query, ""))


def tls_context(ca_file: str | None) -> ssl.SSLContext | None:
    """The TLS context that trusts `ca_file` (PEM) instead of the system CAs; None: the system CAs.
    Raises ValueError naming the file when it cannot be read."""
    if ca_file is None:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use CA file {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None


def plaintext_credential_warning(url: str) -> str | None:
    return urls.plaintext_credential_warning(url, "the agent token and job traffic", "use wss:// (YM_TLS_CERT_FILE on the server, or a TLS proxy)")


def connect_error(exc: BaseException) -> str:
    """One line for a failed connection attempt; a TLS certificate that is not trusted says what to do."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the server's TLS certificate is not trusted ({getattr(exc, 'verify_message', None) or exc}); "
                "pass --ca-file or set YM_CA_FILE to the CA certificate that signed it")
    return str(exc) or type(exc).__name__


def backoff_delay(failures: int, base: float = 0.5, cap: float = 15.0, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**failures)]."""
    rng = rng or random.Random()
    return rng.uniform(0.0, min(cap, base * (2 ** min(failures, 32))))


@dataclass
class ConnectionSettings:
    urls: list[str]  # agent WebSocket URLs (see agent_ws_url)
    token: str
    use_json: bool = False
    ca_file: str | None = None  # PEM CA certificate(s) for wss:// instead of the system CAs
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 15.0
    open_timeout_s: float = 10.0


class _SessionEnd(Exception):
    def __init__(self, code: int | None, reason: str = "", established: bool = False) -> None:
        super().__init__(f"connection closed ({code} {reason})".strip())
        self.code = code
        self.established = established


class AgentConnection:
    def __init__(self, settings: ConnectionSettings, supervisor: Supervisor) -> None:
        if not settings.urls:
            raise ValueError("at least one server URL is needed")
        self.settings = settings
        self.supervisor = supervisor
        self._stop = asyncio.Event()
        self._rng = random.Random()
        self._in_session = False
        self._subprotocol = SUBPROTOCOL_JSON if settings.use_json else SUBPROTOCOL_MSGPACK
        self._tls = tls_context(settings.ca_file)

    def request_stop(self) -> None:
        """Shut down: called from the SIGTERM/SIGINT handler."""
        self._stop.set()

    async def run(self) -> int:
        """Stay connected until drained (0), stopped (0), or refused. Raises AuthRefused, FatalClose."""
        index = 0
        failures = 0
        while not self._stop.is_set():
            url = self.settings.urls[index % len(self.settings.urls)]
            delay: float
            try:
                return await self._connect_or_stop(url)
            except (AuthRefused, FatalClose):
                raise
            except TryLater as later:
                # The limit is per agent across replicas: another server would refuse it too.
                log.warning("cannot connect to %s: %s", url, later)
                delay = max(later.retry_after_s, backoff_delay(failures, self.settings.backoff_base_s,
                                                               self.settings.backoff_cap_s, self._rng))
                failures += 1
            except _SessionEnd as end:
                if end.code == CloseCode.RESTARTING:
                    log.info("server %s is restarting; reconnecting to the next one", url)
                    index += 1
                    failures = 0
                    delay = self._rng.uniform(0.0, 0.25)
                else:
                    if end.established:
                        failures = 0
                    # Try the next server first: the one that dropped us may be the one that died
                    # (a killed replica closes nothing), and every replica can take us.
                    index += 1
                    log.warning("connection to %s lost: %s", url, end)
                    delay = backoff_delay(failures, self.settings.backoff_base_s, self.settings.backoff_cap_s, self._rng)
                    failures += 1
            except (OSError, InvalidHandshake, TimeoutError, ConnectionClosed, DecodeError) as exc:
                log.warning("cannot connect to %s: %s", url, connect_error(exc))
                index += 1
                delay = backoff_delay(failures, self.settings.backoff_base_s, self.settings.backoff_cap_s, self._rng)
                failures += 1
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except TimeoutError:
                pass
        return 0

    async def _connect_or_stop(self, url: str) -> int:
        """Connect and run a session; a stop request during the handshake abandons it."""
        attempt = asyncio.create_task(self._connect_once(url))
        stopper = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({attempt, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not attempt.done() and not self._in_session:
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)
                return 0
            return await attempt  # a live session handles the stop itself (close 1001)
        finally:
            stopper.cancel()

    async def _connect_once(self, url: str) -> int:
        # websockets refuses an ssl argument for ws://, and makes a default context for wss://.
        tls = {"ssl": self._tls} if self._tls is not None and url.startswith("wss://") else {}
        try:
            ws = await connect(
                url,
                additional_headers={"Authorization": f"Bearer {self.settings.token}"},
                subprotocols=[Subprotocol(self._subprotocol)],
                compression=None,
                max_size=DEFAULT_MAX_MESSAGE_BYTES,
                open_timeout=self.settings.open_timeout_s,
                proxy=None,  # loopback/LAN servers only: never route through an environment proxy
                origin=None,
                **tls,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AuthRefused(status) from None
            wait = retry_after_s(exc.response.headers.get("Retry-After"))
            if status == 429 and wait is not None:
                raise TryLater(status, wait) from None
            raise
        try:
            return await self._session(ws, url)
        finally:
            self._in_session = False
            self.supervisor.detach()
            await ws.close()

    async def _session(self, ws: ClientConnection, url: str) -> int:
        codec: Codec[m.ServerToAgent] = agent_client_codec(ws.subprotocol or self._subprotocol)
        try:
            await ws.send(codec.encode(self.supervisor.hello()))
            first = codec.decode(await asyncio.wait_for(ws.recv(), timeout=self.settings.open_timeout_s))
        except ConnectionClosed as exc:
            raise self._closed(exc, established=False) from None
        if not isinstance(first, m.Welcome):
            await ws.close(CloseCode.PROTOCOL_ERROR, "expected welcome")
            raise _SessionEnd(CloseCode.PROTOCOL_ERROR, f"expected welcome, got {m.tag_of(first)}")
        log.info("connected to %s as agent %s (session %s)", url, first.agent_id, first.session_id)

        outbox: asyncio.Queue[bytes | str] = asyncio.Queue()

        def emit(msg: m.AgentToServer) -> None:
            outbox.put_nowait(codec.encode(msg))

        self._in_session = True
        for reply in self.supervisor.handle(first):
            emit(reply)
        self.supervisor.attach(emit)

        tasks = {
            asyncio.create_task(self._writer(ws, outbox), name="writer"),
            asyncio.create_task(self._reader(ws, codec, emit), name="reader"),
            asyncio.create_task(self._heartbeats(emit), name="heartbeat"),
            asyncio.create_task(self.supervisor.drained.wait(), name="drained"),
            asyncio.create_task(self._stop.wait(), name="stop"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.supervisor.detach()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        finished = done.pop()
        name = finished.get_name()
        if name == "drained":
            await self._flush(ws, outbox)
            log.info("drained: every job delivered, closing")
            await ws.close(CloseCode.NORMAL, "drained")
            return 0
        if name == "stop":
            log.info("shutting down")
            await self.supervisor.shutdown()
            await ws.close(CloseCode.GOING_AWAY, "agent shutting down")
            return 0
        exc = finished.exception()
        if isinstance(exc, ConnectionClosed):
            raise self._closed(exc, established=True) from None
        if exc is not None:
            raise exc
        raise _SessionEnd(None, f"{name} ended", established=True)

    def _closed(self, exc: ConnectionClosed, established: bool) -> Exception:
        code = exc.rcvd.code if exc.rcvd is not None else None
        reason = exc.rcvd.reason if exc.rcvd is not None else ""
        if code in _FATAL_CLOSES:
            return FatalClose(code)
        return _SessionEnd(code, reason, established)

    async def _writer(self, ws: ClientConnection, outbox: asyncio.Queue[bytes | str]) -> None:
        while True:
            await ws.send(await outbox.get())

    async def _flush(self, ws: ClientConnection, outbox: asyncio.Queue[bytes | str]) -> None:
        try:
            while not outbox.empty():
                await ws.send(outbox.get_nowait())
        except ConnectionClosed:
            pass

    async def _reader(self, ws: ClientConnection, codec: Codec[m.ServerToAgent], emit: Emit) -> None:
        while True:
            frame = await ws.recv()
            try:
                msg = codec.decode(frame)
            except DecodeError as exc:
                log.warning("undecodable message from the server: %s", exc)
                emit(exc.to_error())
                continue
            for reply in self.supervisor.handle(msg):
                emit(reply)

    async def _heartbeats(self, emit: Emit) -> None:
        while True:
            await asyncio.sleep(self.supervisor.heartbeat_interval_s)
            emit(self.supervisor.heartbeat())

