"""Budgets, rate limits and quotas at the service layer: the servicer driven as Envoy would
drive it (tests/service/harness.py), on a test clock. Moved from tests/e2e/test_budgets.py
with their assertions; the e2e file keeps the test that needs real Envoy, Redis and two
replicas (test_two_replicas_never_overspend)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from extproc.policies.auth import hash_key, new_key
from tests.service.harness import ClientReply, ServiceStack, service_config

KEYS = {name: new_key(name) for name in ("spender", "limited", "freebie", "pipeline", "edge")}
MODEL = "claude-sonnet-4-6"  # $3 / $15 per million tokens


def _body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text}]
    return {"model": MODEL, "max_tokens": 50, "messages": messages, **extra}


def _config(**extra: Any) -> dict[str, Any]:
    config = service_config()
    config["providers"]["anthropic"]["credential"] = {"value": "sk-held"}
    config["auth"] = {
        "required": True,
        "keys": [
            {"id": "spender", "hash": hash_key(KEYS["spender"]), "team": "t1", "project": "p1"},
            {"id": "limited", "hash": hash_key(KEYS["limited"]), "team": "t2"},
            {"id": "freebie", "hash": hash_key(KEYS["freebie"]), "tier": "free"},
            {"id": "pipeline", "hash": hash_key(KEYS["pipeline"]), "team": "ci"},
            {"id": "edge", "hash": hash_key(KEYS["edge"]), "team": "edge"},
        ],
    }
    config["budgets"] = {
        "rules": [
            {"scope": "key", "id": "spender", "window": "daily", "tokens": 500},
            {"scope": "pipeline", "window": "monthly", "tokens": 300},
            {"scope": "team", "id": "edge", "window": "daily", "tokens": 10_000},
        ]
    }
    config["rate_limits"] = {"keys": {"limited": {"requests_per_minute": 3}}}
    config.update(extra)
    return config


@pytest.fixture
async def budgeted() -> AsyncIterator[ServiceStack]:
    stack = ServiceStack(_config())
    yield stack
    await stack.close()


async def _post(
    stack: ServiceStack,
    key: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> ClientReply:
    all_headers = {"anthropic-version": "2023-06-01", "x-api-key": KEYS[key], **(headers or {})}
    return await stack.drive("POST", "/v1/messages", json=body or _body(), headers=all_headers)


def record_for(stack: ServiceStack, reply: ClientReply) -> dict[str, Any]:
    request_id = reply.headers["x-gateway-request-id"]
    (record,) = [r for r in stack.records if r["request_id"] == request_id]
    return record


async def test_cost_is_priced_from_actual_usage(budgeted: ServiceStack) -> None:
    response = await _post(budgeted, "freebie")
    usage = response.json()["usage"]
    record = record_for(budgeted, response)
    expected = (Decimal(usage["input_tokens"]) * 3 + Decimal(usage["output_tokens"]) * 15) / 10**6
    assert Decimal(str(record["cost_usd"])) == expected
    assert record["scopes"] == {"key": "freebie"}


async def test_token_budget_runs_out_with_a_clear_429(budgeted: ServiceStack) -> None:
    statuses = [(await _post(budgeted, "spender")).status for _ in range(30)]
    assert 200 in statuses
    refused = await _post(budgeted, "spender")
    assert refused.status == 429
    error = refused.error
    assert error["type"] == "rate_limit_error"
    assert "budget key:spender/daily" in error["message"]
    assert refused.headers["x-gateway-budget"] == "key:spender/daily"
    assert int(refused.headers["x-gateway-budget-remaining"]) < 500
    assert int(refused.headers["retry-after"]) <= 86_400
    assert refused.headers["x-gateway-error"] == "budget_exhausted"
    spent = sum(
        r["input_tokens"] + r["output_tokens"]
        for r in await budgeted.settled()
        if r.get("key_id") == "spender" and r["outcome"] == "ok"
    )
    assert spent <= 500


async def test_daily_budget_comes_back_the_next_day(budgeted: ServiceStack) -> None:
    """The test clock moves a day: the daily window resets without anyone waiting."""
    while (await _post(budgeted, "spender")).status == 200:
        pass
    budgeted.clock.advance(86_400)
    assert (await _post(budgeted, "spender")).status == 200


async def test_pipeline_budget_from_the_header(budgeted: ServiceStack) -> None:
    header = {"x-ci-pipeline-id": "build-42"}
    statuses = [(await _post(budgeted, "pipeline", headers=header)).status for _ in range(15)]
    assert statuses[0] == 200
    assert statuses[-1] == 429
    other = {"x-ci-pipeline-id": "build-43"}
    assert (await _post(budgeted, "pipeline", headers=other)).status == 200


async def test_requests_per_minute(budgeted: ServiceStack) -> None:
    assert [(await _post(budgeted, "limited")).status for _ in range(3)] == [200, 200, 200]
    refused = await _post(budgeted, "limited")
    assert refused.status == 429
    assert refused.headers["x-gateway-limit"] == "key.requests_per_minute"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-gateway-error"] == "rate_limited"
    assert len(budgeted.fake.received) == 3
    budgeted.clock.advance(int(refused.headers["retry-after"]))
    assert (await _post(budgeted, "limited")).status == 200  # the window moved on


async def test_free_tier_daily_quota(budgeted: ServiceStack) -> None:
    quota = await budgeted.drive("GET", "/v1/gateway/quota", headers={"x-api-key": KEYS["freebie"]})
    limits = quota.json()["limits"]
    (daily,) = [limit for limit in limits if limit["name"] == "key.requests_per_day"]
    for _ in range(daily["remaining"]):
        assert (await _post(budgeted, "freebie")).status == 200
    refused = await _post(budgeted, "freebie")
    assert refused.status == 429
    assert "daily request quota" in refused.error["message"]
    assert refused.headers["x-gateway-error"] == "quota_exhausted"


async def test_quota_endpoint_reports_what_is_left(budgeted: ServiceStack) -> None:
    report = await budgeted.drive(
        "GET",
        "/v1/gateway/quota",
        headers={"x-api-key": KEYS["edge"], "x-ci-pipeline-id": "p9"},
    )
    assert report.status == 200
    body = report.json()
    assert body["caller"] == "edge"
    budgets = {b["budget"]: b for b in body["budgets"]}
    assert budgets["team:edge/daily"]["limit"] == 10_000
    assert budgets["pipeline:*/monthly"]["remaining"] <= 300
    assert budgeted.fake.received == []  # answered by the gateway


async def test_cache_hits_are_not_charged() -> None:
    stack = ServiceStack(_config(profiles={"default": {"cache": {"enabled": True}}}))
    body = _body("cache and budgets")
    first = await _post(stack, "edge", body)
    second = await _post(stack, "edge", body)
    hit, miss = record_for(stack, second), record_for(stack, first)
    await stack.close()
    assert second.headers["x-gateway-cache"] == "hit"
    assert hit["cost_usd"] == 0
    assert hit["cost_saved_usd"] == miss["cost_usd"]
