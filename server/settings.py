"""All server configuration, read from YM_* environment variables and validated at start.

`Settings` is a msgspec Struct: each field's type and range is declared once, and
`msgspec.convert` turns the environment's strings into it, so a bad value is refused at start
with the variable's name (never its value: some are secrets).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Annotated, Literal, NamedTuple

import msgspec

from yardmaster.server.security import tokens


class SettingsError(ValueError):
    """A YM_* variable has an invalid value; the message names it (never its secret value)."""


Seconds = Annotated[float, msgspec.Meta(gt=0)]
Bytes = Annotated[int, msgspec.Meta(ge=1)]
Count = Annotated[int, msgspec.Meta(ge=1)]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class RatePolicy(NamedTuple):
    count: int
    period_s: float

    def __str__(self) -> str:
        return f"{self.count}/{_period_text(self.period_s)}"


_PERIOD_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([smhd]?)\s*$")
RATE_CLASSES = ("unauthenticated", "sign-in", "submit", "sandbox-create", "api", "admin", "handshake", "client-messages")


@functools.lru_cache(maxsize=64)
def parse_rate(text: str) -> RatePolicy | None:
    """ "600/1m" -> 600 per 60 s; "600/m" is the same; "0" (or "off") -> None. ValueError if malformed."""
    if text.strip().lower() in {"0", "off"}:
        return None
    match = _RATE.match(text)
    if match is None:
        raise ValueError("must be count/period, e.g. 600/1m (s, m, h, d; a bare number is seconds), or 0 for no limit")
    count, amount, unit = int(match.group(1)), match.group(2), match.group(3)
    if amount is None and not unit:
        raise ValueError("must be count/period, e.g. 600/1m (s, m, h, d; a bare number is seconds), or 0 for no limit")
    period = float(amount or 1) * _PERIOD_UNITS[unit or "s"]
    if count < 1 or not 0.001 <= period <= 7 * 86_400:
        raise ValueError("needs a count of at least 1 and a period from 1 ms to 7 days")
    return RatePolicy(count, period)


def _period_text(period_s: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if period_s >= size and period_s % size == 0:
            return f"{int(period_s // size)}{unit}"
    return f"{period_s:g}s"


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8080
    data_dir: str = ".yardmaster"
    redis_url: str | None = None
    mongodb_url: str | None = None
    # Agents
    heartbeat_interval_s: Seconds = 10.0
    lease_s: Seconds = 30.0
    assign_ack_s: Seconds = 10.0
    cancel_grace_s: Seconds = 10.0
    # Timeouts are enforced on the agent; the server marks a job timed-out only this long after.
    timeout_slack_s: Seconds = 30.0
    # Scheduler
    leader_lock_ttl_s: Seconds = 10.0
    leader_renew_s: Seconds = 3.0
    schedule_interval_s: Seconds = 0.5
    reaper_interval_s: Seconds = 1.0
    # Message and buffer limits
    max_agent_message_bytes: Annotated[int, msgspec.Meta(ge=128 * 1024, le=64 << 20)] = 1 << 20
    max_client_message_bytes: Annotated[int, msgspec.Meta(ge=1024, le=16 << 20)] = 64 * 1024
    max_request_body_bytes: Bytes = 1 << 20
    viewer_buffer_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024)] = 1 << 20
    # Per-job stored output: head and tail are kept, the middle dropped (0: no cap).
    log_cap_bytes: Annotated[int, msgspec.Meta(ge=0)] = 16 << 20
    ws_ticket_ttl_s: Seconds = 30.0
    # How long a replica may trust an API key it looked up; revocations reach every replica at
    # once over the Broker, this bounds one missed during a Broker outage. 0: no cache.
    api_key_cache_s: Annotated[float, msgspec.Meta(ge=0, le=300)] = 5.0
    # Connections
    limit_concurrency: Count = 10_000  # open connections + tasks uvicorn serves; beyond it, 503
    handshake_timeout_s: Seconds = 10.0  # a client that has not sent a whole request head by then is dropped
    # Rate limits, per class: "count/period" (period 30s, 15m, 1h or 1d; a bare number is seconds),
    # "0" turns the class off. See security/rate_limits.py for what each class covers.
    rate_unauthenticated: str = "100/15m"
    rate_sign_in: str = "5/15m"
    rate_submit: str = "600/1m"
    rate_sandbox_create: str = "20/1h"
    rate_api: str = "1200/1m"
    rate_admin: str = "6000/1m"
    rate_handshake: str = "60/1m"
    rate_client_messages: str = "20/1s"
    # Quotas per user (0: none), counted across replicas.
    quota_queued_jobs: Annotated[int, msgspec.Meta(ge=0)] = 1000
    quota_running_jobs: Annotated[int, msgspec.Meta(ge=0)] = 20
    quota_client_sockets: Annotated[int, msgspec.Meta(ge=0)] = 100
    quota_subscriptions: Annotated[int, msgspec.Meta(ge=0)] = 100  # per client socket
    sandbox_max_active: Annotated[int, msgspec.Meta(ge=0)] = 5
    fair_share: bool = True  # round-robin across users inside a priority band
    # Admission policy for job specs
    max_job_memory_mb: Annotated[int, msgspec.Meta(ge=6)] = 8192
    max_job_cpus: Annotated[float, msgspec.Meta(gt=0)] = 8.0
    max_job_pids: Annotated[int, msgspec.Meta(ge=8)] = 4096
    allow_root_jobs: bool = False
    allowed_images: tuple[str, ...] = ()  # glob patterns; empty: any image
    # Security
    allowed_origins: tuple[str, ...] = ()
    trusted_hosts: tuple[str, ...] = ()  # empty: the loopback names plus YM_HOST
    trusted_proxies: tuple[str, ...] = ()  # peers whose X-Forwarded-* headers are believed
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    admin_key: str | None = None
    # Users and sign-in
    allow_signup: bool = False  # POST /api/v1/auth/register open to anyone
    jwt_algorithm: Literal["EdDSA", "ES256", "HS256"] = "EdDSA"
    jwt_secret: str | None = None  # HS256 only: at least 32 characters, the same on every replica
    jwt_private_key_file: str | None = None  # EdDSA/ES256: a PKCS#8 PEM shared by replicas on several hosts
    jwt_issuer: str = "yardmaster"
    jwt_audience: str = "yardmaster"
    access_token_ttl_s: Annotated[float, msgspec.Meta(ge=60, le=86_400)] = 900.0
    refresh_token_ttl_s: Annotated[float, msgspec.Meta(ge=300, le=365 * 86_400)] = 30 * 86_400.0
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = None
    oidc_redirect_uri: str | None = None
    oidc_allowed_domains: tuple[str, ...] = ()  # empty: any email domain the provider vouches for
    oidc_allow_signup: bool = False  # create a user on first OIDC sign-in
    log_level: str = "info"
    replica_id: str | None = None

    def __repr__(self) -> str:  # the admin key and URL passwords stay out of reprs and tracebacks
        return f"Settings(host={self.host!r}, port={self.port!r}, data_dir={self.data_dir!r})"

    @property
    def scale_out(self) -> bool:
        return self.redis_url is not None

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def oidc(self) -> bool:
        return self.oidc_issuer is not None

    def rate(self, rate_class: str) -> RatePolicy | None:
        """The policy of a rate class ("sign-in", …); None when it is turned off."""
        return parse_rate(getattr(self, "rate_" + rate_class.replace("-", "_")))

    def effective_trusted_hosts(self) -> tuple[str, ...]:
        if self.trusted_hosts:
            return self.trusted_hosts
        return tuple(dict.fromkeys((*LOOPBACK_HOSTS, self.host)))


_ENV_PREFIX = "YM_"
_TUPLES = {name for name, kind in Settings.__annotations__.items() if kind.startswith("tuple")}
_OPTIONAL = {name for name, kind in Settings.__annotations__.items() if kind.endswith("| None")}
_FIELD_PATH = re.compile(r"at `\$\.([a-z_0-9]+)`")


def env_name(field: str) -> str:
    return _ENV_PREFIX + field.upper()


# Variables of earlier releases: refused at start with their new name, not silently ignored.
RENAMED = {"YM_MAX_CLIENT_SOCKETS_PER_PRINCIPAL": "YM_QUOTA_CLIENT_SOCKETS (now per user across replicas)"}


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from YM_* variables; keyword overrides (e.g. from CLI flags) win."""
    env = os.environ if environ is None else environ
    for old, new in RENAMED.items():
        if old in env:
            raise SettingsError(f"{old}: renamed; set {new}")
    values: dict[str, object] = {}
    for name in Settings.__struct_fields__:
        raw = env.get(env_name(name))
        if raw is None:
            continue
        if name in _TUPLES:
            values[name] = [part.strip() for part in raw.split(",") if part.strip()]
        elif name in _OPTIONAL and not raw.strip():
            continue  # an empty variable (e.g. `YM_ADMIN_KEY=` in compose) means unset
        else:
            values[name] = raw.strip()
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        match = _FIELD_PATH.search(str(exc))
        field = match.group(1) if match else "settings"
        raise SettingsError(f"{env_name(field)}: {_plain(_FIELD_PATH.sub('', str(exc)).rstrip(' -'))}") from None
    _validate(settings)
    return settings


_KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}
_BOUNDS = {">=": "at least", "<=": "at most", ">": "greater than", "<": "less than"}


def _plain(reason: str) -> str:
    """msgspec's "Expected `int` >= 1, got `str`" as "must be a whole number, at least 1".
    It says what was expected, never the value given (some values are secrets)."""
    match = re.match(r"Expected `(\w+)`(?: (>=|<=|>|<) ([-\d.e+]+))?", reason)
    if match is None:
        return reason
    kind, op, bound = match.groups()
    text = f"must be {_KINDS.get(kind, kind)}"
    if op:
        number = float(bound)
        text += f", {_BOUNDS[op]} {int(number) if number.is_integer() else number}"
    return text


def _validate(s: Settings) -> None:
    if s.lease_s <= s.heartbeat_interval_s:
        raise SettingsError("YM_LEASE_S: must be longer than YM_HEARTBEAT_INTERVAL_S")
    if s.leader_renew_s >= s.leader_lock_ttl_s:
        raise SettingsError("YM_LEADER_RENEW_S: must be shorter than YM_LEADER_LOCK_TTL_S")
    if s.log_cap_bytes and s.log_cap_bytes < 1 << 20:
        raise SettingsError("YM_LOG_CAP_BYTES: must be 0 (no cap) or at least 1048576")
    if s.log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise SettingsError("YM_LOG_LEVEL: must be one of debug, info, warning, error")
    if s.admin_key is not None and not tokens.well_formed(s.admin_key, "api-key"):
        raise SettingsError("YM_ADMIN_KEY: not a Yardmaster API key (expected ymk_…; `yardmaster keygen` makes one)")
    if s.jwt_algorithm == "HS256" and (s.jwt_secret is None or len(s.jwt_secret) < 32):
        raise SettingsError("YM_JWT_SECRET: HS256 needs a secret of at least 32 characters")
    if s.jwt_algorithm != "HS256" and s.jwt_secret is not None:
        raise SettingsError("YM_JWT_SECRET: only used with YM_JWT_ALGORITHM=HS256 (EdDSA and ES256 keep a key pair in YM_DATA_DIR)")
    if s.jwt_algorithm == "HS256" and s.jwt_private_key_file is not None:
        raise SettingsError("YM_JWT_PRIVATE_KEY_FILE: only used with YM_JWT_ALGORITHM=EdDSA or ES256 (HS256 uses YM_JWT_SECRET)")
    oidc = {"YM_OIDC_ISSUER": s.oidc_issuer, "YM_OIDC_CLIENT_ID": s.oidc_client_id, "YM_OIDC_REDIRECT_URI": s.oidc_redirect_uri}
    if any(v is not None for v in oidc.values()) and any(v is None for v in oidc.values()):
        missing = next(name for name, v in oidc.items() if v is None)
        raise SettingsError(f"{missing}: OIDC sign-in needs YM_OIDC_ISSUER, YM_OIDC_CLIENT_ID and YM_OIDC_REDIRECT_URI")
    for rate_class in RATE_CLASSES:
        try:
            s.rate(rate_class)
        except ValueError as exc:
            raise SettingsError(f"{env_name('rate_' + rate_class.replace('-', '_'))}: {exc}") from None
    for entry in s.trusted_proxies:
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise SettingsError("YM_TRUSTED_PROXIES: entries are IP addresses, networks (10.0.0.0/8) or *") from None
    if (s.tls_cert_file is None) != (s.tls_key_file is None):
        raise SettingsError("YM_TLS_CERT_FILE: set both YM_TLS_CERT_FILE and YM_TLS_KEY_FILE, or neither")
    for url_name, url, schemes in (
        ("YM_REDIS_URL", s.redis_url, ("redis://", "rediss://", "unix://", "redis+sentinel://")),
        ("YM_MONGODB_URL", s.mongodb_url, ("mongodb://", "mongodb+srv://")),
    ):
        if url is not None and not url.startswith(schemes):
            raise SettingsError(f"{url_name}: must start with one of {', '.join(schemes)}")
