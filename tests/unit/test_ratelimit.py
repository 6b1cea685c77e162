"""Rate limits (GCRA per minute), tiered daily quotas, on both stores."""

from __future__ import annotations

import asyncio
import calendar
import math
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from extproc.policies.budget import (
    Amount,
    BudgetConfig,
    BudgetLedger,
    Denied,
    Reservation,
    Scope,
)
from extproc.policies.ratelimit import (
    LimitState,
    RateDecision,
    RateLimitConfig,
    RateLimiter,
    RateSubject,
    UnknownTier,
)
from extproc.store import Gcra, ManualClock, StoreUnavailable
from extproc.store.memory import MemoryStore
from tests.store_fixtures import StoreHarness, harness, redis_server

__all__ = ["harness", "redis_server"]  # fixtures used by name below

ALICE = RateSubject("alice", team_id="research")
BOB = RateSubject("bob", team_id="research")


def limiter(h: StoreHarness, **config: Any) -> RateLimiter:
    return RateLimiter(RateLimitConfig.model_validate(config), h.store)


def ts(text: str) -> float:
    return float(calendar.timegm(datetime.fromisoformat(text).timetuple()))


# ---- config -------------------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    config = RateLimitConfig()
    assert {k: t.requests_per_day for k, t in config.tiers.items()} == {
        "free": 10,
        "pro": 1000,
        "enterprise": None,
    }
    assert config.default_tier is None
    with pytest.raises(ValidationError, match="default_tier"):
        RateLimitConfig(default_tier="gold")
    with pytest.raises(ValidationError, match="greater than 0"):
        RateLimitConfig.model_validate({"key": {"requests_per_minute": 0}})
    with pytest.raises(ValidationError, match="Extra inputs"):
        RateLimitConfig.model_validate({"key": {"rpm": 5}})


# ---- requests per minute ------------------------------------------------------------------


async def test_requests_per_minute(harness: StoreHarness) -> None:
    rl = limiter(harness, key={"requests_per_minute": 6, "request_burst": 2})
    subject = RateSubject("alice")
    first, second, third = [await rl.check(subject) for _ in range(3)]
    assert first.allowed
    assert second.allowed
    assert not third.allowed
    assert third.retry_after == pytest.approx(10.0)  # 6/min = one every 10 s
    assert third.retry_after_header == "10"
    binding = third.binding
    assert binding is not None
    assert binding.name == "key.requests_per_minute"
    harness.clock.advance(10)
    assert (await rl.check(subject)).allowed
    assert not (await rl.check(subject)).allowed


async def test_team_limit_is_shared_and_refusals_consume_nothing(harness: StoreHarness) -> None:
    rl = limiter(
        harness,
        key={"requests_per_minute": 100},
        team={"requests_per_minute": 2, "request_burst": 2},
    )
    assert (await rl.check(ALICE)).allowed
    assert (await rl.check(BOB)).allowed
    refused = await rl.check(ALICE)
    assert not refused.allowed
    assert [s.name for s in refused.limits if not s.allowed] == ["team.requests_per_minute"]
    key_state = next(s for s in refused.limits if s.name == "key.requests_per_minute")
    assert key_state.remaining == 98  # would be 98 after this one; nothing was taken
    again = await rl.check(RateSubject("alice"))  # alice without her team: only the key limit
    assert [s.remaining for s in again.limits] == [98]


async def test_per_key_override(harness: StoreHarness) -> None:
    rl = limiter(
        harness,
        key={"requests_per_minute": 1},
        keys={"vip": {"requests_per_minute": 1000}},
    )
    for _ in range(5):
        assert (await rl.check(RateSubject("vip"))).allowed
    assert (await rl.check(RateSubject("alice"))).allowed
    assert not (await rl.check(RateSubject("alice"))).allowed


# ---- tokens per minute --------------------------------------------------------------------


