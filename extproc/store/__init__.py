"""The state layer every policy uses: one `Store` protocol, two backends.

`open_store(url)` returns a `MemoryStore` for `memory://` (one process, asyncio)
or a `RedisStore` for `redis://`, `rediss://` and `unix://` URLs (many
processes). Both pass the same contract suite (tests/unit/test_store_contract.py).

What a store offers:

* generic KV with TTLs for API keys, the response cache and single-flight
  (`get`, `set`, `delete`, `scan`, `incr_by`, `acquire_lock`, `release_lock`,
  `wait_for`), and three compound calls that spare the response cache round trips
  (`get_or_lock`: a lookup that takes the single-flight lock on a miss; `swap`: set and
  return the previous value; `set_and_release`: store the answer and free the lock);
* the atomic budget primitives (`hold`, `settle`, `usage`): counters with
  limits and expiring holds, checked all-or-nothing across every counter of a
  request in one round trip;
* the atomic rate primitive (`rate`): GCRA limits and fixed-window quotas,
  all-or-nothing, one round trip;
* `admit`: rate items and budget holds together, all-or-nothing, one round
  trip (what the request path uses when both share a hash tag); `settle(debit=...)`
  likewise settles the holds and corrects the token rate limits in one.

Time comes from the store's `clock` (injectable; `ManualClock` in tests). The
Redis store sends the caller's time into its scripts instead of reading Redis'
clock, so tests can move time and every gateway replica decides with its own
clock: replicas agree to within their clock skew (NTP keeps that to
milliseconds; a rate window or a budget reset moves by at most the skew).
Expiries are sent as durations relative to that same `now`, so a skewed
caller never makes Redis drop a key early.

Exceptions (one hierarchy; third-party errors are mapped at the boundary with
`raise ... from`)::

    StoreError                 base class: anything the store cannot do
    ├── StoreUnavailable       backend down, timed out (bounded, ~1 s), loading
    │                          or closed; retrying later may succeed. Policies
    │                          decide fail-open or fail-closed on this one.
    ├── StoreDataError         a key holds a value of the wrong kind (e.g.
    │                          `incr_by` on a non-integer); a bug, not an outage
    └── StoreConfigError       `open_store` got an unusable URL (also ValueError)

Keys of one atomic operation (`hold`, `settle`, `usage`, `rate`, `admit`, `get_or_lock`,
`set_and_release`) must share a
Redis Cluster hash tag (`{...}`); both stores raise `ValueError` otherwise, so
a layout mistake shows up in unit tests instead of as CROSSSLOT in production.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Protocol, runtime_checkable
from urllib.parse import urlsplit

from extproc.slots import slot_init

__all__ = [
    "Clock",
    "Counter",
    "Gcra",
    "Hold",
    "HoldResult",
    "ManualClock",
    "Quota",
    "RateItem",
    "RateState",
    "SettleOutcome",
    "Store",
    "StoreConfigError",
    "StoreDataError",
    "StoreError",
    "StoreUnavailable",
    "SystemClock",
    "hash_tag",
    "open_store",
    "same_slot",
]


class StoreError(Exception):
    """Base class of every error a store raises."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached in time; the operation may or may not have applied."""


class StoreDataError(StoreError):
    """A key holds a value the operation cannot use (wrong type, not an integer)."""


class StoreConfigError(StoreError, ValueError):
    """The store URL or options cannot be used; the message says what to change."""


@runtime_checkable
class Clock(Protocol):
    """Wall-clock time as Unix seconds (UTC). Budgets and windows use calendar time."""

    def time(self) -> float: ...


