"""The log redaction filter: query strings, tokens and credential headers never reach a log line."""

from __future__ import annotations

import io
import json
import logging
import sys

from yardmaster.server.observability.logging import JsonFormatter, RedactSecrets, redact
from yardmaster.server.security import tokens

TICKET = "ymt_Zx9-_secretTicketBody"


def _emit(record: logging.LogRecord) -> dict[str, object]:
    """Through a handler set up as configure_logging sets up the root one."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactSecrets())
    handler.handle(record)
    return json.loads(out.getvalue())


def _record(msg: str, args: tuple[object, ...] = (), **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_uvicorns_websocket_line_keeps_the_path_and_loses_the_query_in_its_args() -> None:
    line = _emit(_record('%s - "WebSocket %s" %d', ("127.0.0.1:5000", f"/ws/client?ticket={TICKET}&x=1", 403)))
    assert line["msg"] == '127.0.0.1:5000 - "WebSocket /ws/client?[redacted]" 403'


def test_tokens_headers_extras_and_tracebacks_are_redacted() -> None:
    key, agent = tokens.new_token("api-key"), tokens.new_token("agent")
    # The websockets library logs request headers like this at DEBUG.
    assert _emit(_record("< %s: %s", ("Authorization", f"Bearer {key}")))["msg"] == "< Authorization: [redacted]"
    line = _emit(_record("agent %s connected", (agent,), url=f"ws://h/ws/client?ticket={TICKET}", seen=[key, {"k": key}]))
    try:
        raise RuntimeError(f"failed with {key}")
    except RuntimeError:
        record = _record("boom")
        record.exc_info = sys.exc_info()
    failure = _emit(record)
    text = json.dumps(line) + json.dumps(failure)
    for secret in (key, agent, TICKET):
        assert secret not in text
    assert line["msg"] == "agent yma_[redacted] connected"
    assert line["url"] == "ws://h/ws/client?[redacted]"
    assert "RuntimeError: failed with ymk_[redacted]" in str(failure["exc"])


def test_ordinary_text_is_left_alone() -> None:
    for text in ("what? nothing to hide", "job job_1 moved to /tmp/x", "a/b? yes", "ratio 3/4"):
        assert redact(text) == text
    assert redact(redact(f"/p?t={TICKET}")) == "/p?[redacted]"


def test_a_record_whose_args_do_not_fit_its_message_is_still_logged() -> None:
    assert _emit(_record("%s and %s", (f"/a?ticket={TICKET}",)))["msg"] == "%s and %s"


def test_refresh_tokens_and_jwts_are_redacted() -> None:
    refresh = tokens.new_token("refresh")
    jwt = "eyJhbGciOiJFZERTQSIsInR5cCI6ImF0K2p3dCJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJl-_x"
    text = redact(f"refresh={refresh} then access {jwt}, done")
    assert refresh not in text and jwt not in text and "c2lnbmF0dXJl" not in text
    assert text == "refresh=ymr_[redacted] then access jwt:[redacted], done"
