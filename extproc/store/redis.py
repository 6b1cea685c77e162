"""Redis store (`redis://`, `rediss://`, `unix://`) for many gateway processes.

Every atomic operation is one Lua script: registered once per server (the
SHA1 is computed locally, calls go out as EVALSHA, and a NOSCRIPT reply after a
restart or SCRIPT FLUSH loads the script once and retries), so a budget or rate
check is one round trip. All keys a script touches are passed in KEYS and
share one Cluster hash tag (`same_slot` enforces it before sending).

One transport: every call (the scripts: budget holds and settles, rate limits, admit;
and the KV calls: the response cache's get/set, its single-flight lock and wait, API
keys, sign-in) goes over `extproc.store.pipe`: one pipelined connection per store,
commands encoded by hand (keys and per-counter words memoized by `_Encoder`), replies
parsed by hiredis, ~15-20 µs of client CPU per call where redis-py's asyncio client
spent ~60-250 µs (pool checkout, per-argument encoding, retry wrappers). redis-py only
parses the URL (host or socket, TLS, auth, database; an invalid URL or option is a
`StoreConfigError` at start) and is never dialled by the store itself.

Failure is bounded: the pipe's watchdog fails a call Redis has not answered within
`timeout_seconds` (default 1 s; dialling is bounded by it too), a dropped connection
fails its waiting calls at once, and the next call redials. A waiting call is never
resent (a script or SET may have run). Connection errors, timeouts and
LOADING/READONLY/BUSY replies become `StoreUnavailable` (`raise ... from`, in
`_map_error`: the one boundary), so the store recovers by itself when Redis comes back.

The scripts take the caller's time (`now`, in ms) and relative TTLs; see the
package docstring for why.

Budget counter hashes carry two fields besides `held` and the spend buckets: `next`
(a lower bound on the earliest hold expiry: when a purge may be due) and `exp` (the
window's expiry, in the caller's ms, that the hash's and its holds zset's TTLs were last
set to), so the TTLs are set again only when the window's expiry moves (a new key, a
rolling window's next day) rather than by every call. `exp` is only ever compared: a
hash written before it existed has none and gets its TTLs and `exp` from the first call
that touches it, and code that predates it ignores it, so replicas of both kinds can
share one Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.connection import (
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)

from extproc.store import (
    Clock,
    Counter,
    Gcra,
    Hold,
    HoldResult,
    RateItem,
    RateState,
    SettleOutcome,
    StoreConfigError,
    StoreDataError,
    StoreError,
    StoreUnavailable,
    SystemClock,
    check_settle_args,
    check_ttl,
    hash_tag,
    now_ms,
    px,
    same_slot,
    same_slot_pair,
    ttl_ms,
)
from extproc.store.pipe import Endpoint, NoScript, Pipe, ReplyError, bulk, command, evalsha

__all__ = ["RedisStore"]

_PRELUDE = """
-- A spec argument is a JSON array: cjson decodes it in C, ~3x faster than splitting a
-- space-separated string with gmatch. Words that only feed arithmetic travel as JSON
-- numbers (decoded once, in C: `tonumber` on a string runs strtod twice, ~2k
-- instructions); words handed to redis.call travel as strings (a Lua number there is
-- formatted with sprintf). Replies are arrays of integers (no string.format either).
local function words(spec)
  return cjson.decode(spec)
end