class SystemClock:
    """The real clock (`time.time`)."""

    def time(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to; for tests and simulations."""

    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, unix_seconds: float) -> None:
        self.now = unix_seconds


# ---- values -------------------------------------------------------------------------------

# ---- budget primitives --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counter:
    """One budget counter: settled spend per bucket plus the sum of live holds.

    Stored as a hash at `key` (fields `held` and one per bucket) and a sorted set
    at `holds_key` (members `<reservation>:<amount>` scored by hold expiry).
    `used = held + sum(window buckets)` is compared with `limit`.
    """

    key: str
    bucket: str  # the bucket a settle charges
    window: tuple[str, ...]  # the buckets summed against the limit
    limit: int
    expires_at: float | None = None  # absolute Unix seconds; None keeps the key forever
    prune_before: str | None = None  # settle deletes bucket fields sorting before this

    def __post_init__(self) -> None:
        names = (self.bucket, *self.window, self.prune_before or "")
        if any(not n.isprintable() or " " in n or n == "-" for n in names):
            raise ValueError("bucket names must be printable and free of spaces")

    @property
    def holds_key(self) -> str:
        return self.key + ":holds"


@slot_init
@dataclass(frozen=True, slots=True)
class Hold:
    """Reserve `amount` (integer units: micro-USD or tokens) on one counter."""

    counter: Counter
    amount: int


@slot_init
@dataclass(frozen=True, slots=True)
class HoldResult:
    """Outcome of `Store.hold`.

    `used` holds each counter's usage before this hold, in order; on failure it
    stops at the counter that refused (`failed` is its index). `duplicate` means
    a reservation with this id exists already (nothing was changed).
    """

    ok: bool
    used: tuple[int, ...] = ()
    failed: int | None = None
    duplicate: bool = False


class SettleOutcome(Enum):
    """What `Store.settle` found. Only SETTLED and UNKNOWN applied the actual amounts."""

    SETTLED = "held"  # the normal case: the reservation was live or had expired
    UNKNOWN = "unknown"  # no record (never held, or the record expired): spend recorded anyway
    ALREADY_SETTLED = "settled"  # a second settle: nothing changed
    ALREADY_RELEASED = "released"  # settle after release: nothing changed


# ---- rate primitives ----------------------------------------------------------------------


@slot_init
@dataclass(frozen=True, slots=True)
class Gcra:
    """A GCRA limit: `rate` units per `period` seconds, up to `burst` units at once."""

    key: str
    rate: int
    period: float
    burst: int
    cost: int

    @property
    def interval_ms(self) -> float:
        """Emission interval: milliseconds one unit occupies."""
        return self.period * 1000.0 / self.rate


@slot_init
@dataclass(frozen=True, slots=True)
class Quota:
    """A fixed-window count: at most `limit` units until `resets_at` (Unix seconds)."""

    key: str
    limit: int
    cost: int
    resets_at: float


RateItem = Gcra | Quota


@slot_init
@dataclass(frozen=True, slots=True)
class RateState:
    """One item's verdict. Times are seconds (millisecond resolution)."""

    allowed: bool
    remaining: int
    retry_after: float  # 0 when allowed
    reset_after: float  # until the item is back to full capacity / its window resets


# ---- protocol -----------------------------------------------------------------------------


class Store(Protocol):
    """Async state store. Every method may raise `StoreUnavailable` (bounded in time)."""

    @property
    def clock(self) -> Clock: ...

    async def ping(self) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(
        self,
        key: str,
        value: bytes,
        ttl_seconds: float | None = None,
        *,
        only_if_absent: bool = False,
    ) -> bool: ...

    async def delete(self, key: str) -> bool: ...

    async def scan(self, prefix: str, limit: int = 1000) -> list[str]: ...

    async def incr_by(self, key: str, amount: int, ttl_seconds: float | None = None) -> int: ...

    async def acquire_lock(self, key: str, owner: str, ttl_seconds: float) -> bool: ...

    async def release_lock(self, key: str, owner: str) -> bool: ...

    async def wait_for(self, key: str, timeout_seconds: float) -> bytes | None: ...

    async def get_or_lock(
        self, key: str, lock: str, owner: str, ttl_seconds: float
    ) -> tuple[bytes | None, bool]:
        """`key`'s value and False; or, when `key` is absent, None and whether
        `acquire_lock(lock, owner, ttl_seconds)` took the lock: one atomic step, so a
        lock found free was freed only after the value was written. Same hash tag."""
        ...

    async def swap(self, key: str, value: bytes, ttl_seconds: float) -> bytes | None:
        """`set(key, value, ttl_seconds)`, atomically returning the value it replaced."""
        ...

    async def set_and_release(
        self, key: str, value: bytes, ttl_seconds: float, lock: str, owner: str
    ) -> bool:
        """`set(key, value, ttl_seconds)` then `release_lock(lock, owner)` as one atomic
        step (a waiter never sees the lock free and the value missing); the release's
        result. Same hash tag."""
        ...

    async def hold(
        self,
        reservation: str,
        record_key: str,
        holds: Sequence[Hold],
        *,
        until: float,
        record_ttl: float,
    ) -> HoldResult: ...

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
        """Replace the holds by `actuals` (or drop them: `release`); idempotent.

        `debit`: rate items charged with `rate(debit, force=True)` in the same atomic
        step (the token limits' correction after the answer), and only when this call
        settles (never on a repeated settle), so a retried settle never debits twice.
        Every key shares one hash tag.
        """
        ...

    async def usage(self, counters: Sequence[Counter]) -> list[int]: ...

    async def rate(self, items: Sequence[RateItem], *, force: bool = False) -> list[RateState]: ...

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
        """`rate(items)` and `hold(...)` as one atomic step, all or nothing.

        Rate items are decided first: if any refuses, nothing is written and the
        hold result is None. Otherwise the holds are tried; if they refuse, the rate
        items are not consumed either. Every key shares one hash tag.
        """
        ...

    async def close(self) -> None: ...


# ---- helpers shared by both backends ------------------------------------------------------


# Memoized: budget and rate keys repeat request after request (a cache entry's name does
# not, and only passes through; least recently used first out, so the repeating stay).
@functools.lru_cache(maxsize=4096)
def hash_tag(key: str) -> str:
    """The part of `key` Redis Cluster hashes: the first non-empty `{...}`, else the key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def same_slot(keys: Sequence[str]) -> None:
    """Raise ValueError unless every key hashes to the same Cluster slot (same tag)."""
    tags = {hash_tag(k) for k in keys}
    if len(tags) > 1:
        raise ValueError(f"keys of one atomic operation must share a hash tag, got {sorted(tags)}")


def same_slot_pair(key: str, other: str) -> None:
    """`same_slot((key, other))` for the two-key calls on every cached request, at a
    fifth of its cost (no set of tags built when the tags agree)."""
    if hash_tag(key) != hash_tag(other):
        same_slot((key, other))


def check_ttl(ttl_seconds: float | None) -> None:
    if ttl_seconds is not None and not ttl_seconds > 0:
        raise ValueError(f"ttl_seconds must be positive or None, got {ttl_seconds!r}")


def check_settle_args(holds: Sequence[Hold], actuals: Sequence[int]) -> None:
    if len(holds) != len(actuals):
        raise ValueError("settle needs one actual amount per hold")


def now_ms(clock: Clock) -> int:
    """The clock's time in whole milliseconds: the unit both backends compute in."""
    return int(clock.time() * 1000)


def px(ttl_seconds: float) -> int:
    """A positive TTL in whole milliseconds, rounded up (Redis `PX`)."""
    return max(1, math.ceil(ttl_seconds * 1000))


def ttl_ms(expires_at: float | None, now: int) -> int:
    """Milliseconds from `now` (ms) to `expires_at` (s); 0 means no expiry; at least 1."""
    if expires_at is None:
        return 0
    return max(1, int(expires_at * 1000) - now)


StoreKind = Literal["memory", "redis"]


def open_store(
    url: str,
    *,
    clock: Clock | None = None,
    timeout_seconds: float = 1.0,
    password: str | None = None,
) -> Store:
    """Build a store from a URL; no I/O happens until the first call.

    `memory://` gives a `MemoryStore`; `redis://`, `rediss://` and `unix://` a
    `RedisStore` whose every call is bounded by `timeout_seconds`.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from extproc.store.memory import MemoryStore

        return MemoryStore(clock=clock)
    if scheme in ("redis", "rediss", "unix"):
        from extproc.store.redis import RedisStore

        return RedisStore.from_url(
            url, clock=clock, timeout_seconds=timeout_seconds, password=password
        )
    raise StoreConfigError(f"{url!r}: use memory:// or a redis://, rediss:// or unix:// URL")
