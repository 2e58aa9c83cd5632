"""RedisBroker: the scale-out Broker on redis.asyncio (plain, TLS, unix socket or Sentinel).

Every method raises BackendUnavailable("redis: ...") within a few seconds when Redis is down.
Pub/sub uses one dedicated connection per broker with one reader task; it reconnects by itself
and re-subscribes every channel that still has local subscriptions. Messages published while
that connection is down are missed (Redis pub/sub keeps nothing): callers recover from the Store.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from yardmaster.server.backends.keys import DEFAULT_REDIS_PREFIX, RedisKeys
from yardmaster.server.backends.base import (
    BAND_SIZE,
    BackendUnavailable,
    QueueEntry,
    RateCheck,
    RateDecision,
    priority_band,
)
from yardmaster.server.backends.memory_broker import DEFAULT_SUBSCRIPTION_BUFFER, QueueSubscription
from yardmaster.server.security.gcra import EPSILON_MS

log = logging.getLogger(__name__)

SOCKET_TIMEOUT_S = 2.0
HEALTH_CHECK_INTERVAL_S = 5.0  # also the pub/sub liveness probe period
RECONNECT_BACKOFF_S = (0.1, 1.0)  # pub/sub reader: first and largest delay between attempts

_P = ParamSpec("_P")
_T = TypeVar("_T")

# -- Lua ------------------------------------------------------------------------------------------
# Scripts that touch keys not listed in KEYS (presence listing) are fine on a single
# node or Sentinel setup, which is all RedisBroker supports.

# Many PUBLISHes in one command: one reply to read instead of one per message (the pipeline of
# PUBLISHes it replaces spent most of its CPU packing commands and parsing replies). No key.
_PUBLISH_MANY = """
for i = 1, #ARGV, 2 do
    redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""
_PUBLISH_CHUNK = 1000  # messages per script call: bounds how long one call holds Redis

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return false
"""

_RAISE_EPOCH = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if current < floor then
  redis.call('SET', KEYS[1], floor)
  return floor
end
return current
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: entry, index. ARGV: value, ttl_ms, member. Index score = expiry time (server clock).
_SET_PRESENCE = (
    _NOW_MS
    + """
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[3])
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""
)

