"""All server configuration, read from YM_* environment variables and validated at start."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields


class SettingsError(ValueError):
    """A YM_* variable has an invalid value; the message names it (never its secret value)."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: str = ".yardmaster"
    redis_url: str | None = None
    mongodb_url: str | None = None
    # Agents
    heartbeat_interval_s: float = 10.0
    lease_s: float = 30.0
    assign_ack_s: float = 10.0
    cancel_grace_s: float = 10.0
    # Timeouts are enforced on the agent; the server marks a job timed-out only this long after.
    timeout_slack_s: float = 30.0
    # Scheduler
    leader_lock_ttl_s: float = 10.0
    leader_renew_s: float = 3.0
    schedule_interval_s: float = 0.5
    reaper_interval_s: float = 1.0
    # Limits
    max_agent_message_bytes: int = 1 << 20
    max_client_message_bytes: int = 64 * 1024
    max_request_body_bytes: int = 1 << 20
    viewer_buffer_bytes: int = 1 << 20
    # Per-job stored output: head and tail are kept, the middle dropped (0: no cap).
    log_cap_bytes: int = 16 << 20
    ws_ticket_ttl_s: float = 30.0
    # Security
    allowed_origins: tuple[str, ...] = ()
    admin_key: str | None = field(default=None, repr=False)
    log_level: str = "info"
    replica_id: str | None = None

    @property
    def scale_out(self) -> bool:
        return self.redis_url is not None


_ENV_PREFIX = "YM_"


def _convert(name: str, raw: str, kind: str) -> object:
    env_name = _ENV_PREFIX + name.upper()
    try:
        if kind == "int":
            if not raw.strip().lstrip("-").isdigit():
                raise ValueError("must be a whole number")
            return int(raw)
        if kind == "float":
            try:
                value = float(raw)
            except ValueError:
                raise ValueError("must be a number") from None
            if value <= 0:
                raise ValueError("must be positive")
            return value
        if kind == "tuple[str, ...]":
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise SettingsError(f"{env_name}: {exc}") from None
    if kind == "str | None":
        return raw or None  # an empty variable (e.g. `YM_ADMIN_KEY=` in compose) means unset
    return raw


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from YM_* variables; keyword overrides (e.g. from CLI flags) win."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = env.get(_ENV_PREFIX + f.name.upper())
        if raw is not None:
            values[f.name] = _convert(f.name, raw, str(f.type))
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)  # type: ignore[arg-type]
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    if not 0 < s.port < 65536:
        raise SettingsError("YM_PORT: must be between 1 and 65535")
    if s.lease_s <= s.heartbeat_interval_s:
        raise SettingsError("YM_LEASE_S: must be longer than YM_HEARTBEAT_INTERVAL_S")
    if s.leader_renew_s >= s.leader_lock_ttl_s:
        raise SettingsError("YM_LEADER_RENEW_S: must be shorter than YM_LEADER_LOCK_TTL_S")
    if s.log_cap_bytes and s.log_cap_bytes < 1 << 20:
        raise SettingsError("YM_LOG_CAP_BYTES: must be 0 (no cap) or at least 1048576")
    if s.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise SettingsError("YM_LOG_LEVEL: must be one of debug, info, warning, error")
    for url_name, url, schemes in (
        ("YM_REDIS_URL", s.redis_url, ("redis://", "rediss://", "unix://", "redis+sentinel://")),
        ("YM_MONGODB_URL", s.mongodb_url, ("mongodb://", "mongodb+srv://")),
    ):
        if url is not None and not url.startswith(schemes):
            raise SettingsError(f"{url_name}: must start with one of {', '.join(schemes)}")
