"""In-process store for one gateway process (`memory://`).

Every method runs to completion without awaiting (except `wait_for`), so each
is atomic under asyncio exactly as a Lua script is atomic in Redis. The budget
and rate arithmetic mirrors the Lua in `extproc.store.redis` line for line
(same millisecond integers, same float formulas), and the shared contract suite
checks that both give the same answers.

Time is the injected `Clock`: TTLs, hold expiries, windows and GCRA all use it,
so tests move time with `ManualClock.advance`. `wait_for`'s timeout is real
elapsed time (it is a wait, not a window).

Expired entries are dropped when touched and by a sweep every `SWEEP_EVERY`
writes, so memory stays proportional to live keys. The sweep pops only what has
expired from a heap of expiry times: a full scan would cost time in proportion to
the live keys (36 ms per 100,000 keys, a stall of every caller on the event loop),
and a busy cache holds ~1 M of them. A finished (settled or
released) reservation's record only guards against a repeated settle of that
request, which comes within seconds if at all; it would otherwise stay for its
hour-long TTL, ~250 B per request (~900 MB an hour at 1,000 req/s), so only the
newest `FINISHED_RECORDS` of them are kept (one process has no other replica
that could settle an older one).
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from extproc.store import (
    Clock,
    Counter,
    Gcra,
    Hold,
    HoldResult,
    Quota,
    RateItem,
    RateState,
    SettleOutcome,
    StoreDataError,
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

__all__ = ["MemoryStore"]

SWEEP_EVERY = 1024
FINISHED_RECORDS = 10_000


@dataclass(slots=True)
class _Entry:
    value: bytes
    expires_at: int | None  # ms


@dataclass(slots=True)
class _Counter:
    fields: dict[str, int] = field(default_factory=dict)
    holds: dict[str, int] = field(default_factory=dict)  # member -> hold expiry (ms)
    expires_at: int | None = None  # ms
    # No hold expires before this (ms; None: no holds), so expired holds are looked for
    # only when one can be due, as the Lua's `next` field does.
    next_due: int | None = None


def _member_amount(member: str) -> int:
    return int(member.rpartition(":")[2])


_DUPLICATE = HoldResult(ok=False, duplicate=True)
_OUTCOMES = {outcome.value: outcome for outcome in SettleOutcome}


class MemoryStore:
    """A `Store` held in this process's memory."""

    def __init__(
        self, *, clock: Clock | None = None, finished_records: int = FINISHED_RECORDS
    ) -> None:
        self._clock: Clock = clock or SystemClock()
        self._kv: dict[str, _Entry] = {}
        self._expiries: list[tuple[int, str]] = []  # heap of (expiry ms, key) of _kv writes
        self._finished: dict[str, None] = {}  # finished reservation records, oldest first
        self._finished_limit = finished_records
        self._counters: dict[str, _Counter] = {}
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._writes = 0  # since the last sweep
        self._closed = False

    @property
    def clock(self) -> Clock:
        return self._clock

    # ---- internals ------------------------------------------------------------------------

    def _now(self) -> int:
        if self._closed:
            raise StoreUnavailable("store is closed")
        now = now_ms(self._clock)
        if self._writes >= SWEEP_EVERY:
            # Swept before an operation, never in the middle of one: an entry an operation
            # has read stays in place (and is updated in place) until it writes it.
            self._writes = 0
            self._sweep(now)
        return now

    def _entry(self, key: str, now: int) -> _Entry | None:
        if key in self._counters and self._live_counter(key, now) is not None:
            raise StoreDataError(f"{key!r} holds a budget counter, not a value")
        entry = self._kv.get(key)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= now:
            del self._kv[key]
            return None
        return entry

    def _live_counter(self, key: str, now: int) -> _Counter | None:
        counter = self._counters.get(key)
        if counter is not None and counter.expires_at is not None and counter.expires_at <= now:
            del self._counters[key]
            return None
        return counter

    def _put(self, key: str, value: bytes, expires_at: int | None) -> None:
        """Write `key`. The heap holds, for every entry with an expiry, an item due no later
        than it (the sweep re-queues a live entry whose item came due), so a rewrite that
        keeps or extends the expiry (a rate limit's state, every request) is made in place
        without a heap push or a new entry."""
        entry = self._kv.get(key)
        if entry is None:
            self._kv[key] = _Entry(value, expires_at)
            if expires_at is not None:
                heapq.heappush(self._expiries, (expires_at, key))
        else:
            if expires_at is not None and (
                entry.expires_at is None or expires_at < entry.expires_at
            ):
                heapq.heappush(self._expiries, (expires_at, key))
            entry.value, entry.expires_at = value, expires_at
        if self._waiters:
            for waiter in self._waiters.pop(key, ()):
                if not waiter.done():
                    waiter.set_result(None)
        self._writes += 1

    def _sweep(self, now: int) -> None:
        heap = self._expiries
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            entry = self._kv.get(key)  # gone since: nothing to do
            if entry is not None and entry.expires_at is not None:
                if entry.expires_at <= now:
                    del self._kv[key]
                else:  # rewritten in place with a later expiry: due again then
                    heapq.heappush(heap, (entry.expires_at, key))
        if len(heap) > 2 * len(self._kv) + SWEEP_EVERY:
            # Keys rewritten with new expiries leave stale heap items; rebuild from _kv.
            live = self._kv.items()
            self._expiries = [(e.expires_at, k) for k, e in live if e.expires_at is not None]
            heapq.heapify(self._expiries)
        for key in list(self._counters):
            self._live_counter(key, now)

    # ---- KV -------------------------------------------------------------------------------

    async def ping(self) -> None:
        self._now()

    async def get(self, key: str) -> bytes | None:
        return self._get(key, self._now())

    async def set(
        self,
        key: str,
        value: bytes,
        ttl_seconds: float | None = None,
        *,
        only_if_absent: bool = False,
    ) -> bool:
        check_ttl(ttl_seconds)
        return self._set(key, value, ttl_seconds, self._now(), only_if_absent)

    def _get(self, key: str, now: int) -> bytes | None:
        entry = self._entry(key, now)
        return None if entry is None else entry.value

    def _set(
        self, key: str, value: bytes, ttl_seconds: float | None, now: int, only_if_absent: bool
    ) -> bool:
        if only_if_absent and (
            self._live_counter(key, now) is not None or self._entry(key, now) is not None
        ):
            return False
        self._counters.pop(key, None)
        self._put(key, bytes(value), None if ttl_seconds is None else now + px(ttl_seconds))
        return True

    async def delete(self, key: str) -> bool:
        now = self._now()
        found = self._live_counter(key, now) is not None
        self._counters.pop(key, None)
        entry = self._kv.pop(key, None)
        return found or (entry is not None and (entry.expires_at is None or entry.expires_at > now))

    async def scan(self, prefix: str, limit: int = 1000) -> list[str]:
        now = self._now()
        keys = [k for k in list(self._kv) if k.startswith(prefix) and self._entry(k, now)]
        for key in list(self._counters):
            counter = self._live_counter(key, now)
            if counter is not None:
                names = [key, key + ":holds"] if counter.holds else [key]
                keys += [k for k in names if k.startswith(prefix)]
        return sorted(keys)[:limit]

    async def incr_by(self, key: str, amount: int, ttl_seconds: float | None = None) -> int:
        check_ttl(ttl_seconds)
        now = self._now()
        entry = self._entry(key, now)
        try:
            value = (0 if entry is None else int(entry.value)) + amount
        except ValueError as exc:
            raise StoreDataError(f"{key!r} does not hold an integer") from exc
        expires = entry.expires_at if entry is not None else None
        if expires is None and ttl_seconds is not None:
            expires = now + px(ttl_seconds)
        self._put(key, str(value).encode(), expires)
        return value

    async def acquire_lock(self, key: str, owner: str, ttl_seconds: float) -> bool:
        return await self.set(key, owner.encode(), ttl_seconds, only_if_absent=True)

    async def release_lock(self, key: str, owner: str) -> bool:
        return self._release(key, owner, self._now())

    def _release(self, key: str, owner: str, now: int) -> bool:
        entry = self._entry(key, now)
        if entry is None or entry.value != owner.encode():
            return False
        del self._kv[key]
        return True

    # The compound calls: the plain calls' cores in sequence, with no await between them,
    # so each is one atomic step here as its script is in Redis.
    async def get_or_lock(
        self, key: str, lock: str, owner: str, ttl_seconds: float
    ) -> tuple[bytes | None, bool]:
        check_ttl(ttl_seconds)
        same_slot_pair(key, lock)
        now = self._now()
        value = self._get(key, now)
        if value is not None:
            return value, False
        return None, self._set(lock, owner.encode(), ttl_seconds, now, True)

    async def swap(self, key: str, value: bytes, ttl_seconds: float) -> bytes | None:
        check_ttl(ttl_seconds)
        now = self._now()
        previous = self._get(key, now)
        self._set(key, value, ttl_seconds, now, False)
        return previous

    async def set_and_release(
        self, key: str, value: bytes, ttl_seconds: float, lock: str, owner: str
    ) -> bool:
        check_ttl(ttl_seconds)
        same_slot_pair(key, lock)
        now = self._now()
        self._set(key, value, ttl_seconds, now, False)
        return self._release(lock, owner, now)

    async def wait_for(self, key: str, timeout_seconds: float) -> bytes | None:
        """Wake on the `set` of `key` (no polling); None after `timeout_seconds`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while True:
            value = await self.get(key)
            remaining = deadline - loop.time()
            if value is not None or remaining <= 0:
                return value
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(key, set()).add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return await self.get(key)
            finally:
                self._forget(key, waiter)

    def _forget(self, key: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[key]

    # ---- budget ---------------------------------------------------------------------------

    def _counter(self, key: str, now: int, *, create: bool = True) -> _Counter:
        """The live counter at `key`; a detached empty one when reading a missing key."""
        counter = self._live_counter(key, now)
        if counter is None:
            entry = self._kv.get(key)
            if entry is not None and (entry.expires_at is None or entry.expires_at > now):
                raise StoreDataError(f"{key!r} holds a value, not a budget counter")
            counter = _Counter()
            if create:
                self._counters[key] = counter
        return counter

    @staticmethod
    def _purge(counter: _Counter, now: int, bucket: str) -> None:
        """Expired holds count as spent at their estimate (charged to `bucket`): the
        process that held them died without settling, and the provider may have
        generated all of it. A settle that still comes corrects the difference."""
        expired = [m for m, until in counter.holds.items() if until <= now]
        if expired:
            freed = sum(_member_amount(m) for m in expired)
            for member in expired:
                del counter.holds[member]
            counter.fields["held"] = counter.fields.get("held", 0) - freed
            counter.fields[bucket] = counter.fields.get(bucket, 0) + freed
        counter.next_due = min(counter.holds.values(), default=None)

    @staticmethod
    def _used(counter: _Counter, window: Sequence[str]) -> int:
        fields = counter.fields
        used = fields.get("held", 0)
        for bucket in window:  # (a loop, not sum() over a generator: paid per counter)
            used += fields.get(bucket, 0)
        return used

    @staticmethod
    def _touch(counter: _Counter, spec: Counter, now: int) -> None:
        ttl = ttl_ms(spec.expires_at, now)
        if ttl > 0:
            counter.expires_at = now + ttl

    @staticmethod
    def _one_slot(tag: str, holds: Sequence[Hold], items: Sequence[RateItem]) -> None:
        """`same_slot`: the holds' counters and the rate items share `tag` (the record
        key's, or the first item's), compared tag by tag (`hash_tag` is memoized)."""
        for h in holds:  # (two plain loops: a comprehension is a call of its own)
            if hash_tag(h.counter.key) != tag:
                same_slot([f"{{{tag}}}", h.counter.key])  # raises the one ValueError
        for i in items:
            if hash_tag(i.key) != tag:
                same_slot([f"{{{tag}}}", i.key])

    async def hold(
        self,
        reservation: str,
        record_key: str,
        holds: Sequence[Hold],
        *,
        until: float,
        record_ttl: float,
    ) -> HoldResult:
        self._one_slot(hash_tag(record_key), holds, ())
        now = self._now()
        result, counters = self._hold_eval(record_key, holds, now)
        if result.ok:
            self._hold_apply(reservation, record_key, holds, counters, until, record_ttl, now)
        return result

    def _hold_eval(
        self, record_key: str, holds: Sequence[Hold], now: int
    ) -> tuple[HoldResult, list[_Counter]]:
        """Decide a hold; writes nothing except purging expired holds (as the Lua does).
        Also returns the counters it read, for `_hold_apply` (a missing one detached)."""
        if self._entry(record_key, now) is not None:
            return _DUPLICATE, []
        used: list[int] = []
        counters: list[_Counter] = []
        for h in holds:
            spec = h.counter
            counter = self._counter(spec.key, now, create=False)
            if counter.next_due is not None and counter.next_due <= now:
                self._purge(counter, now, spec.bucket)
            counters.append(counter)
            used.append(self._used(counter, spec.window))
            if used[-1] >= spec.limit or used[-1] + h.amount > spec.limit:
                return HoldResult(ok=False, used=tuple(used), failed=len(used) - 1), counters
        return HoldResult(ok=True, used=tuple(used)), counters

    def _hold_apply(
        self,
        reservation: str,
        record_key: str,
        holds: Sequence[Hold],
        counters: Sequence[_Counter],
        until: float,
        record_ttl: float,
        now: int,
    ) -> None:
        until_ms = int(until * 1000)
        stored = self._counters
        for h, read in zip(holds, counters, strict=True):
            counter = stored.setdefault(h.counter.key, read)  # a detached one is stored now
            held = counter.fields["held"] = counter.fields.get("held", 0) + h.amount
            counter.holds[f"{reservation}:{h.amount}"] = until_ms
            if counter.next_due is None or until_ms < counter.next_due:
                counter.next_due = until_ms
            if held == h.amount:  # TTL is (re)set when held leaves zero, and on every settle
                self._touch(counter, h.counter, now)
        self._put(record_key, b"held", now + px(record_ttl))

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
        self._one_slot(hash_tag(record_key), holds, debit)
        now = self._now()
        entry = self._entry(record_key, now)
        state = "unknown" if entry is None else entry.value.decode()
        outcome = _OUTCOMES.get(state) or SettleOutcome(state)  # (an Enum call costs ~1 µs)
        if outcome is SettleOutcome.ALREADY_SETTLED or outcome is SettleOutcome.ALREADY_RELEASED:
            return outcome
        held = outcome is SettleOutcome.SETTLED
        for h, actual in zip(holds, actuals, strict=True):
            self._settle_one(reservation, h, actual, now, held=held)
        if debit:  # forced: only the new states are needed (all read before any write)
            tats = [self._tat(i, now)[2] if isinstance(i, Gcra) else 0.0 for i in debit]
            self._rate_apply(debit, tats, now)
        self._put(record_key, b"released" if release else b"settled", now + px(record_ttl))
        self._remember_finished(record_key)
        return outcome

    def _remember_finished(self, record_key: str) -> None:
        """Keep the newest finished records only; the oldest are forgotten first."""
        self._finished.pop(record_key, None)
        self._finished[record_key] = None
        while len(self._finished) > self._finished_limit:
            oldest = next(iter(self._finished))
            del self._finished[oldest]
            entry = self._kv.get(oldest)
            if entry is not None and entry.value in (b"settled", b"released"):
                del self._kv[oldest]

    def _settle_one(self, reservation: str, h: Hold, actual: int, now: int, *, held: bool) -> None:
        spec = h.counter
        counter = self._counter(spec.key, now, create=actual != 0 or held)
        if counter.next_due is not None and counter.next_due <= now:
            self._purge(counter, now, spec.bucket)
        fields = counter.fields
        if counter.holds.pop(f"{reservation}:{h.amount}", None) is not None:
            fields["held"] = fields.get("held", 0) - h.amount
        elif held:  # the hold expired and was charged at its amount: charge the difference
            actual -= h.amount
        if actual != 0:
            fields[spec.bucket] = fields.get(spec.bucket, 0) + actual
        prune = spec.prune_before
        if prune:
            for name in [f for f in fields if f.startswith("s:") and f < prune]:
                del fields[name]
        self._touch(counter, spec, now)

    async def usage(self, counters: Sequence[Counter]) -> list[int]:
        same_slot([c.key for c in counters])
        now = self._now()
        result = []
        for spec in counters:
            counter = self._counter(spec.key, now, create=False)
            result.append(self._used(counter, spec.window))  # expired holds count as spent
        return result

    # ---- rate -----------------------------------------------------------------------------

    async def rate(self, items: Sequence[RateItem], *, force: bool = False) -> list[RateState]:
        if items:
            self._one_slot(hash_tag(items[0].key), (), items)
        now = self._now()
        states, writes, allowed = self._rate_eval(items, now)
        if force or allowed:
            self._rate_apply(items, writes, now)
        return states

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
        self._one_slot(hash_tag(record_key), holds, items)
        now = self._now()
        states, writes, allowed = self._rate_eval(items, now)
        if not allowed:
            return states, None
        result, counters = self._hold_eval(record_key, holds, now)
        if result.ok:
            self._rate_apply(items, writes, now)
            self._hold_apply(reservation, record_key, holds, counters, until, record_ttl, now)
        return states, result

    def _rate_eval(
        self, items: Sequence[RateItem], now: int
    ) -> tuple[list[RateState], list[float], bool]:
        """Each item's verdict, the state `_rate_apply` writes if it is applied, and
        whether every item allows."""
        states: list[RateState] = []
        writes: list[float] = []
        allowed = True
        for item in items:
            state, write = (
                self._gcra(item, now) if isinstance(item, Gcra) else self._quota(item, now)
            )
            states.append(state)
            writes.append(write)
            allowed = allowed and state.allowed
        return states, writes, allowed

    def _rate_apply(self, items: Sequence[RateItem], writes: Sequence[float], now: int) -> None:
        for item, new_tat in zip(items, writes, strict=True):
            if isinstance(item, Gcra):  # the TAT as the Lua's %.17g, kept while it matters
                expires = now + max(1, math.ceil(new_tat - now))
                self._put(item.key, format(new_tat, ".17g").encode(), expires)
            else:
                entry = self._entry(item.key, now)
                count = (0 if entry is None else int(entry.value)) + item.cost
                self._put(item.key, str(count).encode(), now + ttl_ms(item.resets_at, now))

    def _tat(self, item: Gcra, now: int) -> tuple[float, float, float]:
        """The emission interval (ms), the theoretical arrival time (ms, at least `now`)
        and the one after `item`'s cost."""
        t = item.period * 1000.0 / item.rate  # (= item.interval_ms, without a call)
        entry = self._entry(item.key, now)
        tat = max(float(entry.value) if entry is not None else float(now), now)
        return t, tat, max(tat + item.cost * t, now)

    def _gcra(self, item: Gcra, now: int) -> tuple[RateState, float]:
        t, tat, new_tat = self._tat(item, now)
        tau = item.burst * t
        allow_at = new_tat - tau
        if now >= allow_at:
            remaining = math.floor((now + tau - new_tat) / t)
            return RateState(True, remaining, 0.0, math.ceil(new_tat - now) / 1000), new_tat
        remaining = max(0, math.floor((now + tau - tat) / t))
        retry = math.ceil(allow_at - now) / 1000
        return RateState(False, remaining, retry, math.ceil(tat - now) / 1000), new_tat

    def _quota(self, item: Quota, now: int) -> tuple[RateState, float]:
        entry = self._entry(item.key, now)
        count = 0 if entry is None else int(entry.value)
        reset = ttl_ms(item.resets_at, now)
        if count + item.cost <= item.limit:
            return RateState(True, item.limit - count - item.cost, 0.0, reset / 1000), 0.0
        return RateState(False, max(0, item.limit - count), reset / 1000, reset / 1000), 0.0

    async def close(self) -> None:
        self._closed = True
        self._kv.clear()
        self._finished.clear()
        self._counters.clear()