# KEYS: index. ARGV: entry key prefix. Drops expired and deleted members from the index.
_LIST_PRESENCE = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local v = redis.call('GET', ARGV[1] .. m)
  if v then
    out[#out + 1] = m
    out[#out + 1] = v
  else
    redis.call('ZREM', KEYS[1], m)
  end
end
return out
"""
)

# KEYS: entry, index. ARGV: member, conditional ('1'/'0'), expected value.
_DELETE_PRESENCE = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if ARGV[2] == '1' and v ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# -- queue: one sorted set, fair across groups inside each priority band (backends/fair_queue.py) --
# KEYS: queue, queue-owners, queue-counts, queue-band-max. ARGV[1]: the queue-last: key prefix,
# ARGV[2]: BAND_SIZE. An entry is four ARGVs: job id, owner, group, band. Scores and tags are
# integers below 2**53, exact in a Lua double; written with '%.0f' because tostring() keeps only
# 14 digits. The group's last tags live in queue-last:<group>, a key not in KEYS (single node).
_QUEUE_ADD = """
local queue, owners, counts, band_max = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local last_prefix, band_size = ARGV[1], tonumber(ARGV[2])

local function int(x)
  return string.format('%.0f', x)
end

local function queued(job)
  return redis.call('ZSCORE', queue, job) ~= false
end

-- Read once per call, then kept here: a new tag is never below its band's head tag, so a band's
-- head changes only when the band was empty. Band maxima and last tags are written by flush().
local heads, highs, lasts, dirty_highs, dirty_lasts = {}, {}, {}, {}, {}

local function head_tag(band, lo)
  local h = heads[band]
  if h == nil then
    local r = redis.call('ZRANGEBYSCORE', queue, int(lo), '(' .. int(lo + band_size), 'LIMIT', 0, 1, 'WITHSCORES')
    if r[1] then h = tonumber(r[2]) - lo else h = false end
    heads[band] = h
  end
  return h
end

local function high(band)
  local h = highs[band]
  if h == nil then
    h = tonumber(redis.call('HGET', band_max, band) or '0')
    highs[band] = h
  end
  return h
end

local function group_lasts(group)
  local g = lasts[group]
  if g == nil then
    g = {}
    lasts[group] = g
  end
  return g
end

local function last(group, band)
  local g = group_lasts(group)
  if g[band] == nil then g[band] = tonumber(redis.call('HGET', last_prefix .. group, band) or '0') end
  return g[band]
end

local function add(job, owner, group, band, front)
  local lo = tonumber(band) * band_size
  local head = head_tag(band, lo)
  local current
  if head then current = head - 1 else current = high(band) end
  local tag
  if front then
    tag = current + 1
  else
    tag = math.max(last(group, band), current) + 1
    group_lasts(group)[band] = tag
    dirty_lasts[group] = true
  end
  if tag > high(band) then
    highs[band] = tag
    dirty_highs[band] = true
  end
  if not head then heads[band] = tag end
  redis.call('ZADD', queue, int(lo + tag), job)
  redis.call('HSET', owners, job, owner)
  redis.call('HINCRBY', counts, owner, 1)
end

local function flush()
  for band in pairs(dirty_highs) do redis.call('HSET', band_max, band, int(highs[band])) end
  for group in pairs(dirty_lasts) do
    local args = {}
    for band, tag in pairs(lasts[group]) do
      args[#args + 1] = band
      args[#args + 1] = int(tag)
    end
    redis.call('HSET', last_prefix .. group, unpack(args))
  end
end
"""

# ARGV[3]: '1' for front. Then entries.
_ENQUEUE_MANY = (
    _QUEUE_ADD
    + """
local front = ARGV[3] == '1'
for i = 4, #ARGV, 4 do
  if not queued(ARGV[i]) then add(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], front) end
end
flush()
return 1
"""
)

# ARGV[3]: quota (0: none). Then per batch: its entry count, then its entries (no job id twice).
# Returns 1 (admitted) or 0 per batch.
_ADMIT_MANY = (
    _QUEUE_ADD
    + """
local quota = tonumber(ARGV[3])
local out = {}
local i = 4
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local first, stop = i + 1, i + 4 * n
  local fresh, per_owner = {}, {}
  for j = first, stop, 4 do
    if not queued(ARGV[j]) then
      fresh[#fresh + 1] = j
      per_owner[ARGV[j + 1]] = (per_owner[ARGV[j + 1]] or 0) + 1
    end
  end
  local ok = true
  if quota > 0 then
    for owner, added in pairs(per_owner) do
      if tonumber(redis.call('HGET', counts, owner) or '0') + added > quota then
        ok = false
        break
      end
    end
  end
  if ok then
    for _, j in ipairs(fresh) do add(ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], false) end
  end
  out[#out + 1] = ok and 1 or 0
  i = stop + 1
end
flush()
return out
"""
)

# KEYS: queue, queue-owners, queue-counts. ARGV[1]: the queue-last: key prefix, then job ids.
# An owner with nothing queued left loses its last tags: it joins the next round afresh.
_REMOVE_MANY = """
local queue, owners, counts = KEYS[1], KEYS[2], KEYS[3]
local removed = 0
for i = 2, #ARGV do
  local job = ARGV[i]
  if redis.call('ZREM', queue, job) == 1 then
    removed = removed + 1
    local owner = redis.call('HGET', owners, job)
    if owner then
      redis.call('HDEL', owners, job)
      if redis.call('HINCRBY', counts, owner, -1) <= 0 then
        redis.call('HDEL', counts, owner)
        redis.call('DEL', ARGV[1] .. owner)
      end
    end
  end
end
return removed
"""

# -- rate limits: GCRA, the arithmetic of security/gcra.py on the server's clock -------------------
# KEYS: every bucket of every check, in order. ARGV[1]: EPSILON_MS, then per check: limit,
# period_ms, cost, its bucket count. Returns allowed (1/0), remaining, retry_after_ms, reset_ms
# per check. A TAT is kept with 17 digits (ms with a µs fraction) and lives until it has passed.
_RATE_LIMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local eps = tonumber(ARGV[1])

local function gcra(tat, limit, period, cost)
  local interval = period / limit
  if tat == nil or tat < now then tat = now end
  local new_tat = tat + interval * cost
  local allow_at = new_tat - period
  if allow_at - now > eps then
    local remaining = math.max(0, math.floor((now - (tat - period)) / interval + eps))
    return false, tat, remaining, math.ceil(allow_at - now - eps), math.ceil(tat - now - eps)
  end
  local remaining = math.max(0, math.floor((now - allow_at) / interval + eps))
  return true, new_tat, remaining, 0, math.ceil(new_tat - now - eps)
end

local out = {}
local k = 1
local i = 2
while i <= #ARGV do
  local limit, period, cost, n = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local allowed, remaining, retry, reset = true, nil, 0, 0
  local tats = {}
  for b = 0, n - 1 do
    local ok, tat, rem, ret, res = gcra(tonumber(redis.call('GET', KEYS[k + b])), limit, period, cost)
    tats[b] = tat
    if not ok then
      allowed = false
      retry = math.max(retry, ret)
    end
    if remaining == nil or rem < remaining then remaining = rem end
    reset = math.max(reset, res)
  end
  if allowed then
    for b = 0, n - 1 do
      redis.call('SET', KEYS[k + b], string.format('%.17g', tats[b]), 'PX', math.max(1, math.ceil(tats[b] - now)))
    end
  end
  out[#out + 1] = allowed and 1 or 0
  out[#out + 1] = remaining
  out[#out + 1] = retry
  out[#out + 1] = reset
  k = k + n
  i = i + 4
end
return out
"""

# -- slots: a sorted set per name, member -> expiry (server clock, ms) ---------------------------
# The key itself lives at least as long as its latest member.
_SLOTS_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function hold(key, member, ttl)
  redis.call('ZADD', key, string.format('%.0f', now + ttl), member)
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"""

# KEYS: slots. ARGV: member, limit, ttl_ms. 1 when held (now or already), else 0.
_ACQUIRE_SLOT = (
    _SLOTS_NOW
    + """
local member, limit, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], member) and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
hold(KEYS[1], member, ttl)
return 1
"""
)

# KEYS: one slots key per pair. ARGV[1]: ttl_ms, then the members, in the order of KEYS.
_RENEW_SLOTS = (
    _SLOTS_NOW
    + """
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if redis.call('ZSCORE', KEYS[i], ARGV[i + 1]) then hold(KEYS[i], ARGV[i + 1], ttl) end
end
return 1
"""
)

# KEYS: slots.
_COUNT_SLOTS = (
    _SLOTS_NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
)

# -- URLs and errors ------------------------------------------------------------------------------
def redact_url(url: str) -> str:
    """The URL with its password replaced by ***."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    creds, _, hosts = parts.netloc.rpartition("@")
    if ":" in creds:
        creds = creds.split(":", 1)[0] + ":***"
    return parts._replace(netloc=f"{creds}@{hosts}").geturl()


def _url_secrets(url: str) -> list[str]:
    parts = urlsplit(url)
    secrets = []
    if "@" in parts.netloc:
        creds = parts.netloc.rpartition("@")[0]
        if ":" in creds:
            secrets.append(creds.split(":", 1)[1])
    for key in ("password", "sentinel_password"):
        secrets.extend(parse_qs(parts.query).get(key, []))
    return [s for s in secrets + [unquote(s) for s in secrets] if s]


def _parse_hostport(item: str, default_port: int) -> tuple[str, int]:
    if item.startswith("["):  # [ipv6]:port
        host, _, rest = item[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = item.rpartition(":")
    return (host, int(port)) if sep else (item, default_port)


class _SentinelConfig:
    def __init__(self, url: str, master: str | None) -> None:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        creds, _, hosts = parts.netloc.rpartition("@")
        username, _, password = creds.partition(":")
        self.username = unquote(username) or None
        self.password = unquote(password) or None
        self.hosts = [_parse_hostport(h, 26379) for h in hosts.split(",") if h]
        path = parts.path.strip("/")
        self.db = int(path) if path else int(query.get("db", ["0"])[0])
        self.master = master or query.get("master", [""])[0]
        self.sentinel_password = query.get("sentinel_password", [None])[0]
        if not self.master:
            raise ValueError("redis+sentinel URL needs ?master=NAME (or sentinel_master=)")
        if not self.hosts:
            raise ValueError("redis+sentinel URL needs at least one sentinel host:port")


def _redis_errors(
    fn: Callable[Concatenate[RedisBroker, _P], Awaitable[_T]],
) -> Callable[Concatenate[RedisBroker, _P], Awaitable[_T]]:
    @functools.wraps(fn)
    async def wrapper(self: RedisBroker, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await fn(self, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError, asyncio.TimeoutError) as e:
            # ReadOnlyError: we are talking to a replica (e.g. during a Sentinel failover).
            raise BackendUnavailable(self.reason(e)) from None

    return wrapper


# -- the broker ---------------------------------------------------------------------------------------
class RedisBroker:
    """URL forms: redis://[user:pass@]host:port/db, rediss://... (TLS), unix:///path.sock?db=N,
    and Sentinel: redis+sentinel://[user:pass@]host:port[,host2:port2]/db?master=NAME
    [&sentinel_password=...] (user/pass are the master's). With `sentinel_master`, the URL's
    hosts are taken as Sentinels whatever the scheme.

    Keys live under `key_prefix`, laid out by `backends/keys.RedisKeys`. Epoch keys have no TTL:
    fencing needs them to survive, so run Redis with persistence (AOF) if it may restart.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = DEFAULT_REDIS_PREFIX,
        sentinel_master: str | None = None,
        subscription_buffer: int = DEFAULT_SUBSCRIPTION_BUFFER,
    ) -> None:
        self.url = redact_url(url)
        self._secrets = _url_secrets(url)
        self._prefix = key_prefix
        self._keys = RedisKeys(key_prefix)
        self._queue_key = self._keys.queue
        common: dict[str, Any] = {
            "socket_connect_timeout": SOCKET_TIMEOUT_S,
            "socket_timeout": SOCKET_TIMEOUT_S,
            "health_check_interval": HEALTH_CHECK_INTERVAL_S,
            # One quick retry on a fresh connection, so the first command after a Redis restart
            # does not fail on a stale pooled socket. Never retried on timeouts: the command may
            # have run (INCR, lock acquisition).
            "retry": Retry(ExponentialBackoff(cap=0.1, base=0.02), 1, supported_errors=(RedisConnectionError,)),
        }
        scheme = urlsplit(url).scheme
        if scheme != "unix":  # unix socket connections reject TCP options
            common["socket_keepalive"] = True
        self._sentinel: Sentinel | None = None
        if scheme == "redis+sentinel" or sentinel_master is not None:
            cfg = _SentinelConfig(url, sentinel_master)
            if cfg.sentinel_password:
                self._secrets.append(cfg.sentinel_password)
            sentinel_kwargs = {k: v for k, v in common.items() if k.startswith("socket_")}
            if cfg.sentinel_password:
                sentinel_kwargs["password"] = cfg.sentinel_password
            self._sentinel = Sentinel(cfg.hosts, sentinel_kwargs=sentinel_kwargs)
            self._redis: aioredis.Redis = self._sentinel.master_for(
                cfg.master, username=cfg.username, password=cfg.password, db=cfg.db, **common
            )
        else:
            self._redis = aioredis.from_url(url, **common)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._raise_epoch = self._redis.register_script(_RAISE_EPOCH)
        self._release = self._redis.register_script(_RELEASE)
        self._set_presence = self._redis.register_script(_SET_PRESENCE)
        self._list_presence = self._redis.register_script(_LIST_PRESENCE)
        self._delete_presence = self._redis.register_script(_DELETE_PRESENCE)
        self._publish_many = self._redis.register_script(_PUBLISH_MANY)
        self._enqueue_many = self._redis.register_script(_ENQUEUE_MANY)
        self._admit_many = self._redis.register_script(_ADMIT_MANY)
        self._remove_many = self._redis.register_script(_REMOVE_MANY)
        self._rate_limit = self._redis.register_script(_RATE_LIMIT)
        self._acquire_slot = self._redis.register_script(_ACQUIRE_SLOT)
        self._renew_slots = self._redis.register_script(_RENEW_SLOTS)
        self._count_slots = self._redis.register_script(_COUNT_SLOTS)
        self._hub = _PubSubHub(self._redis, subscription_buffer, self.reason)

    def reason(self, e: BaseException) -> str:
        """'redis: <what went wrong>', with any password from the URL scrubbed."""
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return f"redis: {text}"

    def __repr__(self) -> str:
        return f"RedisBroker({self.url!r}, key_prefix={self._prefix!r})"

    async def start(self) -> None:
        """Check that Redis answers (raises BackendUnavailable otherwise)."""
        await self.ping()

    async def close(self) -> None:
        await self._hub.close()
        await self._redis.aclose()
        if self._sentinel is not None:
            for s in self._sentinel.sentinels:
                await s.aclose()

    @_redis_errors
    async def ping(self) -> None:
        await self._redis.ping()

    # -- job queue -------------------------------------------------------------------------------
    def _queue_keys(self) -> list[str]:
        k = self._keys
        return [k.queue, k.queue_owners, k.queue_counts, k.queue_band_max]

    def _queue_args(self) -> list[str | int]:
        return [self._keys.queue_last(""), BAND_SIZE]

    @staticmethod
    def _entry_args(entries: Iterable[QueueEntry]) -> list[str | int]:
        args: list[str | int] = []
        for e in entries:
            args += (e.job_id, e.owner, e.share, priority_band(e.priority))
        return args

    @_redis_errors
    async def enqueue_many(self, entries: Sequence[QueueEntry], *, front: bool = False) -> None:
        if entries:
            args = [*self._queue_args(), "1" if front else "0", *self._entry_args(entries)]
            await self._enqueue_many(keys=self._queue_keys(), args=args)

    @_redis_errors
    async def admit_many(self, batches: Sequence[Sequence[QueueEntry]], quota: int) -> list[bool]:
        if not batches:
            return []
        args = [*self._queue_args(), int(quota)]
        for batch in batches:
            unique = dict((e.job_id, e) for e in batch)  # a job id twice in one batch counts once
            args += (len(unique), *self._entry_args(unique.values()))
        return [bool(x) for x in await self._admit_many(keys=self._queue_keys(), args=args)]

    @_redis_errors
    async def queued_count(self, owner: str) -> int:
        return int(await self._redis.hget(self._keys.queue_counts, owner) or 0)

    @_redis_errors
    async def peek(self, limit: int) -> list[str]:
        if limit <= 0:
            return []
        return [m.decode() for m in await self._redis.zrange(self._queue_key, 0, limit - 1)]

    async def _remove(self, job_ids: Collection[str]) -> int:
        keys = self._queue_keys()[:3]
        return int(await self._remove_many(keys=keys, args=[self._keys.queue_last(""), *job_ids]))

    @_redis_errors
    async def remove(self, job_id: str) -> bool:
        return await self._remove([job_id]) == 1

    @_redis_errors
    async def remove_many(self, job_ids: Collection[str]) -> None:
        if job_ids:
            await self._remove(job_ids)

    @_redis_errors
    async def is_queued(self, job_id: str) -> bool:
        return await self._redis.zscore(self._queue_key, job_id) is not None

    @_redis_errors
    async def queue_depth(self) -> int:
        return int(await self._redis.zcard(self._queue_key))

    # -- rate limits and slots ---------------------------------------------------------------------
    @_redis_errors
    async def rate_limit(self, checks: Sequence[RateCheck]) -> list[RateDecision]:
        if not checks:
            return []
        keys: list[str] = []
        args: list[str | int] = [repr(EPSILON_MS)]
        for check in checks:
            keys += (self._keys.rate(b) for b in check.buckets)
            args += (check.limit, check.period_ms, check.cost, len(check.buckets))
        flat = [int(x) for x in await self._rate_limit(keys=keys, args=args)]
        return [RateDecision(bool(flat[i]), flat[i + 1], flat[i + 2], flat[i + 3]) for i in range(0, len(flat), 4)]

    @_redis_errors
    async def acquire_slot(self, name: str, member: str, limit: int, ttl_ms: int) -> bool:
        return bool(await self._acquire_slot(keys=[self._keys.slots(name)], args=[member, int(limit), int(ttl_ms)]))

    @_redis_errors
    async def renew_slots(self, slots: Collection[tuple[str, str]], ttl_ms: int) -> None:
        if slots:
            pairs = list(slots)
            keys = [self._keys.slots(name) for name, _ in pairs]
            await self._renew_slots(keys=keys, args=[int(ttl_ms), *(member for _, member in pairs)])

    @_redis_errors
    async def release_slot(self, name: str, member: str) -> None:
        await self._redis.zrem(self._keys.slots(name), member)

    @_redis_errors
    async def count_slots(self, name: str) -> int:
        return int(await self._count_slots(keys=[self._keys.slots(name)]))

    # -- leader lock -------------------------------------------------------------------------------
    def _lock_keys(self, name: str) -> list[str]:
        return [self._keys.lock(name), self._keys.epoch(name)]

    @_redis_errors
    async def acquire_lock(self, name: str, owner: str, ttl_ms: int) -> int | None:
        epoch = await self._acquire(keys=self._lock_keys(name), args=[owner, int(ttl_ms)])
        return None if epoch is None else int(epoch)

    @_redis_errors
    async def renew_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        return bool(await self._renew(keys=self._lock_keys(name)[:1], args=[owner, int(ttl_ms)]))

    @_redis_errors
    async def release_lock(self, name: str, owner: str) -> bool:
        return bool(await self._release(keys=self._lock_keys(name)[:1], args=[owner]))

    @_redis_errors
    async def raise_epoch(self, name: str, floor: int) -> int:
        return int(await self._raise_epoch(keys=self._lock_keys(name)[1:], args=[int(floor)]))

    @_redis_errors
    async def lock_holder(self, name: str) -> tuple[str | None, int]:
        async with self._redis.pipeline(transaction=False) as pipe:
            holder, epoch = await pipe.get(self._lock_keys(name)[0]).get(self._lock_keys(name)[1]).execute()
        return (holder.decode() if holder is not None else None), int(epoch or 0)

    # -- counters ------------------------------------------------------------------------------------
    @_redis_errors
    async def incr_counter(self, name: str, ttl_ms: int, by: int = 1) -> int:
        key = self._keys.counter(name)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(key, by)
            pipe.pexpire(key, int(ttl_ms), nx=True)
            value, _ = await pipe.execute()
        return int(value)

    @_redis_errors
    async def get_counter(self, name: str) -> int:
        value = await self._redis.get(self._keys.counter(name))
        return 0 if value is None else int(value)

    @_redis_errors
    async def delete_counter(self, name: str) -> None:
        await self._redis.delete(self._keys.counter(name))

    # -- presence ------------------------------------------------------------------------------------
    def _presence_keys(self, kind: str, member: str) -> list[str]:
        return [self._keys.presence(kind, member), self._keys.presence_index(kind)]

    @_redis_errors
    async def set_presence(self, kind: str, member: str, value: str, ttl_ms: int) -> None:
        await self._set_presence(keys=self._presence_keys(kind, member), args=[value, int(ttl_ms), member])

    @_redis_errors
    async def get_presence(self, kind: str, member: str) -> str | None:
        value = await self._redis.get(self._presence_keys(kind, member)[0])
        return None if value is None else value.decode()

    @_redis_errors
    async def list_presence(self, kind: str) -> dict[str, str]:
        flat = await self._list_presence(
            keys=[self._keys.presence_index(kind)], args=[self._keys.presence(kind)]
        )
        return {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}

    @_redis_errors
    async def delete_presence(self, kind: str, member: str, if_value: str | None = None) -> bool:
        args = [member, "0" if if_value is None else "1", if_value or ""]
        return bool(await self._delete_presence(keys=self._presence_keys(kind, member), args=args))

    # -- pub/sub ---------------------------------------------------------------------------------------
    @_redis_errors
    async def publish(self, channel: str, data: bytes) -> None:
        await self._redis.publish(self._keys.channel(channel), data)

    @_redis_errors
    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        for start in range(0, len(messages), _PUBLISH_CHUNK):
            args: list[str | bytes] = []
            for channel, data in messages[start : start + _PUBLISH_CHUNK]:
                args += (self._keys.channel(channel), data)
            await self._publish_many(keys=[], args=args)

    @_redis_errors
    async def subscribe(self, channel: str) -> QueueSubscription:
        return await self._hub.subscribe(self._keys.channel(channel), channel)


class _PubSubHub:
    """One pub/sub connection shared by all local subscriptions of a broker.

    Redis SUBSCRIBEs a channel once, however many local subscriptions it has, and UNSUBSCRIBEs
    when the last one closes. The reader task owns (re)connecting; other tasks only write
    SUBSCRIBE/UNSUBSCRIBE on the connection while it is up.
    """

    def __init__(self, client: aioredis.Redis, buffer: int, reason: Callable[[BaseException], str]) -> None:
        self._pool = client.connection_pool
        self._buffer = buffer
        self._reason = reason
        self._subs: dict[str, set[QueueSubscription]] = {}  # redis channel -> local subscriptions
        # SUBSCRIBEs sent on the current connection and not yet confirmed, per channel. Replies
        # come in order, so a channel is confirmed when its count drops back to zero.
        self._pending: dict[str, int] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._conn: AbstractConnection | None = None  # set only while up and subscribed
        self._state = "connecting"  # connecting | up | down
        self._last_error = "redis: not connected yet"
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._bg: set[asyncio.Task[None]] = set()
        self._unsubscribing: dict[str, asyncio.Task[None]] = {}

    async def subscribe(self, key: str, channel: str) -> QueueSubscription:
        await self._wait_up()
        sub = QueueSubscription(channel, self._buffer, functools.partial(self._detach, key), self._on_close(key))
        subs = self._subs.get(key)
        if subs is not None and key not in self._pending:
            subs.add(sub)  # Redis already confirmed this channel on the live connection
            return sub
        self._subs.setdefault(key, set()).add(sub)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(fut)
        try:
            if subs is None:
                # Counted before the write: the reply may be read while the write is in flight.
                self._pending[key] = self._pending.get(key, 0) + 1
                await self._send("SUBSCRIBE", key)
            await asyncio.wait_for(asyncio.shield(fut), SOCKET_TIMEOUT_S * 2)
        except BaseException as e:
            if not fut.done():
                fut.cancel()
            await sub.close()
            if isinstance(e, asyncio.TimeoutError):
                raise BackendUnavailable("redis: pub/sub subscription not confirmed in time") from None
            raise
        return sub

    async def _wait_up(self) -> None:
        if self._closing:
            raise BackendUnavailable("redis: broker is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redis-pubsub-reader")
        if self._state == "connecting":
            try:
                async with asyncio.timeout(SOCKET_TIMEOUT_S * 2):
                    while self._state == "connecting":
                        self._changed.clear()
                        await self._changed.wait()
            except TimeoutError:
                raise BackendUnavailable("redis: pub/sub connection not ready in time") from None
        if self._state != "up":
            raise BackendUnavailable(self._last_error)

    async def _send(self, *args: str) -> None:
        conn = self._conn
        # Checked right before the write: send_command would otherwise reconnect a dropped
        # socket behind the reader's back.
        if conn is None or not conn.is_connected:
            raise BackendUnavailable(self._last_error)
        await conn.send_command(*args, check_health=False)

    def _detach(self, key: str, sub: QueueSubscription) -> None:
        """Forget `sub` (closed or overflowed); UNSUBSCRIBE once `key` has no local subscription."""
        subs = self._subs.get(key)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[key]
            task = self._spawn(self._unsubscribe_if_unused(key))
            self._unsubscribing[key] = task
            task.add_done_callback(lambda t: self._unsubscribing.pop(key, None) if self._unsubscribing.get(key) is t else None)

    def _on_close(self, key: str) -> Callable[[QueueSubscription], Awaitable[None]]:
        async def on_close(_: QueueSubscription) -> None:
            task = self._unsubscribing.get(key)
            if task is not None:
                await asyncio.shield(task)  # close() returns once the UNSUBSCRIBE is written

        return on_close

    async def _unsubscribe_if_unused(self, key: str) -> None:
        # Check and write without yielding in between, so a concurrent SUBSCRIBE of the same
        # channel is never overtaken by this UNSUBSCRIBE.
        if key in self._subs:
            return
        try:
            await self._send("UNSUBSCRIBE", key)
        except (BackendUnavailable, RedisError, OSError):
            pass  # the connection is down; the reader only re-subscribes channels still in use

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        return task

    # -- reader ----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        delay = RECONNECT_BACKOFF_S[0]
        while not self._closing:
            conn: AbstractConnection | None = None
            try:
                conn = await self._pool.get_connection()
                self._pending.clear()
                channels = list(self._subs)
                if channels:
                    await conn.send_command("SUBSCRIBE", *channels, check_health=False)
                    self._pending.update(dict.fromkeys(channels, 1))
                self._conn = conn
                self._set_state("up")
                if delay > RECONNECT_BACKOFF_S[0]:
                    log.info("redis pub/sub reconnected; %d channel(s) re-subscribed", len(channels))
                delay = RECONNECT_BACKOFF_S[0]
                await self._read_loop(conn)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure means: reconnect
                self._last_error = self._reason(e)
                if self._state != "down":
                    log.warning("redis pub/sub connection lost (%s); reconnecting", self._last_error)
            finally:
                self._conn = None
                if not self._closing:
                    self._set_state("down")
                self._fail_waiters(BackendUnavailable(self._last_error))
                if conn is not None:
                    await self._drop_connection(conn)
            if not self._closing:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_BACKOFF_S[1])

    async def _drop_connection(self, conn: AbstractConnection) -> None:
        try:
            await conn.disconnect(nowait=True)
            await self._pool.release(conn)
        except Exception:  # noqa: BLE001 - best effort on an already broken connection
            pass

    async def _read_loop(self, conn: AbstractConnection) -> None:
        probing = False
        while True:
            resp = await conn.read_response(timeout=HEALTH_CHECK_INTERVAL_S, push_request=True)
            if resp is None:  # quiet for a while: prove the connection is alive
                if probing:
                    raise RedisTimeoutError("pub/sub connection did not answer PING")
                await conn.send_command("PING", check_health=False)
                probing = True
                continue
            probing = False
            if isinstance(resp, list) and len(resp) >= 3:
                self._dispatch(resp[0], resp[1], resp[2])

    def _dispatch(self, kind: bytes, channel: bytes, data: Any) -> None:
        if kind == b"message":
            for sub in list(self._subs.get(channel.decode(), ())):
                sub.deliver(data)
        elif kind == b"subscribe":
            key = channel.decode()
            left = self._pending.get(key, 0) - 1
            if left > 0:
                self._pending[key] = left
                return
            self._pending.pop(key, None)
            for fut in self._waiters.pop(key, []):
                if not fut.done():
                    fut.set_result(None)

    def _fail_waiters(self, error: BackendUnavailable) -> None:
        waiters, self._waiters = self._waiters, {}
        for futs in waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(error)

    def _set_state(self, state: str) -> None:
        self._state = state
        self._changed.set()

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for task in list(self._bg):
            task.cancel()
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.close_nowait()
        self._subs.clear()
