"""Running the ASGI app under uvicorn with the settings DESIGN §10 asks for."""

from __future__ import annotations

import os

import uvicorn

from yardmaster.server.app import build_app
from yardmaster.server.observability.logging import configure_logging
from yardmaster.server.settings import Settings, SettingsError
from yardmaster.server.transport import QuietWebSocketProtocol, http_protocol_class


def _check_readable(variable: str, path: str | None) -> None:
    if path is not None and not os.access(path, os.R_OK):
        raise SettingsError(f"{variable}: cannot read {path}")


WS_FRAME_SLACK = 64 * 1024


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    _check_readable("YM_TLS_CERT_FILE", settings.tls_cert_file)
    _check_readable("YM_TLS_KEY_FILE", settings.tls_key_file)
    return uvicorn.Config(
        build_app(settings, tune_gc=True),
        host=settings.host,
        port=settings.port,
        http=http_protocol_class(settings.handshake_timeout_s),  # httptools, plus a request-head timeout
        ws=QuietWebSocketProtocol,  # websockets-sansio: cheapest per frame and per idle socket in our measurements
        # A little above the channels' own limits: a message just over a limit is read whole and
        # refused by the channel (close 1009 after the read), instead of the transport closing
        # mid-frame while the peer is still writing (which peers see as a reset, not a 1009).
        ws_max_size=max(settings.max_agent_message_bytes, settings.max_client_message_bytes) + WS_FRAME_SLACK,
        ws_per_message_deflate=False,  # ~2.2x CPU per frame for log fan-out, for little gain
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        limit_concurrency=settings.limit_concurrency,
        # X-Forwarded-For/-Proto are read by the app's own ProxyHeadersMiddleware (app.py), from
        # YM_TRUSTED_PROXIES only, so in-process tests and the server behave the same. uvicorn's
        # own default would trust loopback, or $FORWARDED_ALLOW_IPS.
        proxy_headers=False,
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        server_header=False,
    )


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level)
    uvicorn.Server(uvicorn_config(settings)).run()
