"""Metric label bounds at the service layer (issue 11 item 14): rejected names never become
labels, nor do pipeline ids from a header; names a provider answered with are capped.
Moved from tests/e2e/test_edge_hardening.py with its assertions: no Envoy is needed to
count the series the gateway makes."""

from __future__ import annotations

import secrets

from prometheus_client import generate_latest

from extproc.policies.auth import hash_key, new_key
from extproc.telemetry.labels import MAX_ANSWERED
from tests.service.harness import ServiceStack, service_config

BODY = {"model": "claude-opus-4-8", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
KEY = new_key("alice")


async def test_rejected_models_and_random_pipelines_add_no_series() -> None:
    """(The fake echoes any model, as no real provider does.)"""
    config = service_config(
        budgets={"rules": [{"scope": "pipeline", "window": "daily", "usd": 100}]}
    )
    config["providers"]["anthropic"]["credential"] = {"value": "sk-held"}
    # A keyed caller: pipeline budgets are bound to who calls (anonymous callers have none).
    config["auth"] = {"keys": [{"id": "alice", "hash": hash_key(KEY)}]}
    stack = ServiceStack(config)
    rejected = ["claude-" + secrets.token_hex(8) for _ in range(300)]
    answered = ["claude-" + secrets.token_hex(8) for _ in range(MAX_ANSWERED + 36)]
    pipelines = [secrets.token_hex(8) for _ in range(100)]
    headers = {"anthropic-version": "2023-06-01", "x-api-key": KEY}

    async def status(body: dict[str, object], extra: dict[str, str] | None = None) -> int:
        reply = await stack.drive(
            "POST", "/v1/messages", json=body, headers=headers | (extra or {})
        )
        return reply.status

    assert await status(BODY) == 200
    for model, pipeline in zip(rejected, pipelines * 3, strict=True):
        # No price: refused while a USD (pipeline) budget applies.
        assert await status({**BODY, "model": model}, {"x-ci-pipeline-id": pipeline}) == 400
    for model in answered:  # no budget applies: forwarded, and the fake echoes the name
        assert await status({**BODY, "model": model}) == 200
    for pipeline in pipelines:
        assert await status(BODY, {"x-ci-pipeline-id": pipeline}) == 200
    assert len(await stack.settled()) == 1 + 300 + len(answered) + 100
    text = generate_latest(stack.metrics.registry).decode()
    await stack.close()
    assert not [name for name in rejected + pipelines if name in text]
    assert sum(name in text for name in answered) == MAX_ANSWERED
    assert 'scope="pipeline=other"' in text
    assert 'model="other"' in text
