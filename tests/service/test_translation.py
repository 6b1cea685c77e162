"""Anthropic ⇄ OpenAI translation at the service layer (issue 13): the servicer driven as
Envoy would drive it (tests/service/harness.py), so the per-route choices, the audit
record and the headers that leave are checked fast; tests/e2e/test_translation.py keeps
what needs Envoy, the SDKs and the Claude Code CLI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.service.harness import ServiceStack, service_config

ANTHROPIC = {"anthropic-version": "2023-06-01", "x-api-key": "caller-key"}
THINKING_TURNS: Any = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"}]},
    {"role": "user", "content": "go on"},
]


@pytest.fixture
async def crossed() -> AsyncIterator[ServiceStack]:
    config = service_config()
    config["providers"]["anthropic"]["credential"] = {"value": "sk-ant-held"}
    config["providers"]["openai"]["credential"] = {"value": "sk-oai-held"}
    config["models"] = {
        "routes": [
            {"match": "qwen*", "provider": "openai"},
            {"match": "claude-*", "provider": "anthropic"},
        ]
    }
    config["profiles"] = {"default": {"map": {"gpt-4": "claude-sonnet-4-6"}}}
    stack = ServiceStack(config)
    yield stack
    await stack.close()


def _ask(model: str, turns: Any = None, **extra: Any) -> dict[str, Any]:
    messages = turns or [{"role": "user", "content": "hi"}]
    return {"model": model, "max_tokens": 20, "messages": messages, **extra}


async def test_losses_are_dropped_and_audited_by_default(crossed: ServiceStack) -> None:
    reply = await crossed.drive(
        "POST", "/v1/messages", json=_ask("qwen3-32b", THINKING_TURNS), headers=ANTHROPIC
    )
    assert reply.status == 200
    assert reply.json()["type"] == "message"
    assert reply.upstream is not None
    assert reply.upstream.path == "/v1/chat/completions"
    (record,) = await crossed.settled()
    assert record["translation"] == {"provider_api": "openai", "dropped": {"thinking": 1}}


async def test_a_route_refuses_what_it_will_not_drop(crossed: ServiceStack) -> None:
    policy = {"translation": {"refuse": ["thinking"]}}
    reply = await crossed.drive(
        "POST",
        "/v1/messages",
        json=_ask("qwen3-32b", THINKING_TURNS),
        headers=ANTHROPIC,
        policy=policy,
    )
    assert reply.status == 400
    assert reply.answered_by_gateway
    assert reply.error["type"] == "invalid_request_error"
    assert "messages[1].content[0] (thinking)" in reply.error["message"]
    assert reply.headers["x-gateway-error"] == "untranslatable"
    assert reply.headers["x-should-retry"] == "false"
    assert crossed.fake.received == []
    (record,) = await crossed.settled()
    assert record["outcome"] == "rejected_untranslatable"


async def test_streamed_answer_is_translated_event_by_event(crossed: ServiceStack) -> None:
    reply = await crossed.drive(
        "POST",
        "/v1/messages",
        json=_ask("qwen3-32b", stream=True),
        headers={**ANTHROPIC, "x-fake-text": "one two three", "x-fake-chunking": "split"},
    )
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    kinds = [e["type"] for e in reply.events]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    text = "".join(e["delta"]["text"] for e in reply.events if e["type"] == "content_block_delta")
    assert text == "one two three"
    (record,) = await crossed.settled()
    assert record["output_tokens"] == 3
    assert record["outcome"] == "ok"


async def test_count_tokens_for_an_openai_provider_is_the_gateways_estimate(
    crossed: ServiceStack,
) -> None:
    body = {"model": "qwen3-32b", "messages": [{"role": "user", "content": "count me"}]}
    reply = await crossed.drive("POST", "/v1/messages/count_tokens", json=body, headers=ANTHROPIC)
    assert reply.answered_by_gateway
    assert reply.json()["input_tokens"] > 0
    assert reply.headers["x-gateway-estimate"] == "true"


async def test_openai_caller_on_anthropic_gets_the_headers_anthropic_requires(
    crossed: ServiceStack,
) -> None:
    reply = await crossed.drive(
        "POST",
        "/v1/chat/completions",
        json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": "Bearer caller-key", "openai-organization": "org-1"},
    )
    assert reply.status == 200
    assert reply.json()["object"] == "chat.completion"
    sent = reply.upstream
    assert sent is not None
    assert sent.path == "/v1/messages"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["x-api-key"] == "sk-ant-held"
    assert "openai-organization" not in sent.headers
    assert sent.json()["model"] == "claude-sonnet-4-6"
    assert sent.json()["max_tokens"] == 4096
