"""Budgets: config, window arithmetic, and the ledger on both stores."""

from __future__ import annotations

import calendar
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from extproc.apis.usage import Usage
from extproc.policies.budget import (
    Amount,
    BudgetCheck,
    BudgetConfig,
    BudgetLedger,
    BudgetRule,
    Denied,
    DuplicateReservation,
    Reservation,
    Scope,
    window_for,
)
from extproc.policies.pricing import PriceTable
from extproc.store import ManualClock, SettleOutcome, StoreUnavailable, hash_tag
from extproc.store.memory import MemoryStore
from tests.store_fixtures import StoreHarness, harness, redis_server

__all__ = ["harness", "redis_server"]  # fixtures used by name below

USD = 1_000_000


def ts(text: str) -> float:
    return float(calendar.timegm(datetime.fromisoformat(text).timetuple()))


def rule(**kw: Any) -> BudgetRule:
    return BudgetRule.model_validate(kw)


def ledger_for(h: StoreHarness, *rules: BudgetRule, **kw: Any) -> BudgetLedger:
    return BudgetLedger(BudgetConfig(rules=rules, **kw), h.store)


def reserved(result: Reservation | Denied) -> Reservation:
    assert isinstance(result, Reservation), result
    return result


def denied(result: Reservation | Denied) -> Denied:
    assert isinstance(result, Denied), result
    return result


TEAM = Scope("team", "research")
KEY = Scope("key", "k-1")


