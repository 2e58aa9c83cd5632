"""Encoding and decoding of wire messages: MessagePack (binary frames) or JSON (text frames).

A Codec is bound to one channel direction pair: it decodes what the peer sends and encodes what
we send. Decoding never raises anything but `DecodeError`, whose `code` is the wire error code.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from yardmaster.protocol import messages as m

SUBPROTOCOL_MSGPACK = "yardmaster.v1.msgpack"
SUBPROTOCOL_JSON = "yardmaster.v1.json"
SUBPROTOCOLS = (SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON)

DEFAULT_MAX_MESSAGE_BYTES = 1 << 20  # 1 MiB: a log chunk carries at most 64 KiB of output
MAX_LOG_CHUNK_BYTES = 64 * 1024

In = TypeVar("In")


class DecodeError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def to_error(self) -> m.Error:
        return m.Error(code=self.code, message=str(self))


class _TypeProbe(msgspec.Struct):
    type: str


class Codec(Generic[In]):
    """Decodes messages of union type `In` and encodes any message, in one format."""

    def __init__(self, subprotocol: str, incoming: Any, known_tags: frozenset[str], max_bytes: int) -> None:
        if subprotocol not in SUBPROTOCOLS:
            raise ValueError(f"unsupported subprotocol {subprotocol!r}")
        self.subprotocol = subprotocol
        self.binary = subprotocol == SUBPROTOCOL_MSGPACK
        self.max_bytes = max_bytes
        self._known_tags = known_tags
        if self.binary:
            self._decoder: Any = msgspec.msgpack.Decoder(incoming)
            self._probe: Any = msgspec.msgpack.Decoder(_TypeProbe)
            self._encoder: Any = msgspec.msgpack.Encoder()
        else:
            self._decoder = msgspec.json.Decoder(incoming)
            self._probe = msgspec.json.Decoder(_TypeProbe)
            self._encoder = msgspec.json.Encoder()

    def encode(self, msg: msgspec.Struct) -> bytes | str:
        data = self._encoder.encode(msg)
        return data if self.binary else data.decode()

    def decode(self, frame: bytes | str) -> In:
        if isinstance(frame, str):
            if self.binary:
                raise DecodeError(m.ERR_MALFORMED, "text frame on a binary (msgpack) connection")
            frame = frame.encode()
        elif not self.binary:
            raise DecodeError(m.ERR_MALFORMED, "binary frame on a text (json) connection")
        if len(frame) > self.max_bytes:
            raise DecodeError(m.ERR_TOO_BIG, f"message of {len(frame)} bytes exceeds {self.max_bytes}")
        try:
            return self._decoder.decode(frame)  # type: ignore[no-any-return]
        except msgspec.ValidationError as exc:
            raise self._classify(frame, exc) from None
        except msgspec.DecodeError as exc:
            raise DecodeError(m.ERR_MALFORMED, f"undecodable message: {exc}") from None

    def _classify(self, frame: bytes, exc: msgspec.ValidationError) -> DecodeError:
        try:
            tag = self._probe.decode(frame).type
        except (msgspec.ValidationError, msgspec.DecodeError):
            return DecodeError(m.ERR_MALFORMED, "message has no string `type` field")
        if tag not in self._known_tags:
            return DecodeError(m.ERR_UNKNOWN_TYPE, f"unknown message type {tag[:64]!r}")
        return DecodeError(m.ERR_MALFORMED, f"invalid {tag[:64]} message: {exc}")


def agent_server_codec(subprotocol: str, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Codec[m.AgentToServer]:
    """The server's codec on the agent channel."""
    return Codec(subprotocol, m.AgentToServer, m.AGENT_TO_SERVER_TAGS, max_bytes)


def agent_client_codec(subprotocol: str, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Codec[m.ServerToAgent]:
    """The agent's codec on the agent channel."""
    return Codec(subprotocol, m.ServerToAgent, m.SERVER_TO_AGENT_TAGS, max_bytes)


def client_server_codec(max_bytes: int = 64 * 1024) -> Codec[m.ClientToServer]:
    """The server's codec on the client channel (always JSON text frames)."""
    return Codec(SUBPROTOCOL_JSON, m.ClientToServer, m.CLIENT_TO_SERVER_TAGS, max_bytes)


def client_reader_codec(max_bytes: int = 16 << 20) -> Codec[m.ServerToClient]:
    """A subscriber's codec on the client channel (CLI follower, tests)."""
    return Codec(SUBPROTOCOL_JSON, m.ServerToClient, m.SERVER_TO_CLIENT_TAGS, max_bytes)
