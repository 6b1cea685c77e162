"""Budgets, rate limits and quotas through real Envoy, with a real redis-server."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from extproc.policies.auth import hash_key, new_key
from tests.e2e.test_data_path import record_for
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config
from tests.redis_server import RedisServer

KEYS = {name: new_key(name) for name in ("spender", "limited", "freebie", "pipeline", "edge")}
MODEL = "claude-sonnet-4-6"  # $3 / $15 per million tokens


def _body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text}]
    return {"model": MODEL, "max_tokens": 50, "messages": messages, **extra}


def _post(
    stack: Stack,
    key: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    all_headers = {"anthropic-version": "2023-06-01", "x-api-key": KEYS[key], **(headers or {})}
    return httpx.post(
        f"{stack.url}/v1/messages", json=body or _body(), headers=all_headers, timeout=30
    )


def _config(fake: FakeProvider, redis_url: str, **extra: Any) -> dict[str, Any]:
    config = gateway_config(fake.url, store=redis_url)
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


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def budgeted(fake: FakeProvider, redis: RedisServer) -> Iterator[Stack]:
    stack = Stack(_config(fake, redis.url))
    stack.start()
    yield stack
    stack.close()


def test_cost_is_priced_from_actual_usage(budgeted: Stack, received: FakeProvider) -> None:
    response = _post(budgeted, "freebie")
    usage = response.json()["usage"]
    record = record_for(budgeted, response.headers["x-gateway-request-id"])
    expected = (Decimal(usage["input_tokens"]) * 3 + Decimal(usage["output_tokens"]) * 15) / 10**6
    assert Decimal(str(record["cost_usd"])) == expected
    assert record["scopes"] == {"key": "freebie"}


def test_token_budget_runs_out_with_a_clear_429(budgeted: Stack, received: FakeProvider) -> None:
    statuses = [_post(budgeted, "spender").status_code for _ in range(30)]
    assert 200 in statuses
    refused = _post(budgeted, "spender")
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert "budget key:spender/daily" in error["message"]
    assert refused.headers["x-gateway-budget"] == "key:spender/daily"
    assert int(refused.headers["x-gateway-budget-remaining"]) < 500
    assert int(refused.headers["retry-after"]) <= 86_400
    assert refused.headers["x-gateway-error"] == "budget_exhausted"
    spent = sum(
        r["input_tokens"] + r["output_tokens"]
        for r in budgeted.audit_records()
        if r.get("key_id") == "spender" and r["outcome"] == "ok"
    )
    assert spent <= 500


def test_pipeline_budget_from_the_header(budgeted: Stack, received: FakeProvider) -> None:
    header = {"x-ci-pipeline-id": "build-42"}
    statuses = [_post(budgeted, "pipeline", headers=header).status_code for _ in range(15)]
    assert statuses[0] == 200
    assert statuses[-1] == 429
    other = {"x-ci-pipeline-id": "build-43"}
    assert _post(budgeted, "pipeline", headers=other).status_code == 200


def test_requests_per_minute(budgeted: Stack, received: FakeProvider) -> None:
    assert [_post(budgeted, "limited").status_code for _ in range(3)] == [200, 200, 200]
    refused = _post(budgeted, "limited")
    assert refused.status_code == 429
    assert refused.headers["x-gateway-limit"] == "key.requests_per_minute"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-gateway-error"] == "rate_limited"
    assert len(received.received) == 3


def test_free_tier_daily_quota(budgeted: Stack, received: FakeProvider) -> None:
    quota = httpx.get(
        f"{budgeted.url}/v1/gateway/quota", headers={"x-api-key": KEYS["freebie"]}, timeout=10
    ).json()
    (daily,) = [limit for limit in quota["limits"] if limit["name"] == "key.requests_per_day"]
    for _ in range(daily["remaining"]):
        assert _post(budgeted, "freebie").status_code == 200
    refused = _post(budgeted, "freebie")
    assert refused.status_code == 429
    assert "daily request quota" in refused.json()["error"]["message"]
    assert refused.headers["x-gateway-error"] == "quota_exhausted"


def test_quota_endpoint_reports_what_is_left(budgeted: Stack, received: FakeProvider) -> None:
    report = httpx.get(
        f"{budgeted.url}/v1/gateway/quota",
        headers={"x-api-key": KEYS["edge"], "x-ci-pipeline-id": "p9"},
        timeout=10,
    )
    assert report.status_code == 200
    body = report.json()
    assert body["caller"] == "edge"
    budgets = {b["budget"]: b for b in body["budgets"]}
    assert budgets["team:edge/daily"]["limit"] == 10_000
    assert budgets["pipeline:*/monthly"]["remaining"] <= 300
    assert received.received == []  # answered by the gateway


def test_cache_hits_are_not_charged(fake: FakeProvider, redis: RedisServer) -> None:
    config = _config(fake, redis.url, profiles={"default": {"cache": {"enabled": True}}})
    stack = Stack(config)
    try:
        stack.start()
        body = _body("cache and budgets")
        first = _post(stack, "edge", body)
        second = _post(stack, "edge", body)
        hit = record_for(stack, second.headers["x-gateway-request-id"])
        miss = record_for(stack, first.headers["x-gateway-request-id"])
    finally:
        stack.close()
    assert second.headers["x-gateway-cache"] == "hit"
    assert hit["cost_usd"] == 0
    assert hit["cost_saved_usd"] == miss["cost_usd"]


def test_two_replicas_never_overspend(fake: FakeProvider, redis: RedisServer) -> None:
    """60 concurrent requests through two gateways sharing one redis-server, at the edge
    of a 10,000-token budget (about 30 calls): settled spend stays within the budget."""
    stacks = [Stack(_config(fake, redis.url)) for _ in range(2)]
    try:
        for stack in stacks:
            stack.start()
        text = "x" * 1200  # ~400 input tokens estimated, ~300 actual: each call ~310 tokens
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futures = [
                pool.submit(_post, stacks[i % 2], "edge", _body(text, max_tokens=20))
                for i in range(60)
            ]
            statuses = [f.result().status_code for f in futures]
        time.sleep(0.5)
        records = [r for s in stacks for r in s.audit_records() if r.get("key_id") == "edge"]
    finally:
        for stack in stacks:
            stack.close()
    assert statuses.count(200) >= 20
    assert statuses.count(429) >= 1
    assert set(statuses) <= {200, 429}
    spent = sum(r["input_tokens"] + r["output_tokens"] for r in records if r["outcome"] == "ok")
    assert spent <= 10_000