-- What runs per call, as locals (a global's lookup costs more than some of the work).
-- A numeric string from Redis becomes a number with `s + 0`: one strtod, where
-- tonumber(s) runs two (a check, then the conversion), ~1.5k instructions more each.
local call, max, floor, ceil = redis.call, math.max, math.floor, math.ceil

-- Each counter hash keeps `next`, a lower bound on its earliest hold expiry, so the
-- expired-hold purge runs only when one may be due (not on every call). An expired hold
-- counts as spent at its estimate, charged to `bucket` (its process died unsettled).
local function purge(c, z, now, bucket)
  local expired = call('ZRANGEBYSCORE', z, '-inf', now)
  local freed = 0
  for _, m in ipairs(expired) do
    freed = freed + tonumber(string.match(m, ':(%-?%d+)$'))
  end
  if freed ~= 0 then
    call('HINCRBY', c, 'held', string.format('%d', -freed))
    call('HINCRBY', c, bucket, string.format('%d', freed))
  end
  if #expired > 0 then call('ZREMRANGEBYSCORE', z, '-inf', now) end
  local first = call('ZRANGE', z, 0, 0, 'WITHSCORES')
  if first[2] then call('HSET', c, 'next', first[2]) else call('HDEL', c, 'next') end
end

-- used = held + the window's buckets (a[first .. last]), after purging expired holds if
-- any are due. Returns used, held, `next` as a number (or false) and `exp` (or false).
local function used(c, z, a, first, last, now)
  local v = call('HMGET', c, 'held', 'next', 'exp', unpack(a, first, last))
  local next_expiry = v[2] and v[2] + 0
  if next_expiry and next_expiry <= now then
    purge(c, z, now, a[first])
    v = call('HMGET', c, 'held', 'next', 'exp', unpack(a, first, last))
    next_expiry = v[2] and v[2] + 0
  end
  local held = v[1] and v[1] + 0 or 0
  local total = held
  for j = 4, #v do
    if v[j] then total = total + v[j] end
  end
  return total, held, next_expiry, v[3]
end

-- TTLs: a counter hash's `exp` field is the expiry (caller's ms, from the window) its
-- keys' TTLs were last set to, so a script re-sets them only when that moves (a new key,
-- a rolling window's new day, a hash from before `exp` existed) instead of with two
-- PEXPIREs per counter per call. ttl '0' is a counter that never expires. Never creates
-- the hash (a settle may find it gone). True when it re-set them.
local function expire(c, z, ttl, expiry, exp)
  if ttl == '0' or exp == expiry or call('EXISTS', c) == 0 then return false end
  call('HSET', c, 'exp', expiry)
  call('PEXPIRE', c, ttl)
  call('PEXPIRE', z, ttl)
  return true
end

-- Rate items: 4 words each from a[p] for KEYS[first .. first + count - 1]; now is a[1].
--   g interval_ms burst cost   (GCRA)   |   q limit cost reset_ms   (quota)
-- Appends ok remaining retry_ms reset_ms per item to `out`.
local function rate_eval(a, p, first, count, out)
  local now = a[1]
  local writes, all_ok = {}, true
  for i = 1, count do
    local key, q = KEYS[first + i - 1], p + (i - 1) * 4
    local ok, remaining, retry, reset
    if a[q] == 'g' then
      local t, burst, cost = a[q + 1], a[q + 2], a[q + 3]
      local stored = call('GET', key)
      local tat = stored and max(stored + 0, now) or now
      local new_tat = max(tat + cost * t, now)
      local tau = burst * t
      local allow_at = new_tat - tau
      ok = now >= allow_at
      if ok then
        remaining, retry, reset = floor((now + tau - new_tat) / t), 0, ceil(new_tat - now)
      else
        remaining = max(0, floor((now + tau - tat) / t))
        retry, reset = ceil(allow_at - now), ceil(tat - now)
      end
      writes[i] = new_tat
    else
      local limit, cost = a[q + 1], a[q + 2]
      local seen = tonumber(call('GET', key) or '0')
      reset = a[q + 3]
      ok = seen + cost <= limit
      if ok then remaining, retry = limit - seen - cost, 0
      else remaining, retry = max(0, limit - seen), reset end
    end
    all_ok = all_ok and ok
    local o = #out
    out[o + 1], out[o + 2], out[o + 3], out[o + 4] = ok and 1 or 0, remaining, retry, reset
  end
  return writes, all_ok
end

local function rate_apply(a, p, first, count, writes)
  local now = a[1]
  for i = 1, count do
    local key, q = KEYS[first + i - 1], p + (i - 1) * 4
    if a[q] == 'g' then
      local v = writes[i]
      local ttl = string.format('%d', max(1, ceil(v - now)))  -- cheaper than Redis' %.17g
      call('SET', key, string.format('%.17g', v), 'PX', ttl)
    else
      -- %d: Redis would write a number argument with %.17g (1e+17 for a big one)
      call('INCRBY', key, string.format('%d', a[q + 2]))
      call('PEXPIRE', key, string.format('%d', a[q + 3]))
    end
  end
end

