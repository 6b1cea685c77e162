"""One contract for every store: the same tests run against memory and a real Redis.

The `harness` fixture is parametrized over both backends. A differential test
replays one random workload on both and demands identical answers; the tests at
the end are Redis-only (script cache loss, outages by kill -9 and SIGSTOP).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from extproc.slots import slot_init
from extproc.store import (
    Counter,
    Gcra,
    Hold,
    HoldResult,
    ManualClock,
    Quota,
    RateItem,
    RateState,
    SettleOutcome,
    Store,
    StoreConfigError,
    StoreDataError,
    StoreUnavailable,
    hash_tag,
    open_store,
)
from extproc.store.memory import SWEEP_EVERY, MemoryStore
from extproc.store.redis import RedisStore
from tests.redis_server import RedisServer
from tests.store_fixtures import StoreHarness, flush, fresh_redis, harness, redis_server

__all__ = ["fresh_redis", "harness", "redis_server"]  # fixtures used by name below

T = "{t}"


def counter(name: str = "c", limit: int = 100, **kw: Any) -> Counter:
    return Counter(key=f"b:{T}:{name}", bucket="s", window=("s",), limit=limit, **kw)


def rec(rid: str) -> str:
    return f"b:{T}:res:{rid}"


# ---- KV -----------------------------------------------------------------------------------


async def test_get_set_roundtrip_binary(harness: StoreHarness) -> None:
    s = harness.store
    value = bytes(range(256))
    assert await s.get("k") is None
    assert await s.set("k", value) is True
    assert await s.get("k") == value
    assert await s.set("k", b"") is True
    assert await s.get("k") == b""


async def test_set_only_if_absent(harness: StoreHarness) -> None:
    s = harness.store
    assert await s.set("k", b"1", only_if_absent=True) is True
    assert await s.set("k", b"2", only_if_absent=True) is False
    assert await s.get("k") == b"1"


async def test_set_ttl_expires(harness: StoreHarness) -> None:
    s = harness.store
    await s.set("k", b"v", ttl_seconds=0.2)
    await s.set("forever", b"v")
    assert await s.get("k") == b"v"
    await harness.advance(0.35)
    assert await s.get("k") is None
    assert await s.get("forever") == b"v"
    assert await s.set("k", b"again", ttl_seconds=5, only_if_absent=True) is True


@pytest.mark.parametrize("ttl", [0, -1.0])
async def test_set_rejects_non_positive_ttl(harness: StoreHarness, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        await harness.store.set("k", b"v", ttl_seconds=ttl)


async def test_delete(harness: StoreHarness) -> None:
    s = harness.store
    await s.set("k", b"v")
    assert await s.delete("k") is True
    assert await s.delete("k") is False
    assert await s.get("k") is None


async def test_scan_prefix_sorted_bounded_and_literal(harness: StoreHarness) -> None:
    s = harness.store
    for key in ["a*b:2", "a*b:1", "axb:3", "other", "a*b:3"]:
        await s.set(key, b"1")
    assert await s.scan("a*b:") == ["a*b:1", "a*b:2", "a*b:3"]
    assert len(await s.scan("a*b:", limit=2)) == 2
    assert await s.scan("nothing") == []


async def test_incr_by_counts_and_sets_ttl_once(harness: StoreHarness) -> None:
    s = harness.store
    assert await s.incr_by("n", 5, ttl_seconds=0.3) == 5
    assert await s.incr_by("n", -2, ttl_seconds=100) == 3  # existing TTL is kept
    assert await s.get("n") == b"3"
    await harness.advance(0.45)
    assert await s.get("n") is None
    assert await s.incr_by("m", 1) == 1


async def test_incr_by_non_integer_is_data_error(harness: StoreHarness) -> None:
    await harness.store.set("k", b"not a number")
    with pytest.raises(StoreDataError):
        await harness.store.incr_by("k", 1)


async def test_locks_only_owner_releases(harness: StoreHarness) -> None:
    s = harness.store
    assert await s.acquire_lock("lock", "a", 5) is True
    assert await s.acquire_lock("lock", "b", 5) is False
    assert await s.release_lock("lock", "b") is False
    assert await s.get("lock") == b"a"
    assert await s.release_lock("lock", "a") is True
    assert await s.release_lock("lock", "a") is False
    assert await s.acquire_lock("lock", "b", 5) is True


async def test_lock_expires(harness: StoreHarness) -> None:
    s = harness.store
    assert await s.acquire_lock("lock", "a", 0.2) is True
    await harness.advance(0.35)
    assert await s.acquire_lock("lock", "b", 5) is True
    assert await s.release_lock("lock", "a") is False


async def test_get_or_lock_takes_the_lock_only_on_a_miss(harness: StoreHarness) -> None:
    s, lock = harness.store, "lock:{v}"
    assert await s.get_or_lock("v", lock, "a", 5) == (None, True)
    assert await s.get(lock) == b"a"
    assert await s.get_or_lock("v", lock, "b", 5) == (None, False)  # a's lock stands
    await s.set("v", b"answer", 10)
    assert await s.release_lock(lock, "a") is True
    assert await s.get_or_lock("v", lock, "b", 5) == (b"answer", False)
    assert await s.get(lock) is None  # a hit takes no lock


async def test_get_or_lock_lock_expires(harness: StoreHarness) -> None:
    s, lock = harness.store, "lock:{v}"
    assert await s.get_or_lock("v", lock, "a", 0.2) == (None, True)
    await harness.advance(0.35)
    assert await s.get_or_lock("v", lock, "b", 5) == (None, True)
    assert await s.release_lock(lock, "a") is False


async def test_set_and_release_writes_then_frees_the_owners_lock(harness: StoreHarness) -> None:
    s, lock = harness.store, "lock:{v}"
    assert await s.acquire_lock(lock, "a", 5)
    assert await s.set_and_release("v", b"one", 0.2, lock, "b") is False  # not b's lock
    assert await s.get("v") == b"one"
    assert await s.get(lock) == b"a"
    assert await s.set_and_release("v", b"two", 0.2, lock, "a") is True
    assert await s.get("v") == b"two"
    assert await s.get(lock) is None
    await harness.advance(0.35)
    assert await s.get("v") is None  # the value's TTL holds


async def test_swap_returns_the_replaced_value(harness: StoreHarness) -> None:
    s = harness.store
    assert await s.swap("k", b"one", 0.2) is None
    assert await s.swap("k", bytes(range(256)), 0.2) == b"one"
    assert await s.get("k") == bytes(range(256))
    await harness.advance(0.35)
    assert await s.get("k") is None


async def test_compound_calls_check_slots_and_ttls(harness: StoreHarness) -> None:
    s = harness.store
    with pytest.raises(ValueError, match="hash tag"):
        await s.get_or_lock("v", "lock:v", "a", 5)
    with pytest.raises(ValueError, match="hash tag"):
        await s.set_and_release("v", b"x", 5, "lock:v", "a")
    with pytest.raises(ValueError, match="ttl_seconds"):
        await s.swap("k", b"x", 0)


async def test_wait_for_sees_a_later_set(harness: StoreHarness) -> None:
    s = harness.store

    async def later() -> None:
        await asyncio.sleep(0.05)
        await s.set("result", b"done")

    task = asyncio.create_task(later())
    started = time.monotonic()
    assert await s.wait_for("result", 2.0) == b"done"
    assert time.monotonic() - started < 1.0
    await task
    assert await s.wait_for("result", 0.01) == b"done"


async def test_wait_for_wakes_every_waiter(harness: StoreHarness) -> None:
    s = harness.store
    waiters = [asyncio.create_task(s.wait_for("flight", 2.0)) for _ in range(5)]
    await asyncio.sleep(0.02)
    await s.set("flight", b"answer")
    assert await asyncio.gather(*waiters) == [b"answer"] * 5


async def test_memory_wait_for_leaves_nothing_behind() -> None:
    store = MemoryStore(clock=ManualClock())
    assert await store.wait_for("never", 0.01) is None
    assert store._waiters == {}


async def test_wait_for_times_out(harness: StoreHarness) -> None:
    started = time.monotonic()
    assert await harness.store.wait_for("never", 0.15) is None
    assert 0.1 <= time.monotonic() - started < 1.0


async def test_closed_store_is_unavailable(harness: StoreHarness) -> None:
    await harness.store.close()
    with pytest.raises(StoreUnavailable):
        await harness.store.get("k")


# ---- budget primitives --------------------------------------------------------------------


async def test_hold_admits_until_limit(harness: StoreHarness) -> None:
    s, now = harness.store, harness.clock.time()
    c = counter(limit=100)
    r1 = await s.hold("r1", rec("r1"), [Hold(c, 60)], until=now + 60, record_ttl=600)
    assert r1.ok
    assert r1.used == (0,)
    r2 = await s.hold("r2", rec("r2"), [Hold(c, 41)], until=now + 60, record_ttl=600)
    assert not r2.ok
    assert r2.failed == 0
    assert r2.used == (60,)
    r3 = await s.hold("r3", rec("r3"), [Hold(c, 40)], until=now + 60, record_ttl=600)
    assert r3.ok
    assert r3.used == (60,)
    r4 = await s.hold("r4", rec("r4"), [Hold(c, 0)], until=now + 60, record_ttl=600)
    assert not r4.ok  # a spent budget refuses even a zero estimate
    assert await s.usage([c]) == [100]


async def test_hold_is_all_or_nothing(harness: StoreHarness) -> None:
    s, now = harness.store, harness.clock.time()
    a, b = counter("a", limit=100), counter("b", limit=10)
    result = await s.hold("r", rec("r"), [Hold(a, 50), Hold(b, 11)], until=now + 60, record_ttl=60)
    assert not result.ok
    assert result.failed == 1
    assert result.used == (0, 0)
    assert await s.usage([a, b]) == [0, 0]
    assert await s.get(rec("r")) is None


async def test_duplicate_reservation_changes_nothing(harness: StoreHarness) -> None:
    s, now = harness.store, harness.clock.time()
    c = counter()
    assert (await s.hold("r", rec("r"), [Hold(c, 10)], until=now + 60, record_ttl=60)).ok
    again = await s.hold("r", rec("r"), [Hold(c, 10)], until=now + 60, record_ttl=60)
    assert again.duplicate
    assert not again.ok
    assert await s.usage([c]) == [10]


async def test_expired_hold_counts_as_spent_at_its_estimate(harness: StoreHarness) -> None:
    """A replica that died holding budget never settles: what the provider generated for it
    is unknown, so the hold's estimate (an upper bound) is charged, not forgotten."""
    s, now = harness.store, harness.clock.time()
    c = counter(limit=150)
    assert (await s.hold("r1", rec("r1"), [Hold(c, 100)], until=now + 30, record_ttl=600)).ok
    harness.clock.advance(29.9)
    assert await s.usage([c]) == [100]
    harness.clock.advance(0.1)  # expiry is inclusive: at `until` the hold is spent
    assert await s.usage([c]) == [100]
    refused = await s.hold("r2", rec("r2"), [Hold(c, 60)], until=now + 90, record_ttl=600)
    assert not refused.ok
    assert refused.used == (100,)
    assert (await s.hold("r3", rec("r3"), [Hold(c, 50)], until=now + 90, record_ttl=600)).ok
    assert await s.usage([c]) == [150]