async def test_tokens_estimate_then_debit(harness: StoreHarness) -> None:
    rl = limiter(harness, key={"tokens_per_minute": 60_000})  # 1,000 tokens per second
    alice = RateSubject("alice")
    assert (await rl.check(alice, tokens=10_000)).allowed
    await rl.record_tokens(alice, 110_000)  # the call really used 120,000
    refused = await rl.check(alice, tokens=0)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(60.0)  # 120k used - 60k burst = 60 s of debt
    harness.clock.advance(60)
    assert (await rl.check(alice, tokens=0)).allowed


async def test_tokens_refund_and_estimate_cap(harness: StoreHarness) -> None:
    rl = limiter(harness, key={"tokens_per_minute": 1_000})
    alice = RateSubject("alice")
    huge = await rl.check(alice, tokens=50_000)  # capped at the burst: admitted once
    assert huge.allowed
    assert huge.limits[0].remaining == 0
    await rl.record_tokens(alice, -1_000)  # it was a cache hit after all
    assert (await rl.check(alice, tokens=1_000)).allowed


async def test_record_tokens_without_token_limits_is_a_no_op(harness: StoreHarness) -> None:
    rl = limiter(harness, key={"requests_per_minute": 5})
    await rl.record_tokens(RateSubject("alice"), 1_000_000)
    assert await harness.store.scan("gw:") == []


# ---- daily quotas by tier -----------------------------------------------------------------


async def test_free_tier_daily_quota(harness: StoreHarness) -> None:
    harness.clock.set(ts("2025-06-15T18:00:00"))
    rl = limiter(harness, default_tier="free")
    alice = RateSubject("alice")
    results = [await rl.check(alice) for _ in range(11)]
    assert [r.allowed for r in results] == [True] * 10 + [False]
    last = results[-1]
    binding = last.binding
    assert binding is not None
    assert binding.name == "key.requests_per_day"
    assert last.retry_after == pytest.approx(6 * 3600)
    harness.clock.set(ts("2025-06-16T00:00:00"))
    assert (await rl.check(alice)).allowed


async def test_tiers(harness: StoreHarness) -> None:
    rl = limiter(
        harness,
        tiers={"free": {"requests_per_day": 10}, "pro": {"requests_per_day": 2}, "enterprise": {}},
    )
    assert rl.items_for(RateSubject("e", tier="enterprise")) == []
    assert rl.items_for(RateSubject("x")) == []  # no tier, no default: no quota
    pro = RateSubject("p", tier="pro")
    assert [(await rl.check(pro)).allowed for _ in range(3)] == [True, True, False]
    with pytest.raises(UnknownTier):
        await rl.check(RateSubject("g", tier="gold"))


# ---- rate limits and budget in one round trip ---------------------------------------------


def _budget(h: StoreHarness, **config: Any) -> BudgetLedger:
    rules = [{"scope": "key", "window": "daily", "usd": 1}]
    return BudgetLedger(BudgetConfig.model_validate({"rules": rules, **config}), h.store)


async def test_check_and_reserve_is_all_or_nothing(harness: StoreHarness) -> None:
    rl = limiter(harness, key={"requests_per_minute": 2, "request_burst": 2})
    ledger = _budget(harness)
    checks = ledger.checks_for([Scope("key", "alice")])
    alice = RateSubject("alice")

    decision, held = await rl.check_and_reserve(alice, ledger, "r1", checks, Amount(2_000_000))
    assert decision.allowed
    assert isinstance(held, Denied)  # the budget refused ...
    decision, held = await rl.check_and_reserve(alice, ledger, "r2", checks, Amount(600_000))
    assert decision.limits[0].remaining == 1  # ... so r1 took no rate allowance
    assert isinstance(held, Reservation)
    decision, held = await rl.check_and_reserve(alice, ledger, "r3", checks, Amount(100_000))
    assert isinstance(held, Reservation)
    decision, held = await rl.check_and_reserve(alice, ledger, "r4", checks, Amount(100_000))
    assert not decision.allowed
    assert held is None  # the rate limit refused: nothing held
    assert (await ledger.status([Scope("key", "alice")]))[0].used == 700_000