# ---- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"scope": "team", "window": "daily"}, "usd, tokens or both"),
        ({"scope": "team", "window": "rolling", "usd": 1}, "days is required"),
        ({"scope": "team", "window": "daily", "days": 3, "usd": 1}, "days is required"),
        ({"scope": "org", "window": "daily", "usd": 1}, "scope"),
        ({"scope": "team", "window": "weekly", "usd": 1}, "window"),
        ({"scope": "team", "window": "daily", "usd": -1}, "greater than or equal"),
        ({"scope": "team", "window": "daily", "usd": 1, "colour": 1}, "Extra inputs"),
    ],
)
def test_rule_validation(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        BudgetRule.model_validate(data)


def test_config_validation() -> None:
    r = {"scope": "team", "window": "daily", "usd": 1}
    with pytest.raises(ValidationError, match="two rules"):
        BudgetConfig.model_validate({"rules": [r, r]})
    with pytest.raises(ValidationError, match="hash_tag"):
        BudgetConfig.model_validate({"hash_tag": "a}b"})
    config = BudgetConfig.model_validate(
        {"rules": [r, {**r, "id": "research", "usd": "2.50"}, {**r, "window": "monthly"}]}
    )
    assert config.rules[1].limits() == [("usd", 2_500_000)]
    assert config.reservation_ttl_seconds == 900


# ---- windows ------------------------------------------------------------------------------


def test_daily_window() -> None:
    w = window_for(rule(scope="key", window="daily", usd=1), ts("2025-03-31T23:59:59"), 900)
    assert w.suffix == "d20250331"
    assert w.buckets == ("s",)
    assert w.resets_at == ts("2025-04-01T00:00:00")
    assert w.expires_at is not None
    assert w.expires_at > w.resets_at + 900


def test_monthly_window_crosses_the_year() -> None:
    w = window_for(rule(scope="key", window="monthly", usd=1), ts("2025-12-15T12:00:00"), 900)
    assert w.suffix == "m202512"
    assert w.resets_at == ts("2026-01-01T00:00:00")


def test_rolling_window() -> None:
    w = window_for(rule(scope="key", window="rolling", days=3, usd=1), ts("2025-03-01T08:00:00"), 0)
    assert w.suffix == "r3d"
    assert w.bucket == "s:20250301"
    assert w.buckets == ("s:20250301", "s:20250228", "s:20250227")
    assert w.prune_before == "s:20250227"
    assert w.resets_at == ts("2025-03-02T00:00:00")


def test_lifetime_window() -> None:
    w = window_for(rule(scope="key", window="lifetime", usd=1), 1e9, 900)
    assert (w.suffix, w.resets_at, w.expires_at) == ("life", None, None)


@given(
    st.floats(min_value=0, max_value=4e9),
    st.sampled_from(["daily", "monthly", "rolling"]),
)
def test_windows_contain_now(now: float, kind: str) -> None:
    days = 7 if kind == "rolling" else None
    w = window_for(rule(scope="key", window=kind, days=days, usd=1), now, 900)
    assert w.resets_at is not None
    assert now < w.resets_at <= now + 31 * 86_400
    assert w.expires_at is not None
    assert w.expires_at > w.resets_at


# ---- which rules apply --------------------------------------------------------------------


def test_specific_rule_replaces_wildcard_for_its_window() -> None:
    default = rule(scope="team", window="monthly", usd=100)
    bigger = rule(scope="team", id="research", window="monthly", usd=5000)
    daily = rule(scope="team", window="daily", usd=10)
    per_key = rule(scope="key", window="daily", tokens=1000)
    ledger = BudgetLedger(BudgetConfig(rules=(default, bigger, daily, per_key)), MemoryStore())
    checks = ledger.checks_for([TEAM, KEY, TEAM, Scope("pipeline", "ci")])
    assert checks == [
        BudgetCheck(bigger, TEAM),
        BudgetCheck(daily, TEAM),
        BudgetCheck(per_key, KEY),
    ]
    other = ledger.checks_for([Scope("team", "other")])
    assert [c.rule for c in other] == [default, daily]


def test_keys_keep_one_hash_tag_whatever_the_ids() -> None:
    ledger = BudgetLedger(
        BudgetConfig(rules=(rule(scope="user", window="daily", usd=1),)), MemoryStore()
    )
    check = ledger.checks_for([Scope("user", "evil}{x}:y")])[0]
    line = ledger.lines([check], Amount(1, 0), 1e9)[0]
    assert hash_tag(line.hold.counter.key) == "gateway"
    assert hash_tag(ledger.record_key("req:{1}")) == "gateway"
    assert "evil" in line.hold.counter.key
    assert "}{" not in line.hold.counter.key


# ---- the ledger ---------------------------------------------------------------------------


async def test_reserve_settle_release(harness: StoreHarness) -> None:
    ledger = ledger_for(harness, rule(scope="team", window="daily", usd=1, tokens=10_000))
    checks = ledger.checks_for([TEAM])
    r1 = reserved(await ledger.reserve("r1", checks, Amount(400_000, 3_000)))
    assert [(s.metric, s.used, s.remaining) for s in r1.statuses] == [
        ("usd", 400_000, 600_000),
        ("tokens", 3_000, 7_000),
    ]
    r2 = reserved(await ledger.reserve("r2", checks, Amount(500_000, 3_000)))
    assert await ledger.settle(r1, Amount(100_000, 1_000)) is SettleOutcome.SETTLED
    assert await ledger.release(r2) is SettleOutcome.SETTLED
    assert [s.used for s in await ledger.status([TEAM])] == [100_000, 1_000]
    assert await ledger.settle(r1, Amount(999, 999)) is SettleOutcome.ALREADY_SETTLED


async def test_denied_names_the_budget_and_reset(harness: StoreHarness) -> None:
    harness.clock.set(ts("2025-06-15T12:00:00"))
    ledger = ledger_for(harness, rule(scope="team", window="daily", usd=1, name="team-daily"))
    checks = ledger.checks_for([TEAM])
    reserved(await ledger.reserve("r1", checks, Amount(700_000)))
    d = denied(await ledger.reserve("r2", checks, Amount(400_000)))
    assert (d.budget, d.scope, d.metric) == ("team-daily", TEAM, "usd")
    assert (d.limit, d.used, d.requested, d.remaining) == (USD, 700_000, 400_000, 300_000)
    assert d.resets_at == ts("2025-06-16T00:00:00")
    assert d.retry_after == 12 * 3600
    assert "team-daily" in d.message()
    assert "$0.30" in d.message()


async def test_lifetime_denial_has_no_retry_after(harness: StoreHarness) -> None:
    ledger = ledger_for(harness, rule(scope="project", window="lifetime", tokens=10))
    checks = ledger.checks_for([Scope("project", "p")])
    d = denied(await ledger.reserve("r", checks, Amount(0, 11)))
    assert d.retry_after is None
    assert "never resets" in d.message()


async def test_reserve_is_all_or_nothing_across_scopes(harness: StoreHarness) -> None:
    ledger = ledger_for(
        harness,
        rule(scope="team", window="monthly", usd=100),
        rule(scope="key", window="daily", usd=1),
    )
    checks = ledger.checks_for([TEAM, KEY])
    d = denied(await ledger.reserve("r", checks, Amount(2 * USD)))
    assert d.scope == KEY
    assert [s.used for s in await ledger.status([TEAM, KEY])] == [0, 0]


async def test_overspend_is_recorded_and_blocks_next(harness: StoreHarness) -> None:
    ledger = ledger_for(harness, rule(scope="key", window="daily", usd=1))
    checks = ledger.checks_for([KEY])
    r = reserved(await ledger.reserve("r1", checks, Amount(100_000)))
    await ledger.settle(r, Amount(1_200_000))
    assert (await ledger.status([KEY]))[0].used == 1_200_000
    d = denied(await ledger.reserve("r2", checks, Amount(1)))
    assert d.remaining == 0


async def test_window_rollover_settles_into_the_admitting_window(harness: StoreHarness) -> None:
    harness.clock.set(ts("2025-01-31T23:59:59"))
    ledger = ledger_for(
        harness,
        rule(scope="key", window="daily", usd=1),
        rule(scope="key", window="monthly", usd=10),
    )
    checks = ledger.checks_for([KEY])
    r = reserved(await ledger.reserve("r", checks, Amount(900_000)))
    harness.clock.advance(2)  # 2025-02-01T00:00:01: a new day and a new month
    assert [s.used for s in await ledger.status([KEY])] == [0, 0]
    reserved(await ledger.reserve("r-new-day", checks, Amount(900_000)))
    await ledger.settle(r, Amount(950_000))
    assert [s.used for s in await ledger.status([KEY])] == [900_000, 900_000]
    harness.clock.set(ts("2025-01-31T23:59:59"))  # look back at yesterday
    assert [s.used for s in await ledger.status([KEY])] == [950_000, 950_000]


async def test_crashed_reservations_expire_into_spend(harness: StoreHarness) -> None:
    """A dead replica's hold is charged at its estimate when it expires, not forgotten;
    a settle arriving late (the replica came back) corrects it to the actual."""
    ledger = ledger_for(
        harness, rule(scope="key", window="lifetime", usd=2), reservation_ttl_seconds=60
    )
    checks = ledger.checks_for([KEY])
    lost = reserved(await ledger.reserve("lost", checks, Amount(USD)))
    harness.clock.advance(60)
    assert (await ledger.status([KEY]))[0].used == USD
    assert isinstance(await ledger.reserve("r2", checks, Amount(USD + 1)), Denied)
    await ledger.settle(lost, Amount(USD // 4))
    assert (await ledger.status([KEY]))[0].used == USD // 4
    reserved(await ledger.reserve("r3", checks, Amount(USD)))


async def test_rolling_window_frees_old_days(harness: StoreHarness) -> None:
    harness.clock.set(ts("2025-03-01T12:00:00"))
    ledger = ledger_for(harness, rule(scope="key", window="rolling", days=2, usd=1))
    checks = ledger.checks_for([KEY])
    await ledger.settle(
        reserved(await ledger.reserve("d1", checks, Amount(600_000))), Amount(600_000)
    )
    harness.clock.advance(86_400)  # day 2: day 1 still counts
    assert isinstance(await ledger.reserve("d2", checks, Amount(600_000)), Denied)
    await ledger.settle(
        reserved(await ledger.reserve("d2b", checks, Amount(300_000))), Amount(300_000)
    )
    harness.clock.advance(86_400)  # day 3: day 1 left the window
    assert (await ledger.status([KEY]))[0].used == 300_000
    reserved(await ledger.reserve("d3", checks, Amount(700_000)))


async def test_duplicate_request_id(harness: StoreHarness) -> None:
    ledger = ledger_for(harness, rule(scope="key", window="daily", usd=1))
    checks = ledger.checks_for([KEY])
    reserved(await ledger.reserve("same", checks, Amount(1)))
    with pytest.raises(DuplicateReservation):
        await ledger.reserve("same", checks, Amount(1))


async def test_no_rules_means_an_empty_reservation(harness: StoreHarness) -> None:
    ledger = ledger_for(harness)
    r = reserved(await ledger.reserve("r", ledger.checks_for([KEY]), Amount(10**12)))
    assert r.lines == ()
    assert await ledger.settle(r, Amount(1)) is SettleOutcome.SETTLED


@pytest.mark.parametrize("fail_open", [False, True])
async def test_store_outage(fail_open: bool) -> None:
    store = MemoryStore(clock=ManualClock())
    await store.close()
    ledger = BudgetLedger(
        BudgetConfig(rules=(rule(scope="key", window="daily", usd=1),), fail_open=fail_open), store
    )
    checks = ledger.checks_for([KEY])
    if not fail_open:
        with pytest.raises(StoreUnavailable):
            await ledger.reserve("r", checks, Amount(1))
        return
    r = reserved(await ledger.reserve("r", checks, Amount(1)))
    assert r.degraded
    assert r.lines == ()


def test_amounts() -> None:
    with pytest.raises(ValueError, match="negative"):
        Amount(-1, 0)
    price = PriceTable.default().lookup("claude-haiku-4-5")
    amount = Amount.of_usage(Usage(input_tokens=1000, output_tokens=100), price)
    assert amount == Amount(usd_micros=1_500, tokens=1_100)
    assert amount.of("usd") == 1_500
    assert amount.of("tokens") == 1_100
    assert Decimal(amount.usd_micros) / USD == Decimal("0.0015")