async def test_release_after_expiry_refunds_the_charged_estimate(harness: StoreHarness) -> None:
    s, now = harness.store, harness.clock.time()
    c = counter(limit=100)
    holds = [Hold(c, 40)]
    await s.hold("r", rec("r"), holds, until=now + 10, record_ttl=600)
    harness.clock.advance(11)
    await s.hold("x", rec("x"), [Hold(c, 1)], until=now + 60, record_ttl=600)  # purges r
    assert await s.usage([c]) == [41]
    released = await s.settle("r", rec("r"), holds, [0], record_ttl=600, release=True)
    assert released is SettleOutcome.SETTLED
    assert await s.usage([c]) == [1]


async def test_expiry_bookkeeping_survives_out_of_order_settles(harness: StoreHarness) -> None:
    s, now = harness.store, harness.clock.time()
    c = counter(limit=100)
    a, b = [Hold(c, 10)], [Hold(c, 20)]
    await s.hold("a", rec("a"), a, until=now + 30, record_ttl=600)
    await s.hold("b", rec("b"), b, until=now + 90, record_ttl=600)
    await s.settle("a", rec("a"), a, [10], record_ttl=600)  # the earliest hold leaves first
    harness.clock.advance(31)
    assert (await s.hold("c", rec("c"), [Hold(c, 1)], until=now + 200, record_ttl=600)).used == (
        30,
    )
    harness.clock.advance(60)  # b expired (charged at its 20); c still held
    assert (await s.hold("d", rec("d"), [Hold(c, 1)], until=now + 200, record_ttl=600)).used == (
        31,
    )
    assert await s.usage([c]) == [32]