async def test_check_and_reserve_with_different_tags_goes_in_turn(harness: StoreHarness) -> None:
    rl = limiter(harness, key={"requests_per_minute": 5}, hash_tag="rl")
    ledger = _budget(harness)
    checks = ledger.checks_for([Scope("key", "alice")])
    decision, held = await rl.check_and_reserve(
        RateSubject("alice"), ledger, "r1", checks, Amount(1)
    )
    assert decision.allowed
    assert isinstance(held, Reservation)
    no_rules = _budget(harness, rules=[])
    decision, held = await rl.check_and_reserve(RateSubject("alice"), no_rules, "r2", [], Amount(1))
    assert isinstance(held, Reservation)
    assert held.lines == ()


@pytest.mark.parametrize(("rate_open", "budget_open"), [(True, True), (True, False), (False, True)])
async def test_check_and_reserve_outage(rate_open: bool, budget_open: bool) -> None:
    store = MemoryStore(clock=ManualClock())
    await store.close()
    rl = RateLimiter(
        RateLimitConfig.model_validate({"key": {"requests_per_minute": 1}, "fail_open": rate_open}),
        store,
    )
    rules = [{"scope": "key", "window": "daily", "usd": 1}]
    ledger = BudgetLedger(
        BudgetConfig.model_validate({"rules": rules, "fail_open": budget_open}), store
    )
    checks = ledger.checks_for([Scope("key", "a")])
    if rate_open and budget_open:
        decision, held = await rl.check_and_reserve(
            RateSubject("a"), ledger, "r", checks, Amount(1)
        )
        assert decision.degraded
        assert isinstance(held, Reservation)
        assert held.degraded
    else:
        with pytest.raises(StoreUnavailable):
            await rl.check_and_reserve(RateSubject("a"), ledger, "r", checks, Amount(1))


# ---- outages and decisions ----------------------------------------------------------------


@pytest.mark.parametrize("fail_open", [True, False])
async def test_store_outage(fail_open: bool) -> None:
    store = MemoryStore(clock=ManualClock())
    await store.close()
    config = RateLimitConfig.model_validate(
        {"key": {"requests_per_minute": 1}, "fail_open": fail_open}
    )
    rl = RateLimiter(config, store)
    if fail_open:
        decision = await rl.check(RateSubject("a"))
        assert decision.allowed
        assert decision.degraded
        await rl.record_tokens(RateSubject("a"), 5)
    else:
        with pytest.raises(StoreUnavailable, match="closed"):
            await rl.check(RateSubject("a"))


def test_decision_binding() -> None:
    a = LimitState("a", 10, True, 9, 0.0, 6.0)
    b = LimitState("b", 100, True, 5, 0.0, 60.0)
    assert RateDecision(True, (a, b)).binding == b
    assert RateDecision(True).binding is None
    assert RateDecision(True).retry_after_header == "0"


# ---- GCRA never admits more than burst + elapsed * rate -----------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rate=st.integers(min_value=1, max_value=600),
    burst=st.integers(min_value=1, max_value=20),
    gaps=st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=120),
)
def test_gcra_conformance(rate: int, burst: int, gaps: list[float]) -> None:
    async def run() -> list[tuple[float, bool]]:
        clock = ManualClock(1_000_000.0)
        store = MemoryStore(clock=clock)
        item = Gcra("r:{t}:g", rate, 60, burst, 1)
        out = []
        for gap in gaps:
            clock.advance(round(gap, 3))
            out.append((clock.time(), (await store.rate([item]))[0].allowed))
        return out

    events = asyncio.run(run())
    admitted = [t for t, ok in events if ok]
    interval = 60 / rate
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            span = admitted[j] - start
            # 1 ms rounding per step is the store's time resolution
            assert j - i + 1 <= burst + math.floor((span + 0.002) / interval)
