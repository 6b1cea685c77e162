"""Every refusal in the caller's wire shape, at the service layer: the status, the
`error.type` for it, `x-gateway-error`, `x-should-retry: false` (the SDKs and Claude Code
retry a 401 and every 5xx otherwise), the request id, nothing sent upstream, and one audit
record naming the cause. Each cause runs in both wire shapes through the same harness."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.policies.auth import hash_key
from tests.service.harness import ServiceStack, service_config

KEY = "gwk_alice_" + "a" * 40
LIMITED = "gwk_limited_" + "l" * 40
STRANGER = "gwk_bob_" + "b" * 40
AWS_KEY = "AKIAZ7QXM4PLN3V2RT5K"  # shaped like an access key id; not a real one


def _stack() -> ServiceStack:
    config = service_config(
        auth={
            "keys": [
                {"id": "alice", "hash": hash_key(KEY), "team": "t"},
                {"id": "limited", "hash": hash_key(LIMITED), "team": "u"},
            ]
        },
        profiles={"default": {"models": ["claude-sonnet-*", "gpt-5"]}},
        budgets={"rules": [{"scope": "team", "id": "t", "window": "daily", "tokens": 300}]},
        rate_limits={"keys": {"limited": {"requests_per_minute": 1}}},
        limits={"max_body_bytes": 4000},
        guard={"profiles": {"default": {"actions": {"aws_access_key": "block"}}}},
    )
    for provider in config["providers"].values():
        provider["credential"] = {"value": "sk-held"}
    return ServiceStack(config)


def _request(shape: str, key: str, model: str, text: str = "hi") -> tuple[str, dict[str, str], Any]:
    messages = [{"role": "user", "content": text}]
    if shape == "anthropic":
        headers = {"anthropic-version": "2023-06-01", "x-api-key": key}
        return "/v1/messages", headers, {"model": model, "max_tokens": 5, "messages": messages}
    model = "gpt-5" if model == "claude-sonnet-4-6" else model
    body = {"model": model, "max_completion_tokens": 5, "messages": messages}
    return "/v1/chat/completions", {"authorization": f"Bearer {key}"}, body


CAUSES = {  # x-gateway-error: (key, model, text, status, Anthropic error.type)
    "invalid_key": (STRANGER, "claude-sonnet-4-6", "hi", 401, "authentication_error"),
    "model_not_allowed": (KEY, "claude-opus-4-8", "hi", 403, "permission_error"),
    "payload_too_large": (KEY, "claude-sonnet-4-6", "x" * 5000, 413, "request_too_large"),
    "guard_blocked": (KEY, "claude-sonnet-4-6", f"key {AWS_KEY}", 400, "invalid_request_error"),
    "budget_exhausted": (KEY, "claude-sonnet-4-6", "y" * 1500, 429, "rate_limit_error"),
}


@pytest.mark.parametrize("shape", ["anthropic", "openai"])
@pytest.mark.parametrize("cause", sorted(CAUSES))
async def test_a_refusal_is_told_in_the_callers_shape_and_not_retried(
    shape: str, cause: str
) -> None:
    key, model, text, status, anthropic_type = CAUSES[cause]
    stack = _stack()
    path, headers, body = _request(shape, key, model, text)
    reply = await stack.drive("POST", path, json=body, headers=headers)
    assert reply.answered_by_gateway
    assert reply.status == status
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers["x-gateway-error"] == cause
    assert reply.headers["x-should-retry"] == "false"
    assert reply.headers["x-gateway-request-id"]
    if shape == "anthropic":
        assert reply.json()["type"] == "error"
        assert reply.error["type"] == anthropic_type
    else:
        assert reply.error["code"] == cause
    assert reply.error["message"]
    assert stack.fake.received == []
    (record,) = await stack.settled()
    assert (record["outcome"], record["status"]) == (f"rejected_{cause}", status)
    await stack.close()


@pytest.mark.parametrize("shape", ["anthropic", "openai"])
async def test_a_rate_limited_caller_is_told_when_to_come_back(shape: str) -> None:
    stack = _stack()
    path, headers, body = _request(shape, LIMITED, "claude-sonnet-4-6")
    assert (await stack.drive("POST", path, json=body, headers=headers)).status == 200
    refused = await stack.drive("POST", path, json=body, headers=headers)
    assert refused.status == 429
    assert refused.headers["x-gateway-error"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert len(stack.fake.received) == 1
    stack.clock.advance(int(refused.headers["retry-after"]))
    assert (await stack.drive("POST", path, json=body, headers=headers)).status == 200
    await stack.close()