async def test_settle_replaces_hold_and_is_idempotent(harness: StoreHarness) -> None:
    s, now = harness.store, harness.clock.time()
    c = counter(limit=100)
    holds = [Hold(c, 30)]
    await s.hold("r", rec("r"), holds, until=now + 60, record_ttl=600)
    assert await s.settle("r", rec("r"), holds, [45], record_ttl=600) is SettleOutcome.SETTLED
    assert await s.usage([c]) == [45]
    again = await s.settle("r", rec("r"), holds, [45], record_ttl=600)
    assert again is SettleOutcome.ALREADY_SETTLED
    late = await s.settle("r", rec("r"), holds, [0], record_ttl=600, release=True)
    assert late is SettleOutcome.ALREADY_SETTLED
    assert await s.usage([c]) == [45]


async def test_release_then_settle_changes_nothing(harness: StoreHarness) -> None:
    s, now = harness.store, harness.clock.time()
    c = counter(limit=100)
    holds = [Hold(c, 30)]
    await s.hold("r", rec("r"), holds, until=now + 60, record_ttl=600)
    released = await s.settle("r", rec("r"), holds, [0], record_ttl=600, release=True)
    assert released is SettleOutcome.SETTLED
    assert await s.usage([c]) == [0]
    after = await s.settle("r", rec("r"), holds, [30], record_ttl=600)
    assert after is SettleOutcome.ALREADY_RELEASED
    assert await s.usage([c]) == [0]


