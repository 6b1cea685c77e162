"""The request path's store calls: one round trip each, and what survives a Redis restart.

Admit (rate limits + every budget hold) and settle (the holds + the token limits'
correction) are one EVALSHA each, counted with Redis' own INFO commandstats rather than
timed. The scripts and the KV calls (the cache's get/set/lock) run over
`extproc.store.pipe` (one pipelined connection, hiredis): these tests also cover what
that connection must survive: SCRIPT FLUSH under concurrent calls, a redis-server killed
and restarted mid-run, a hung one, AUTH and SELECT.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from extproc.apis.usage import Usage
from extproc.config import CacheConfig, CacheSettings, parse_config
from extproc.policies.auth import Identity
from extproc.policies.budget.spending import Spending
from extproc.policies.cache import CacheRun, ResponseCache, Shape
from extproc.store import (
    Counter,
    Gcra,
    Hold,
    ManualClock,
    Quota,
    SettleOutcome,
    StoreUnavailable,
)
from extproc.store.redis import RedisStore
from extproc.telemetry.metrics import Metrics
from tests.redis_server import RedisServer
from tests.store_fixtures import StoreHarness, flush, fresh_redis, harness, redis_server

__all__ = ["fresh_redis", "harness", "redis_server"]  # fixtures used by name below

T = "{t}"
LIMIT = {"requests_per_minute": 10**6, "tokens_per_minute": 10**9}
PROVIDERS = {
    "anthropic": {
        "api": "anthropic",
        "base_url": "https://api.anthropic.com",
        "credential": {"value": "sk-ant-test"},
    }
}
MODEL = "claude-haiku-4-5"
BODY = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


def counter(name: str = "c", limit: int = 10**6) -> Counter:
    return Counter(key=f"b:{T}:{name}", bucket="s", window=("s",), limit=limit)


def rec(rid: str) -> str:
    return f"b:{T}:res:{rid}"


def spending_on(store: RedisStore, limit: dict[str, int] = LIMIT) -> Spending:
    """Budgets on key, team and pipeline (USD and tokens) and rate limits on key and team."""
    config = parse_config(
        {
            "providers": PROVIDERS,
            "budgets": {
                "rules": [
                    {"scope": "key", "id": "*", "window": "daily", "usd": 1000, "tokens": 10**9},
                    {"scope": "team", "id": "*", "window": "monthly", "usd": 1000},
                    {"scope": "pipeline", "id": "*", "window": "daily", "tokens": 10**9},
                ]
            },
            "rate_limits": {"key": limit, "team": limit},
        }
    )
    return Spending(config, store, Metrics())


async def _request(spending: Spending, usage: Usage) -> None:
    identity = Identity(source="key", key_id="k1", team="ml")
    run = spending.start(uuid.uuid4().hex, MODEL, identity, {"x-ci-pipeline-id": "p1"}, None)
    await spending.admit(run, BODY, input_tokens=40)
    assert run.reservation is not None
    assert len(run.reservation.lines) == 4
    await spending.settle(run, usage)


async def _commandstats(url: str) -> dict[str, int]:
    client = Redis.from_url(url)
    try:
        stats: dict[str, dict[str, Any]] = await client.info("commandstats")
    finally:
        await client.aclose()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def _reset_stats(url: str) -> None:
    client = Redis.from_url(url)
    try:
        await client.config_resetstat()
    finally:
        await client.aclose()


async def test_admit_and_settle_are_one_evalsha_each(redis_server: RedisServer) -> None:
    await flush(redis_server.url)
    store = RedisStore.from_url(redis_server.url)
    spending = spending_on(store)
    try:
        await _request(spending, Usage(input_tokens=50, output_tokens=30))  # loads the scripts
        await _reset_stats(redis_server.url)
        for _ in range(10):  # usage differs from the estimate: the token limits are corrected
            await _request(spending, Usage(input_tokens=50, output_tokens=30))
        calls = await _commandstats(redis_server.url)
    finally:
        await store.close()
    # (commandstats also counts the commands the scripts run inside Redis: GET, HINCRBY...)
    assert calls["evalsha"] == 20  # one per admit, one per settle (the token correction in it)
    assert not {"eval", "script|load", "multi", "exec"} & calls.keys()


async def test_a_cache_miss_and_the_budget_calls_share_one_connection(
    fresh_redis: RedisServer,
) -> None:
    """Every call a cache miss and a budgeted request make (get, the lock's SET NX, SET
    with a TTL, compare-and-delete, the scripts), 20 requests at once, goes over the
    store's one pipelined connection: Redis sees one client besides the inspecting one."""
    store = RedisStore.from_url(fresh_redis.url, clock=ManualClock())
    spending = spending_on(store)

    async def miss(i: int) -> None:
        assert await store.get(f"entry{i}") is None
        assert await store.acquire_lock(f"lock{i}", "me", 5)
        await _request(spending, Usage(input_tokens=50, output_tokens=30))
        assert await store.set(f"entry{i}", b"answer", 60)
        assert await store.release_lock(f"lock{i}", "me")
        assert await store.wait_for(f"entry{i}", 1.0) == b"answer"

    try:
        await asyncio.gather(*(miss(i) for i in range(20)))
        client = Redis.from_url(fresh_redis.url)
        try:
            info = await client.info("clients")
        finally:
            await client.aclose()
        assert info["connected_clients"] == 2
    finally:
        await store.close()