-- Holds: from a[p], per hold "limit amount ttl expiry n window[1..n]", for the KEYS[2 ..]
-- pairs; KEYS[1] is the reservation record; now is a[1]. Returns the plan (nil when
-- refused) and appends the reply to `out`: -1 (duplicate) | 0 <index> <used...> |
-- 1 <used...>.
local function hold_eval(a, p, n, out)
  if call('EXISTS', KEYS[1]) == 1 then out[#out + 1] = -1 return nil end
  local plan, used_list = {}, {}
  for i = 1, n do
    local c, z = KEYS[2 * i], KEYS[2 * i + 1]
    local limit, amount, size = a[p], a[p + 1] + 0, a[p + 4]
    local u, held, next_expiry, exp = used(c, z, a, p + 5, p + 4 + size, a[1])
    used_list[i] = u
    if u >= limit or u + amount > limit then
      out[#out + 1], out[#out + 2] = 0, i - 1
      for j = 1, i do out[#out + 1] = used_list[j] end
      return nil
    end
    plan[i] = {c, z, a[p + 1], held == 0, a[p + 2], a[p + 3], next_expiry, exp}
    p = p + 5 + size
  end
  out[#out + 1] = 1
  for j = 1, n do out[#out + 1] = used_list[j] end
  return plan
end

local function hold_apply(plan, reservation, until_ms, record_ttl)
  local until_n = until_ms + 0
  for _, h in ipairs(plan) do
    local c, z, ttl, fresh = h[1], h[2], h[5], h[4]  -- fresh: `held` leaves zero
    call('HINCRBY', c, 'held', h[3])
    call('ZADD', z, until_ms, reservation .. ':' .. h[3])
    if not h[7] or until_n < h[7] then call('HSET', c, 'next', until_ms) end
    if not expire(c, z, ttl, h[6], h[8]) and fresh and ttl ~= '0' then
      -- `held` left zero: the holds zset was empty, so Redis had deleted it (and its TTL)
      call('PEXPIRE', z, ttl)
    end
  end
  call('SET', KEYS[1], 'held', 'PX', record_ttl)
end
"""

# Arguments travel as one spec argument (a JSON array, `_join`) and replies come back as
# one array of integers: one argument to encode instead of dozens of numbers each (the
# words below are the array's elements).
#
# KEYS: record, then (counter, holds) per hold.  ARGV[1]: reservation id.
# ARGV[2]: "now until record_ttl" then the holds.
_HOLD = """
local a, out = words(ARGV[2]), {}
local plan = hold_eval(a, 4, (#KEYS - 1) / 2, out)
if plan then hold_apply(plan, ARGV[1], a[2], a[3]) end
return out
"""

# KEYS: one per item.  ARGV[1]: "now force" then the rate items.
_RATE = """
local a, out = words(ARGV[1]), {}
local writes, ok = rate_eval(a, 3, 1, #KEYS, out)
if ok or a[2] == '1' then rate_apply(a, 3, 1, #KEYS, writes) end
return out
"""

# Rate limits and budget holds in one step, all or nothing: the rate items are decided
# first (a refusal holds nothing, purges nothing), then the holds; a refused hold
# consumes no rate allowance.
# KEYS: record, (counter, holds) per hold, then one per rate item.  ARGV[1]: reservation.
# ARGV[2]: "now until record_ttl n_holds n_items", the rate items, then the holds.
# Reply: 4 integers per rate item, then (unless a rate item refused) the holds' reply.
_ADMIT = """
local a, out = words(ARGV[2]), {}
local n_holds, n_items = a[4], a[5]
local first = 2 + 2 * n_holds
local writes, ok = rate_eval(a, 6, first, n_items, out)
if not ok then return out end
local plan = hold_eval(a, 6 + 4 * n_items, n_holds, out)
if plan then
  rate_apply(a, 6, first, n_items, writes)
  hold_apply(plan, ARGV[1], a[2], a[3])
end
return out
"""

# KEYS: record, then (counter, holds) per hold, then one per debited rate item.
# ARGV[1]: reservation id, ARGV[2]: final state.  ARGV[3]: "now record_ttl" then per hold
# "amount -amount actual ttl expiry bucket prune|-".  ARGV[4]: "now" then the rate items
# to debit (forced), applied only when this call settles, so a repeated settle never
# debits twice.
_SETTLE = """
local state = call('GET', KEYS[1])
if state == 'settled' or state == 'released' then return state end
local a, d = words(ARGV[3]), words(ARGV[4])
local now, n_items = a[1], (#d - 1) / 4
local n_holds = (#KEYS - 1 - n_items) / 2
for i = 1, n_holds do
  local c, z = KEYS[2 * i], KEYS[2 * i + 1]
  local b = 3 + (i - 1) * 7
  local amount, back, actual, ttl, expiry, bucket, prune = unpack(a, b, b + 6)
  local v = call('HMGET', c, 'next', 'exp')
  if v[1] and v[1] + 0 <= now then purge(c, z, now, bucket) end
  if call('ZREM', z, ARGV[1] .. ':' .. amount) == 1 then
    call('HINCRBY', c, 'held', back)
  elseif state == 'held' then
    -- the hold expired and was charged at its amount: charge only the difference
    actual = string.format('%d', tonumber(actual) - tonumber(amount))
  end
  if actual ~= '0' then call('HINCRBY', c, bucket, actual) end
  if prune ~= '-' then
    for _, f in ipairs(call('HKEYS', c)) do
      if string.sub(f, 1, 2) == 's:' and f < prune then call('HDEL', c, f) end
    end
  end
  expire(c, z, ttl, expiry, v[2])
end
if n_items > 0 then
  local writes = rate_eval(d, 2, 2 + 2 * n_holds, n_items, {})
  rate_apply(d, 2, 2 + 2 * n_holds, n_items, writes)
end
call('SET', KEYS[1], ARGV[2], 'PX', a[2])
return state or 'unknown'
"""

# KEYS: (counter, holds) pairs.  ARGV[1]: "now" then per counter "n window[1..n]".
_USAGE = """
local a = words(ARGV[1])
local out, pos = {}, 2
for i = 1, #KEYS / 2 do
  local c = KEYS[2 * i - 1]
  local size = a[pos]
  local window = {}
  for j = 1, size do window[j] = a[pos + j] end
  pos = pos + 1 + size
  local v = call('HMGET', c, 'held', unpack(window))
  local total = 0  -- expired holds still in `held` count as spent, as a purge charges them
  for _, x in ipairs(v) do
    if x then total = total + tonumber(x) end
  end
  out[i] = total
end
return out
"""

_INCR = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if ARGV[2] ~= '0' and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The response cache's lookup and single-flight lock in one round trip.
# KEYS: value, lock.  ARGV: owner, lock TTL (ms).  Reply: {value} on a hit, else {false,
# 1 if the lock was taken}; a Lua false is a nil in the reply.
_GET_OR_LOCK = """
local v = redis.call('GET', KEYS[1])
if v then return {v} end
return {false, redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0}
"""

# The cache hygiene record's read and write in one round trip, as `SET ... PX ... GET`
# would be, but on any Redis with scripting (that option needs 6.2). KEYS: the record.
# ARGV: value, TTL (ms). Reply: the value it replaced, or nil.
_SWAP = """
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return old
"""

# The response cache's write and the release of its lock in one round trip (the value
# lands before the lock is freed). KEYS: value, lock.  ARGV: value, TTL (ms), owner.
_SET_AND_RELEASE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then return redis.call('DEL', KEYS[2]) end
return 0
"""


Word = str | int | float  # a spec word: a string for redis.call, a number for arithmetic


def _hold_words(facts: Sequence[_CounterFacts], holds: Sequence[Hold], now: int) -> list[Word]:
    """Per hold: limit amount ttl expiry n window[1..n]."""
    words: list[Word] = []
    for f, h in zip(facts, holds, strict=True):
        ttl = str(ttl_ms(f.counter.expires_at, now))
        words += (f.limit, str(h.amount), ttl, f.expiry, *f.window)
    return words


def _hold_result(values: Sequence[int]) -> HoldResult:
    if values[0] == -1:
        return HoldResult(ok=False, duplicate=True)
    if values[0] == 0:
        return HoldResult(ok=False, used=tuple(values[2:]), failed=values[1])
    return HoldResult(ok=True, used=tuple(values[1:]))


def _rate_states(v: Sequence[int]) -> list[RateState]:
    return [
        RateState(v[j] == 1, v[j + 1], v[j + 2] / 1000, v[j + 3] / 1000)
        for j in range(0, len(v), 4)
    ]


_INT64 = 2**63


def _join(words: list[Word]) -> bytes:
    """One spec argument: a JSON array (the scripts' `words`).

    orjson writes only 64-bit integers; a larger one (an absurd limit or burst) goes as
    the double the script would hold for it anyway (checked only when orjson refuses,
    so the common case pays nothing)."""
    try:
        return orjson.dumps(words)
    except orjson.JSONEncodeError:
        return orjson.dumps([_double_if_huge(w) for w in words])


def _double_if_huge(word: Word) -> Word:
    return float(word) if isinstance(word, int) and not -_INT64 <= word < _INT64 else word


MEMO_LIMIT = 65_536  # memoized counters and keys per store; cleared when full


@dataclass(frozen=True, slots=True)
class _CounterFacts:
    counter: Counter  # kept so the id() it is filed under cannot be reused meanwhile
    tag: str
    keys: bytes  # the counter and holds keys, RESP-encoded
    limit: int
    window: tuple[Word, ...]  # n, window[1..n]
    expiry: str  # the keys' expiry, ms ("0": never), for the hash's `exp` field
    finish: tuple[str, str]  # bucket, prune or "-"


class _Encoder:
    """Builds a script's KEYS and spec words with little Python per call.

    The ledger and the limiter hand in the same `Counter` objects and the same rate keys
    request after request, so what never changes about them (their hash tag, their keys
    RESP-encoded, their window and expiry words) is worked out once and memoized; a call
    only formats the numbers that change (amounts, TTLs) and checks the hash tags
    (the `same_slot` rule) by comparing memoized strings.
    """

    def __init__(self) -> None:
        self._counters: dict[int, _CounterFacts] = {}
        self._keys: dict[str, tuple[str, bytes]] = {}

    def counter(self, c: Counter) -> _CounterFacts:
        facts = self._counters.get(id(c))
        if facts is None or facts.counter is not c:
            if len(self._counters) >= MEMO_LIMIT:
                self._counters.clear()
            tag = hash_tag(c.key)
            same_slot([c.key, c.holds_key])
            keys = bulk(c.key.encode()) + bulk(c.holds_key.encode())
            window: tuple[Word, ...] = (len(c.window), *c.window)
            expiry = "0" if c.expires_at is None else str(int(c.expires_at * 1000))
            finish = (c.bucket, c.prune_before or "-")
            facts = _CounterFacts(c, tag, keys, c.limit, window, expiry, finish)
            self._counters[id(c)] = facts
        return facts

    def key(self, key: str) -> tuple[str, bytes]:
        found = self._keys.get(key)
        if found is None:
            if len(self._keys) >= MEMO_LIMIT:
                self._keys.clear()
            found = self._keys[key] = (hash_tag(key), bulk(key.encode()))
        return found

    @staticmethod
    def rate_words(items: Sequence[RateItem], now: int) -> list[Word]:
        """Per item "g interval_ms burst cost" (GCRA) or "q limit cost reset_ms" (quota),
        all numbers (orjson writes a float's shortest round-trip form: the same double)."""
        words: list[Word] = []
        for i in items:
            if isinstance(i, Gcra):
                words += ("g", i.interval_ms, i.burst, i.cost)
            else:
                words += ("q", i.limit, i.cost, ttl_ms(i.resets_at, now))
        return words

    def keys(self, tag: str, parts: list[bytes], items: Sequence[RateItem]) -> None:
        """Append the rate items' encoded keys to `parts`, checking they share `tag`."""
        for i in items:
            item_tag, encoded = self.key(i.key)
            if item_tag != tag:
                _mixed(tag, item_tag)
            parts.append(encoded)

    def holds(
        self, tag: str, parts: list[bytes], counters: Sequence[Counter]
    ) -> list[_CounterFacts]:
        """Append each counter's encoded keys to `parts` (same tag); their facts."""
        out = []
        for c in counters:
            facts = self.counter(c)
            if facts.tag != tag:
                _mixed(tag, facts.tag)
            parts.append(facts.keys)
            out.append(facts)
        return out


def _mixed(tag: str, other: str) -> None:
    same_slot([f"{{{tag}}}", f"{{{other}}}"])  # raises the one ValueError for mixed tags


class _Script:
    """A Lua script called by SHA (hashed once, at import); loaded on the first NOSCRIPT."""

    def __init__(self, body: str, *, prelude: bool = False) -> None:
        self.source = (_PRELUDE + body) if prelude else body
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        self._sha = self.sha.encode()
        self._load = command(b"SCRIPT", b"LOAD", self.source.encode())

    async def __call__(
        self, pipe: Pipe, count: int, keys: Sequence[bytes], args: Sequence[str | bytes]
    ) -> Any:
        payload = evalsha(self._sha, count, keys, args)
        try:
            return await pipe.call(payload)
        except NoScript:  # Redis restarted or flushed its scripts: load, then run, one write
            return (await pipe.call_many(self._load + payload, 2))[1]


_SCRIPTS = {
    "hold": _Script(_HOLD, prelude=True),
    "settle": _Script(_SETTLE, prelude=True),
    "usage": _Script(_USAGE, prelude=True),
    "rate": _Script(_RATE, prelude=True),
    "admit": _Script(_ADMIT, prelude=True),
    "incr": _Script(_INCR),
    "unlock": _Script(_UNLOCK),
    "get_or_lock": _Script(_GET_OR_LOCK),
    "set_and_release": _Script(_SET_AND_RELEASE),
    "swap": _Script(_SWAP),
}

_PING = command(b"PING")
_GET = b"*2\r\n$3\r\nGET\r\n"  # + the key, bulk-encoded
_DEL = b"*2\r\n$3\r\nDEL\r\n"

_UNAVAILABLE_REPLIES = (
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "READONLY",
    "NOAUTH",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
    "OOM",
)
_DATA_REPLIES = ("WRONGTYPE", "not an integer", "not a valid float")


def _map_error(exc: Exception, timeout: float) -> StoreError:
    """Translate a pipe (or socket) error into the store hierarchy."""
    if isinstance(exc, TimeoutError):
        return StoreUnavailable(f"redis did not answer within {timeout:g}s")
    if isinstance(exc, OSError):  # ConnectionError (refused, lost, closed) included
        return StoreUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}")
    message = str(exc)
    if message.startswith(_UNAVAILABLE_REPLIES):
        return StoreUnavailable(f"redis unavailable: {message}")
    if any(text in message for text in _DATA_REPLIES):
        return StoreDataError(message)
    return StoreError(f"redis error: {type(exc).__name__}: {message}")


def _pool(url: str, timeout: float, password: str | None = None) -> ConnectionPool:
    """redis-py's parse of the URL (validated here, so a bad one fails at start). The
    store sends nothing through it; it backs `RedisStore._client` for admin use (tests)."""
    extra = {"password": password} if password is not None else {}
    try:
        return ConnectionPool.from_url(
            url,
            **extra,
            max_connections=4,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            driver_info=None,  # no CLIENT SETINFO
            health_check_interval=0,
        )
    except (ValueError, TypeError) as exc:
        raise StoreConfigError(f"{url!r}: {exc}") from exc


def _endpoint(pool: ConnectionPool) -> Endpoint:
    """The pipe's endpoint from redis-py's parse of the URL (host or socket, TLS, auth, db)."""
    conn = pool.make_connection()  # type: ignore[no-untyped-call]  # builds, never dials
    tls = conn.ssl_context.get() if isinstance(conn, SSLConnection) else None
    if isinstance(conn, UnixDomainSocketConnection):
        db = int(conn.db or 0)
        return Endpoint(path=conn.path, username=conn.username, password=conn.password, db=db)
    assert isinstance(conn, Connection)
    return Endpoint(
        conn.host, conn.port, None, tls, conn.username, conn.password, int(conn.db or 0)
    )


class RedisStore:
    """A `Store` backed by Redis (standalone, or Cluster-safe key layout)."""

    def __init__(
        self, client: Redis, *, clock: Clock | None = None, timeout_seconds: float = 1.0
    ) -> None:
        self._client = client
        self._pipe = Pipe(_endpoint(client.connection_pool), timeout_seconds)
        self._encode = _Encoder()
        self._clock: Clock = clock or SystemClock()
        self._timeout = timeout_seconds
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        clock: Clock | None = None,
        timeout_seconds: float = 1.0,
        password: str | None = None,
    ) -> RedisStore:
        """Build a store for `url`; every call is bounded by `timeout_seconds`. A
        `password` (from a file or env var, so it stays out of ConfigMaps) overrides one in
        the URL."""
        if not timeout_seconds > 0:
            raise StoreConfigError(f"timeout_seconds must be positive, got {timeout_seconds!r}")
        client = Redis.from_pool(_pool(url, timeout_seconds, password))
        return cls(client, clock=clock, timeout_seconds=timeout_seconds)

    @property
    def clock(self) -> Clock:
        return self._clock

    async def _call(self, payload: bytes) -> Any:
        """Send one command over the pipe (bounded by its watchdog); its reply."""
        if self._closed:
            raise StoreUnavailable("store is closed")
        try:
            return await self._pipe.call(payload)
        except (ReplyError, OSError, TimeoutError) as exc:
            raise _map_error(exc, self._timeout) from exc

    async def _script(
        self, name: str, count: int, keys: Sequence[bytes], args: Sequence[str | bytes]
    ) -> Any:
        """Run a script over the pipelined connection (bounded by its own watchdog);
        `keys`: its `count` keys, RESP-encoded (some pieces may hold two)."""
        if self._closed:
            raise StoreUnavailable("store is closed")
        try:
            return await _SCRIPTS[name](self._pipe, count, keys, args)
        except (ReplyError, OSError, TimeoutError) as exc:
            raise _map_error(exc, self._timeout) from exc

    # ---- KV -------------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(_PING)

    async def get(self, key: str) -> bytes | None:
        reply: bytes | None = await self._call(_GET + bulk(key.encode()))
        return reply

    async def set(
        self,
        key: str,
        value: bytes,
        ttl_seconds: float | None = None,
        *,
        only_if_absent: bool = False,
    ) -> bool:
        check_ttl(ttl_seconds)
        parts = [b"SET", key.encode(), value]
        if ttl_seconds is not None:
            parts += (b"PX", b"%d" % px(ttl_seconds))
        if only_if_absent:
            parts.append(b"NX")
        return await self._call(command(*parts)) is not None  # +OK, or nil when NX lost

    async def delete(self, key: str) -> bool:
        return bool(await self._call(_DEL + bulk(key.encode())))

    async def scan(self, prefix: str, limit: int = 1000) -> list[str]:
        """At most `limit` keys starting with `prefix`, sorted; SCAN, never KEYS."""
        pattern = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in prefix) + "*"
        tail = (b"MATCH", pattern.encode(), b"COUNT", b"%d" % max(100, limit))
        found: set[str] = set()
        cursor = b"0"
        while True:
            cursor, batch = await self._call(command(b"SCAN", cursor, *tail))
            found.update(k.decode() for k in batch)
            if cursor == b"0" or len(found) >= limit:
                return sorted(found)[:limit]

    async def incr_by(self, key: str, amount: int, ttl_seconds: float | None = None) -> int:
        """Add `amount`; a TTL is set only when the key has none (it starts a window)."""
        check_ttl(ttl_seconds)
        expiry = 0 if ttl_seconds is None else px(ttl_seconds)
        keys = [bulk(key.encode())]
        return int(await self._script("incr", 1, keys, [str(amount), str(expiry)]))

    async def acquire_lock(self, key: str, owner: str, ttl_seconds: float) -> bool:
        return await self.set(key, owner.encode(), ttl_seconds, only_if_absent=True)

    async def release_lock(self, key: str, owner: str) -> bool:
        """Delete the lock only if `owner` still holds it (compare-and-delete in one script)."""
        return bool(await self._script("unlock", 1, [bulk(key.encode())], [owner]))

    async def get_or_lock(
        self, key: str, lock: str, owner: str, ttl_seconds: float
    ) -> tuple[bytes | None, bool]:
        check_ttl(ttl_seconds)
        same_slot_pair(key, lock)
        keys = [bulk(key.encode()), bulk(lock.encode())]
        reply = await self._script("get_or_lock", 2, keys, [owner, b"%d" % px(ttl_seconds)])
        return (reply[0], False) if reply[0] is not None else (None, reply[1] == 1)

    async def swap(self, key: str, value: bytes, ttl_seconds: float) -> bytes | None:
        check_ttl(ttl_seconds)
        args = [value, b"%d" % px(ttl_seconds)]
        reply: bytes | None = await self._script("swap", 1, [bulk(key.encode())], args)
        return reply

    async def set_and_release(
        self, key: str, value: bytes, ttl_seconds: float, lock: str, owner: str
    ) -> bool:
        check_ttl(ttl_seconds)
        same_slot_pair(key, lock)
        keys = [bulk(key.encode()), bulk(lock.encode())]
        args = [value, b"%d" % px(ttl_seconds), owner.encode()]
        return bool(await self._script("set_and_release", 2, keys, args))

    async def wait_for(self, key: str, timeout_seconds: float) -> bytes | None:
        """Poll `get` with backoff (5 ms doubling to 100 ms) until a value or the timeout.

        Polling rather than pub/sub or keyspace notifications: single-flight
        waiters are rare (identical concurrent requests) and wait on model calls
        that take seconds, so 100 ms of extra latency is noise; pub/sub would
        need a dedicated connection and a listener task per process, and
        keyspace notifications need server config (`notify-keyspace-events`)
        that managed Redis services often refuse. Polling needs neither.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        delay = 0.005
        while True:
            value = await self.get(key)
            remaining = deadline - loop.time()
            if value is not None or remaining <= 0:
                return value
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)

    # ---- budget ---------------------------------------------------------------------------

    async def hold(
        self,
        reservation: str,
        record_key: str,
        holds: Sequence[Hold],
        *,
        until: float,
        record_ttl: float,
    ) -> HoldResult:
        now = now_ms(self._clock)
        tag, keys = hash_tag(record_key), [bulk(record_key.encode())]
        facts = self._encode.holds(tag, keys, [h.counter for h in holds])
        spec: list[Word] = [now, str(int(until * 1000)), str(px(record_ttl))]
        spec += _hold_words(facts, holds, now)
        reply = await self._script("hold", 1 + 2 * len(holds), keys, [reservation, _join(spec)])
        return _hold_result(reply)

    async def settle(
        self,
        reservation: str,
        record_key: str,
        holds: Sequence[Hold],
        actuals: Sequence[int],
        *,
        record_ttl: float,
        release: bool = False,
        debit: Sequence[RateItem] = (),
    ) -> SettleOutcome:
        check_settle_args(holds, actuals)
        now = now_ms(self._clock)
        tag, keys = hash_tag(record_key), [bulk(record_key.encode())]
        facts = self._encode.holds(tag, keys, [h.counter for h in holds])
        self._encode.keys(tag, keys, debit)
        spec: list[Word] = [now, str(px(record_ttl))]
        for f, h, actual in zip(facts, holds, actuals, strict=True):
            ttl = str(ttl_ms(f.counter.expires_at, now))
            spec += (str(h.amount), str(-h.amount), str(actual), ttl, f.expiry, *f.finish)
        debits = _join([now, *self._encode.rate_words(debit, now)])
        state = "released" if release else "settled"
        args: list[str | bytes] = [reservation, state, _join(spec), debits]
        reply = await self._script("settle", len(keys) + len(holds), keys, args)
        return SettleOutcome(reply.decode() if isinstance(reply, bytes) else str(reply))

    async def usage(self, counters: Sequence[Counter]) -> list[int]:
        if not counters:
            return []
        keys: list[bytes] = []
        facts = self._encode.holds(self._encode.counter(counters[0]).tag, keys, counters)
        spec: list[Word] = [now_ms(self._clock)]
        for f in facts:
            spec += f.window
        return list(await self._script("usage", 2 * len(counters), keys, [_join(spec)]))

    # ---- rate -----------------------------------------------------------------------------

    async def rate(self, items: Sequence[RateItem], *, force: bool = False) -> list[RateState]:
        if not items:
            return []
        keys: list[bytes] = []
        self._encode.keys(self._encode.key(items[0].key)[0], keys, items)
        now = now_ms(self._clock)
        spec: list[Word] = [now, "1" if force else "0", *self._encode.rate_words(items, now)]
        return _rate_states(await self._script("rate", len(items), keys, [_join(spec)]))

    async def admit(
        self,
        items: Sequence[RateItem],
        reservation: str,
        record_key: str,
        holds: Sequence[Hold],
        *,
        until: float,
        record_ttl: float,
    ) -> tuple[list[RateState], HoldResult | None]:
        now = now_ms(self._clock)
        tag, keys = hash_tag(record_key), [bulk(record_key.encode())]
        facts = self._encode.holds(tag, keys, [h.counter for h in holds])
        self._encode.keys(tag, keys, items)
        head: list[Word] = [now, str(int(until * 1000)), str(px(record_ttl)), len(holds)]
        spec = [*head, len(items), *self._encode.rate_words(items, now)]
        spec += _hold_words(facts, holds, now)
        count = 1 + 2 * len(holds) + len(items)
        reply = await self._script("admit", count, keys, [reservation, _join(spec)])
        split = 4 * len(items)  # the rate items' verdicts, then the holds' (unless refused)
        hold_part = reply[split:]
        return _rate_states(reply[:split]), _hold_result(hold_part) if hold_part else None

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._pipe.close()
            await self._client.aclose()