async def test_settle_after_hold_expired_still_records_spend(harness: StoreHarness) -> None:
    s, now = harness.store, harness.clock.time()
    c = counter(limit=100)
    holds = [Hold(c, 30)]
    await s.hold("r", rec("r"), holds, until=now + 10, record_ttl=600)
    harness.clock.advance(11)
    assert await s.settle("r", rec("r"), holds, [25], record_ttl=600) is SettleOutcome.SETTLED
    assert await s.usage([c]) == [25]  # the expired hold's charge is corrected, not doubled


async def test_settle_without_record_records_spend(harness: StoreHarness) -> None:
    s = harness.store
    c = counter(limit=100)
    outcome = await s.settle("ghost", rec("ghost"), [Hold(c, 5)], [7], record_ttl=60)
    assert outcome is SettleOutcome.UNKNOWN
    assert await s.usage([c]) == [7]


async def test_rolling_buckets_sum_and_prune(harness: StoreHarness) -> None:
    s = harness.store
    base = "b:{t}:roll"
    day1 = Counter(base, "s:20250101", ("s:20250101",), 1000)
    await s.settle("r1", rec("r1"), [Hold(day1, 0)], [100], record_ttl=60)
    day3 = Counter(base, "s:20250103", ("s:20250103", "s:20250102", "s:20250101"), 1000)
    await s.settle("r2", rec("r2"), [Hold(day3, 0)], [50], record_ttl=60)
    assert await s.usage([day3]) == [150]
    day4 = Counter(
        base, "s:20250104", ("s:20250104", "s:20250103", "s:20250102"), 1000, None, "s:20250102"
    )
    assert await s.usage([day4]) == [50]
    await s.settle("r3", rec("r3"), [Hold(day4, 0)], [1], record_ttl=60)
    assert await s.usage([day3]) == [50]  # the 20250101 field was pruned


async def test_counters_must_share_a_hash_tag(harness: StoreHarness) -> None:
    bad = Counter("b:{other}:c", "s", ("s",), 10)
    with pytest.raises(ValueError, match="hash tag"):
        await harness.store.hold("r", rec("r"), [Hold(bad, 1)], until=1e10, record_ttl=60)
    with pytest.raises(ValueError, match="hash tag"):
        await harness.store.rate([Gcra("r:{a}:x", 1, 60, 1, 1), Gcra("r:{b}:x", 1, 60, 1, 1)])


def test_hash_tag() -> None:
    assert hash_tag("gw:b:{budget}:team:x") == "budget"
    assert hash_tag("no-tag") == "no-tag"
    assert hash_tag("a:{}:{b}") == "a:{}:{b}"  # an empty first tag means no tag (Redis rule)


# ---- rate primitives ----------------------------------------------------------------------