async def test_a_cache_miss_is_three_round_trips_and_a_hit_one(redis_server: RedisServer) -> None:
    """A leading miss with hygiene: lookup + lock (one script), the hygiene record (one
    SET ... GET), the answer + the lock's release (one script). A hit: one script."""
    await flush(redis_server.url)
    store = RedisStore.from_url(redis_server.url)
    cache = ResponseCache(store, CacheSettings())
    sent: list[bytes] = []
    call = store._pipe.call

    async def counted(payload: bytes) -> Any:
        sent.append(payload)
        return await call(payload)

    store._pipe.call = counted  # type: ignore[method-assign]

    async def request(owner: str) -> CacheRun:
        run = CacheRun(cache, CacheConfig(enabled=True), "team=a", "k", owner, True, True)
        if await run.before_upstream(lambda: Shape.of("anthropic", BODY), _noop) is None:
            await run.after_upstream({"content": []}, "anthropic")
        return run

    async def _noop(seconds: float) -> None:
        return None

    try:
        await request("warm-up")  # loads the scripts
        await flush(redis_server.url)
        sent.clear()
        miss = await request("r1")
        assert (miss.result, miss.leader, miss.stored, len(sent)) == ("miss", True, True, 3)
        sent.clear()
        hit = await request("r2")
        assert (hit.result, len(sent)) == ("hit", 1)
        names = set(await store.scan("extproc:cache"))
        assert names == {"extproc:cache:team=a:k"} | {n for n in names if "cache-shape" in n}
        assert len(names) == 2  # the entry and the hygiene record; the lock is gone
    finally:
        await store.close()


async def test_settle_carries_the_token_correction(redis_server: RedisServer) -> None:
    """The settle's own script debits the token limits by actual - estimate, once."""
    await flush(redis_server.url)
    store = RedisStore.from_url(redis_server.url, clock=ManualClock())  # no refill meanwhile
    # 100 tokens/s: the limiter's keys expire in Redis' real time once their tokens would
    # have drained (the 140 admitted tokens: 1.4 s), so the numbers stay visible meanwhile
    spending = spending_on(store, {"requests_per_minute": 600, "tokens_per_minute": 6_000})
    try:
        identity = Identity(source="key", key_id="k1", team="ml")
        run = spending.start("r1", MODEL, identity, {}, None)
        await spending.admit(run, BODY, input_tokens=40)
        subject = spending.start("probe", MODEL, identity, {}, None).subject
        before = {s.name: s.remaining for s in (await spending.limiter.peek(subject)).limits}
        await spending.settle(run, Usage(input_tokens=40, output_tokens=5_000))
        after = {s.name: s.remaining for s in (await spending.limiter.peek(subject)).limits}
        extra = 40 + 5_000 - run.admitted_tokens
        for name in ("key.tokens_per_minute", "team.tokens_per_minute"):
            assert before[name] - after[name] == pytest.approx(extra, abs=1)  # GCRA floors
        await spending.settle(run, Usage(input_tokens=40, output_tokens=5_000))  # again
        again = {s.name: s.remaining for s in (await spending.limiter.peek(subject)).limits}
        assert again == after
    finally:
        await store.close()


