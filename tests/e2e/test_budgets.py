"""Budgets through real Envoy with a real redis-server shared by two gateway replicas.

The budget, rate-limit and quota contracts themselves are tested at the service layer
(tests/service/test_budgets.py); this file keeps what needs Envoy, Redis and processes."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from extproc.policies.auth import hash_key, new_key
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
        records = _edge_records(stacks, len(statuses))
    finally:
        for stack in stacks:
            stack.close()
    assert statuses.count(200) >= 20
    assert statuses.count(429) >= 1
    assert set(statuses) <= {200, 429}
    spent = sum(r["input_tokens"] + r["output_tokens"] for r in records if r["outcome"] == "ok")
    assert spent <= 10_000


def _edge_records(stacks: list[Stack], count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The key's audit records once every request has one (bounded): summing before a late
    record is written would make the overspend check easier to pass."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r for s in stacks for r in s.audit_records() if r.get("key_id") == "edge"]
        if len(records) >= count or time.monotonic() > deadline:
            assert len(records) == count, f"{len(records)} audit records for {count} requests"
            return records
        time.sleep(0.05)