async def test_gcra_burst_then_paced(harness: StoreHarness) -> None:
    s = harness.store
    g = Gcra(f"r:{T}:g", rate=60, period=60, burst=3, cost=1)  # one per second, burst 3
    states = [(await s.rate([g]))[0] for _ in range(4)]
    assert [st.allowed for st in states] == [True, True, True, False]
    assert [st.remaining for st in states] == [2, 1, 0, 0]
    assert states[3].retry_after == pytest.approx(1.0)
    harness.clock.advance(1.0)
    assert (await s.rate([g]))[0].allowed
    assert not (await s.rate([g]))[0].allowed


async def test_rate_is_all_or_nothing_unless_forced(harness: StoreHarness) -> None:
    s, now = harness.store, harness.clock.time()
    g = Gcra(f"r:{T}:g", rate=10, period=60, burst=10, cost=1)
    q = Quota(f"r:{T}:q", limit=0, cost=1, resets_at=now + 3600)
    denied = await s.rate([g, q])
    assert [x.allowed for x in denied] == [True, False]
    assert denied[1].retry_after == pytest.approx(3600)
    assert (await s.rate([g]))[0].remaining == 9  # the refused call consumed nothing
    forced = await s.rate([g, q], force=True)
    assert not forced[1].allowed
    assert await s.get(q.key) == b"1"
    assert (await s.rate([g]))[0].remaining == 7


async def test_quota_counts_until_reset(harness: StoreHarness) -> None:
    s, now = harness.store, harness.clock.time()
    q = Quota(f"r:{T}:q:day1", limit=2, cost=1, resets_at=now + 100)
    results = [(await s.rate([q]))[0] for _ in range(3)]
    assert [(r.allowed, r.remaining) for r in results] == [(True, 1), (True, 0), (False, 0)]
    assert results[2].retry_after == pytest.approx(100)


async def test_gcra_force_debt_and_refund(harness: StoreHarness) -> None:
    s = harness.store
    tok = Gcra(f"r:{T}:tok", rate=600, period=60, burst=600, cost=0)  # 10 tokens/s
    debit = Gcra(tok.key, tok.rate, tok.period, tok.burst, 1200)
    await s.rate([debit], force=True)  # 600 over the burst: 60 s of debt
    peek = (await s.rate([tok]))[0]
    assert not peek.allowed
    assert peek.retry_after == pytest.approx(60)
    refund = Gcra(tok.key, tok.rate, tok.period, tok.burst, -700)
    await s.rate([refund], force=True)
    assert (await s.rate([tok]))[0].allowed
    big_refund = Gcra(tok.key, tok.rate, tok.period, tok.burst, -10_000)
    await s.rate([big_refund], force=True)  # never below empty
    assert (await s.rate([tok]))[0].remaining == 600


async def test_admit_is_all_or_nothing(harness: StoreHarness) -> None:
    s, now = harness.store, harness.clock.time()
    c = counter(limit=100)
    g = Gcra(f"r:{T}:g", rate=60, period=60, burst=2, cost=1)

    async def admit(rid: str, amount: int) -> tuple[list[bool], bool | None]:
        states, held = await s.admit(
            [g], rid, rec(rid), [Hold(c, amount)], until=now + 60, record_ttl=60
        )
        return [x.allowed for x in states], None if held is None else held.ok

    assert await admit("r1", 150) == ([True], False)  # budget refuses ...
    assert (await s.rate([Gcra(g.key, 60, 60, 2, 0)]))[0].remaining == 2  # ... rate untouched
    assert await admit("r2", 60) == ([True], True)
    assert await admit("r3", 10) == ([True], True)
    assert await admit("r4", 10) == ([False], None)  # rate refuses: nothing held
    assert await s.usage([c]) == [70]
    assert await s.get(rec("r4")) is None


# ---- differential: one workload, both backends, identical answers -------------------------