async def test_settle_debits_rate_items_once(harness: StoreHarness) -> None:
    s, now = harness.store, harness.clock.time()
    c = counter()
    tok = Gcra(f"r:{T}:tok", rate=600, period=60, burst=600, cost=0)  # 10 tokens/s
    debit = Gcra(tok.key, tok.rate, tok.period, tok.burst, 1200)
    assert (await s.hold("r", rec("r"), [Hold(c, 5)], until=now + 60, record_ttl=60)).ok
    outcome = await s.settle("r", rec("r"), [Hold(c, 5)], [7], record_ttl=60, debit=[debit])
    assert outcome is SettleOutcome.SETTLED
    peek = (await s.rate([tok]))[0]
    assert not peek.allowed
    assert peek.retry_after == pytest.approx(60)
    again = await s.settle("r", rec("r"), [Hold(c, 5)], [7], record_ttl=60, debit=[debit])
    assert again is SettleOutcome.ALREADY_SETTLED
    assert (await s.rate([tok]))[0].retry_after == pytest.approx(60)  # not debited twice
    assert await s.usage([c]) == [7]


async def test_settle_debit_keys_must_share_the_hash_tag(harness: StoreHarness) -> None:
    other = Gcra("r:{elsewhere}:tok", 600, 60, 600, 10)
    with pytest.raises(ValueError, match="hash tag"):
        await harness.store.settle(
            "r", rec("r"), [Hold(counter(), 5)], [5], record_ttl=60, debit=[other]
        )


async def test_concurrent_calls_after_script_flush_reload_and_all_succeed(
    redis_server: RedisServer,
) -> None:
    await flush(redis_server.url)
    store = RedisStore.from_url(redis_server.url, clock=ManualClock())
    try:
        c = counter()
        assert (await store.hold("r0", rec("r0"), [Hold(c, 1)], until=2e9, record_ttl=60)).ok
        await store._client.script_flush()
        holds = [
            store.hold(f"r{i}", rec(f"r{i}"), [Hold(c, 1)], until=2e9, record_ttl=60)
            for i in range(1, 21)
        ]
        assert all(r.ok for r in await asyncio.gather(*holds))  # pipelined NOSCRIPTs
        assert await store.usage([c]) == [21]
    finally:
        await store.close()


async def test_redis_killed_and_restarted_mid_run(fresh_redis: RedisServer) -> None:
    """Requests in flight when Redis dies fail fast as StoreUnavailable (never hang), the
    gateway's calls fail fast while it is down, and the first call after the restart
    redials, reloads the scripts (NOSCRIPT) and succeeds."""
    store = RedisStore.from_url(fresh_redis.url, clock=ManualClock(), timeout_seconds=1.0)
    spending = spending_on(store)
    try:
        for _ in range(5):
            await _request(spending, Usage(input_tokens=50, output_tokens=30))
        c = counter()
        in_flight = [
            store.hold(f"x{i}", rec(f"x{i}"), [Hold(c, 1)], until=2e9, record_ttl=60)
            for i in range(50)
        ]
        started = time.monotonic()
        gathered = asyncio.gather(*in_flight, return_exceptions=True)
        fresh_redis.kill()
        results = await gathered
        assert all(
            r.ok if not isinstance(r, BaseException) else isinstance(r, StoreUnavailable)
            for r in results
        )
        with pytest.raises(StoreUnavailable):
            await store.rate([Gcra(f"r:{T}:g", 60, 60, 5, 1)])
        assert time.monotonic() - started < 1.5
        fresh_redis.start()  # same port, empty data and script cache
        for _ in range(5):
            await _request(spending, Usage(input_tokens=50, output_tokens=30))
        assert await store.usage([c]) == [0]
    finally:
        await store.close()


