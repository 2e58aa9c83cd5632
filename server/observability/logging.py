"""Structured JSON logs, one object per line, with the request id of the current request.

Every line passes `RedactSecrets` first: query strings (which carry `?ticket=`), Yardmaster
tokens and credential headers are replaced wherever they appear in a record (message, args,
extra values, traceback), whichever library logged it. uvicorn logs every WebSocket handshake
path with its query string at INFO, and the websockets library logs request headers at DEBUG.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_RESERVED = _STANDARD | {"color_message"}

REDACTED = "[redacted]"
# `/path?anything` -> `/path?[redacted]`: a query string after a path (or a URL's host).
_QUERY = re.compile(r"(/[^\s?\"'<>]*)\?[^\s\"'<>]+")
# ymk_ API keys, yma_ agent tokens, ymr_ refresh tokens, ymt_ WebSocket tickets, wherever they appear.
_TOKEN = re.compile(r"\b(ym[katr])_[A-Za-z0-9_\-]+")
# A JWS in compact form (access tokens, ID tokens): base64url JSON header "eyJ…", payload, signature.
_JWT = re.compile(r"\beyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
# `Authorization: Bearer …` as the websockets library logs request headers (at DEBUG).
_HEADER = re.compile(r"(?i)\b(authorization|proxy-authorization|cookie|set-cookie|x-api-key)(\s*[:=]\s*)[^\r\n]+")


def redact(text: str) -> str:
    text = _QUERY.sub(rf"\1?{REDACTED}", text)
    text = _TOKEN.sub(rf"\1_{REDACTED}", text)
    text = _JWT.sub(f"jwt:{REDACTED}", text)
    return _HEADER.sub(rf"\1\2{REDACTED}", text)


def _redact_value(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bytes):
        return redact(value.decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_redact_value(v) for v in value]
    return value


class RedactSecrets(logging.Filter):
    """On the handler, so it sees records of every logger (uvicorn's, websockets', ours)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # mismatched args: keep what can be kept, without the args
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and not key.startswith("_"):
                record.__dict__[key] = _redact_value(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_text:
            entry["exc"] = record.exc_text
        elif record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Access logs would add a line per HTTP request; their query strings would be redacted too.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