def _random_op(rng: random.Random, now: float) -> tuple[str, Callable[[Store], Awaitable[Any]]]:
    counters = [counter(f"c{i}", limit=rng.choice([50, 100, 1000])) for i in range(3)]
    kind = rng.choice(["hold", "settle", "release", "usage", "gcra", "quota", "incr", "admit"])
    rid = f"r{rng.randrange(12)}"
    holds = [Hold(c, rng.randrange(0, 60)) for c in rng.sample(counters, rng.randint(1, 3))]
    holds.sort(key=lambda h: h.counter.key)
    actuals = [rng.randrange(0, 90) for _ in holds]
    gcra_key = f"r:{T}:g{rng.randrange(2)}"
    rate, burst, cost = rng.choice([6, 60, 600]), rng.choice([1, 5]), rng.randrange(-2, 4)
    items: list[RateItem] = [
        Gcra(gcra_key, rate, 60, burst, cost),
        Quota(f"r:{T}:q", 5, rng.randrange(0, 3), now + 500),
    ]
    until = now + rng.choice([1, 5, 30])
    force = rng.random() < 0.3
    step = rng.randrange(-5, 5)
    zeros = [0] * len(holds)
    ops: dict[str, Callable[[Store], Awaitable[Any]]] = {
        "hold": lambda s: s.hold(rid, rec(rid), holds, until=until, record_ttl=3600),
        "settle": lambda s: s.settle(rid, rec(rid), holds, actuals, record_ttl=3600),
        "release": lambda s: s.settle(rid, rec(rid), holds, zeros, record_ttl=3600, release=True),
        "usage": lambda s: s.usage(counters),
        "gcra": lambda s: s.rate(items[:1], force=force),
        "quota": lambda s: s.rate(items, force=force),
        "incr": lambda s: s.incr_by("n", step),
        "admit": lambda s: s.admit(items, rid, rec(rid), holds, until=until, record_ttl=3600),
    }
    return kind, ops[kind]


async def test_memory_and_redis_agree_on_a_random_workload(redis_server: RedisServer) -> None:
    await flush(redis_server.url)
    mem_clock, red_clock = ManualClock(), ManualClock()
    memory = MemoryStore(clock=mem_clock)
    redis = RedisStore.from_url(redis_server.url, clock=red_clock)
    rng = random.Random(20250615)
    try:
        for step in range(600):
            kind, op = _random_op(rng, mem_clock.time())
            assert await op(memory) == await op(redis), f"step {step}: {kind}"
            tick = rng.choice([0, 0, 0.001, 0.25, 1, 3])
            mem_clock.advance(tick)
            red_clock.advance(tick)
    finally:
        await redis.close()


# ---- factory ------------------------------------------------------------------------------


async def test_open_store_by_url() -> None:
    memory = open_store("memory://")
    assert isinstance(memory, MemoryStore)
    for url in [
        "redis://127.0.0.1:1/0",
        "rediss://example.invalid:6380",
        "unix:///tmp/r.sock?db=1",
    ]:
        store = open_store(url)
        assert isinstance(store, RedisStore)
        await store.close()
    with pytest.raises(StoreConfigError, match="memory://"):
        open_store("http://localhost")
    with pytest.raises(StoreConfigError):
        open_store("redis://localhost/0?socket_timeout=notanumber")


# ---- Redis only: script cache loss and outages --------------------------------------------


async def test_scripts_reload_after_script_flush(redis_server: RedisServer) -> None:
    await flush(redis_server.url)
    store = RedisStore.from_url(redis_server.url, clock=ManualClock())
    try:
        c = counter()
        assert (await store.hold("r1", rec("r1"), [Hold(c, 1)], until=2e9, record_ttl=60)).ok
        await store._client.script_flush()
        assert (await store.hold("r2", rec("r2"), [Hold(c, 1)], until=2e9, record_ttl=60)).ok
    finally:
        await store.close()


def _every_method(store: Store) -> list[Callable[[], Awaitable[Any]]]:
    c = counter()
    g = Gcra(f"r:{T}:g", 60, 60, 5, 1)
    return [
        store.ping,
        lambda: store.get("k"),
        lambda: store.set("k", b"v", 10),
        lambda: store.delete("k"),
        lambda: store.scan("k"),
        lambda: store.incr_by("n", 1, 10),
        lambda: store.acquire_lock("l", "me", 5),
        lambda: store.release_lock("l", "me"),
        lambda: store.get_or_lock("k", "l:{k}", "me", 5),
        lambda: store.swap("k", b"v", 10),
        lambda: store.set_and_release("k", b"v", 10, "l:{k}", "me"),
        lambda: store.wait_for("k", 5.0),
        lambda: store.hold("r", rec("r"), [Hold(c, 1)], until=2e9, record_ttl=60),
        lambda: store.settle("r", rec("r"), [Hold(c, 1)], [1], record_ttl=60),
        lambda: store.usage([c]),
        lambda: store.rate([g]),
        lambda: store.admit([g], "r", rec("r"), [Hold(c, 1)], until=2e9, record_ttl=60),
    ]


async def _assert_all_unavailable(store: Store, bound: float) -> None:
    for call in _every_method(store):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await call()
        assert time.monotonic() - started < bound