async def test_hung_redis_fails_waiting_scripts_then_recovers(fresh_redis: RedisServer) -> None:
    store = RedisStore.from_url(fresh_redis.url, clock=ManualClock(), timeout_seconds=0.3)
    try:
        assert await store.incr_by("n", 1) == 1
        fresh_redis.pause()
        started = time.monotonic()
        results = await asyncio.gather(
            *(store.incr_by("n", 1) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert time.monotonic() - started < 1.0
        fresh_redis.resume()
        value = await store.incr_by("n", 0)  # the 5 queued ones may have run after resuming
        for i in range(1, 21):  # a reply to a timed-out call never reaches a later call
            assert await store.incr_by("n", 1) == value + i
    finally:
        fresh_redis.resume()
        await store.close()


async def test_scripts_use_the_urls_password_and_database() -> None:
    with RedisServer(password="s3cret") as server:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        store = RedisStore.from_url(url, clock=ManualClock())
        try:
            assert (
                await store.hold("r", rec("r"), [Hold(counter(), 4)], until=2e9, record_ttl=60)
            ).ok
            client = Redis.from_url(url)
            try:
                assert await client.exists(rec("r")) == 1  # in database 3
            finally:
                await client.aclose()
        finally:
            await store.close()
        wrong = RedisStore.from_url(f"redis://:wrong@127.0.0.1:{server.port}/0")
        try:
            with pytest.raises(StoreUnavailable):
                await wrong.rate([Gcra(f"r:{T}:g", 60, 60, 5, 1)])
        finally:
            await wrong.close()


def test_a_store_used_from_a_new_event_loop_redials(redis_server: RedisServer) -> None:
    """The pipe's connection belongs to the loop that dialled it; a later `asyncio.run`
    (the CLI's commands run one each) dials its own instead of touching a dead loop."""
    store = RedisStore.from_url(redis_server.url, clock=ManualClock())
    first = asyncio.run(store.incr_by("loops", 1))
    assert asyncio.run(store.incr_by("loops", 1)) == first + 1
    asyncio.run(store.close())


async def test_counter_ttls_are_set_when_their_expiry_moves_not_on_every_call(
    redis_server: RedisServer,
) -> None:
    """A counter's keys expire with its window. The scripts re-set the TTLs only when the
    hash's `exp` field says they are not at the window's expiry yet (a new key, a rolling
    window's next day, a hash written before `exp` existed), plus the holds zset's when
    it comes back after its last hold went; not with two PEXPIREs per counter per call."""
    await flush(redis_server.url)
    clock = ManualClock()
    store = RedisStore.from_url(redis_server.url, clock=clock)
    client = Redis.from_url(redis_server.url)
    now = clock.time()
    c = Counter(key=f"b:{T}:day", bucket="s", window=("s",), limit=10**6, expires_at=now + 3600)
    try:
        await _reset_stats(redis_server.url)
        for i in range(3):
            assert (
                await store.hold(
                    f"r{i}", rec(f"r{i}"), [Hold(c, 5)], until=now + 60, record_ttl=600
                )
            ).ok
            assert 0 < await client.pttl(c.holds_key) <= 3_600_000
            assert (
                await store.settle(f"r{i}", rec(f"r{i}"), [Hold(c, 5)], [4], record_ttl=600)
                is SettleOutcome.SETTLED
            )
        calls = await _commandstats(redis_server.url)
        assert calls["pexpire"] == 2 + 1 + 1  # both keys once; the zset's when it came back
        assert 3_590_000 < await client.pttl(c.key) <= 3_600_000
        assert await client.hget(c.key, "exp") == str(int((now + 3600) * 1000)).encode()
        assert await store.usage([c]) == [12]

        later = Counter(c.key, "s", ("s",), 10**6, expires_at=now + 7200)  # the next day
        assert (
            await store.hold("r3", rec("r3"), [Hold(later, 5)], until=now + 60, record_ttl=600)
        ).ok
        assert 7_190_000 < await client.pttl(c.key) <= 7_200_000
        assert 7_190_000 < await client.pttl(c.holds_key) <= 7_200_000
    finally:
        await client.aclose()
        await store.close()


async def test_counters_written_before_exp_existed_get_their_ttls(
    redis_server: RedisServer,
) -> None:
    """Migration: a hash from before the `exp` field (its TTL set by every call then) gets
    its TTLs and `exp` from the first hold or settle that touches it."""
    await flush(redis_server.url)
    clock = ManualClock()
    store = RedisStore.from_url(redis_server.url, clock=clock)
    client = Redis.from_url(redis_server.url)
    now = clock.time()
    c = Counter(key=f"b:{T}:old", bucket="s", window=("s",), limit=100, expires_at=now + 3600)
    try:
        await client.hset(c.key, mapping={"held": "0", "s": "40"})
        await client.pexpire(c.key, 60_000)
        assert (await store.hold("r", rec("r"), [Hold(c, 60)], until=now + 60, record_ttl=600)).ok
        assert 3_590_000 < await client.pttl(c.key) <= 3_600_000
        assert not (
            await store.hold("x", rec("x"), [Hold(c, 1)], until=now + 60, record_ttl=600)
        ).ok
        await client.hdel(c.key, "exp")
        await client.pexpire(c.key, 60_000)
        assert (
            await store.settle("r", rec("r"), [Hold(c, 60)], [50], record_ttl=600)
            is SettleOutcome.SETTLED
        )
        assert 3_590_000 < await client.pttl(c.key) <= 3_600_000
        assert await store.usage([c]) == [90]
    finally:
        await client.aclose()
        await store.close()


async def test_a_settle_never_leaves_a_counter_without_a_ttl(redis_server: RedisServer) -> None:
    """A settle with no record (UNKNOWN) on a counter that is gone creates nothing when
    there is nothing to charge, and a counter with its TTL when there is; a lifetime
    counter has neither TTL nor `exp`."""
    await flush(redis_server.url)
    clock = ManualClock()
    store = RedisStore.from_url(redis_server.url, clock=clock)
    client = Redis.from_url(redis_server.url)
    now = clock.time()
    gone = Counter(key=f"b:{T}:gone", bucket="s", window=("s",), limit=100, expires_at=now + 60)
    life = Counter(key=f"b:{T}:life", bucket="s", window=("s",), limit=100)
    try:
        nothing = await store.settle("a", rec("a"), [Hold(gone, 5)], [0], record_ttl=600)
        assert nothing is SettleOutcome.UNKNOWN
        assert await client.exists(gone.key, gone.holds_key) == 0
        assert (
            await store.settle("b", rec("b"), [Hold(gone, 5)], [7], record_ttl=600)
            is SettleOutcome.UNKNOWN
        )
        assert 50_000 < await client.pttl(gone.key) <= 60_000
        assert (await store.hold("c", rec("c"), [Hold(life, 5)], until=now + 60, record_ttl=600)).ok
        assert await client.pttl(life.key) == -1
        assert await client.pttl(life.holds_key) == -1
        assert await client.hget(life.key, "exp") is None
    finally:
        await client.aclose()
        await store.close()


async def test_quota_counts_stay_exact_integers_when_large(harness: StoreHarness) -> None:
    """The scripts write a quota's cost and reset as integers (a number handed to
    redis.call as it is would be written with %.17g: 1e+17, not an integer to INCRBY)."""
    now = harness.clock.time()
    q = Quota(f"r:{T}:big", limit=10**18, cost=10**17, resets_at=now + 3600)
    first = await harness.store.rate([q])
    second = await harness.store.rate([q])
    assert [s.remaining for s in first + second] == [9 * 10**17, 8 * 10**17]
    assert first[0].reset_after == pytest.approx(3600)


async def test_limits_beyond_64_bits_are_accepted(harness: StoreHarness) -> None:
    """A budget or a burst set absurdly high (past 2^63) still works: the spec carries
    it as the double the script compares with anyway."""
    s, now = harness.store, harness.clock.time()
    c = counter("huge", limit=10**20)
    assert (await s.hold("r", rec("r"), [Hold(c, 5)], until=now + 60, record_ttl=60)).ok
    g = Gcra(f"r:{T}:huge", rate=10**20, period=60, burst=10**20, cost=10**19 * 5)
    assert (await s.rate([g]))[0].allowed