async def test_killed_redis_fails_fast_then_recovers(fresh_redis: RedisServer) -> None:
    store = RedisStore.from_url(fresh_redis.url, clock=ManualClock(), timeout_seconds=1.0)
    try:
        await store.set("k", b"before")
        fresh_redis.kill()
        await _assert_all_unavailable(store, bound=1.5)
        fresh_redis.start()  # same port, empty data, empty script cache
        assert await store.get("k") is None  # the very first call reconnects
        c = counter()
        assert (await store.hold("r", rec("r"), [Hold(c, 5)], until=2e9, record_ttl=60)).ok
        assert await store.usage([c]) == [5]
    finally:
        await store.close()


async def test_hung_redis_times_out_then_recovers_without_mixing_replies(
    fresh_redis: RedisServer,
) -> None:
    store = RedisStore.from_url(fresh_redis.url, clock=ManualClock(), timeout_seconds=0.3)
    try:
        await store.set("a", b"A")
        await store.set("b", b"B")
        fresh_redis.pause()
        started = time.monotonic()
        results = await asyncio.gather(*(store.get("a") for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert time.monotonic() - started < 1.0
        fresh_redis.resume()
        for _ in range(20):  # a reply to a timed-out call must never reach a later call
            assert await store.get("b") == b"B"
            assert await store.get("a") == b"A"
    finally:
        fresh_redis.resume()
        await store.close()


async def test_memory_store_keeps_a_bounded_number_of_finished_records() -> None:
    """~250 B per request for an hour is unbounded under load: only the newest finished
    reservation records stay (issue 11, Memory); the newest still dedupe a late settle."""
    store = MemoryStore(finished_records=100)
    c = counter(limit=10**9)
    now = store.clock.time()
    for i in range(1_000):
        await store.hold(f"r{i}", rec(f"r{i}"), [Hold(c, 5)], until=now + 60, record_ttl=600)
        await store.settle(f"r{i}", rec(f"r{i}"), [Hold(c, 5)], [3], record_ttl=600)
    assert len(await store.scan(rec(""), limit=10_000)) == 100
    again = await store.settle("r999", rec("r999"), [Hold(c, 5)], [3], record_ttl=600)
    assert again is SettleOutcome.ALREADY_SETTLED
    assert await store.usage([c]) == [3_000]


async def test_memory_sweep_drops_only_what_expired() -> None:
    """The sweep pops expiries from a heap instead of scanning every key (a full scan of
    100,000 keys stalls the event loop ~36 ms); a key rewritten with a later expiry keeps
    its value although its first expiry is due, and stale heap items are rebuilt away."""
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    for i in range(3 * SWEEP_EVERY):
        await store.set(f"short{i}", b"x", ttl_seconds=1)
    await store.set("kept", b"old", ttl_seconds=1)
    await store.set("kept", b"new", ttl_seconds=100)
    await store.set("forever", b"y")
    clock.advance(2)
    for i in range(SWEEP_EVERY):  # enough writes to run the sweep
        await store.set(f"long{i}", b"z", ttl_seconds=100)
    assert not any(k.startswith("short") for k in store._kv)
    assert store._kv["kept"].value == b"new"
    assert "forever" in store._kv
    assert len(store._expiries) <= 2 * len(store._kv) + SWEEP_EVERY
    clock.advance(200)
    for i in range(SWEEP_EVERY):
        await store.set(f"late{i}", b"w", ttl_seconds=1000)
    assert sorted(k for k in store._kv if not k.startswith("late")) == ["forever"]


def test_slot_init_keeps_values_frozen_and_equal() -> None:
    """`slot_init` only speeds up construction: defaults, keywords, __post_init__,
    equality, hashing and frozenness are the dataclass's own."""
    import dataclasses

    from extproc.policies.budget.ledger import Amount

    state = RateState(True, 3, 0.0, 1.5)
    assert state == RateState(allowed=True, remaining=3, retry_after=0.0, reset_after=1.5)
    assert hash(state) == hash(RateState(True, 3, 0.0, 1.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.allowed = False  # type: ignore[misc]
    assert HoldResult(ok=True) == HoldResult(True, (), None, False)
    with pytest.raises(ValueError, match="never negative"):
        Amount(-1)  # __post_init__ still runs

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        x: int

    with pytest.raises(TypeError, match="slots=True"):
        slot_init(NoSlots)
