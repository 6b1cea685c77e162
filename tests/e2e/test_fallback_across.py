"""Fallback across vendors through the real Envoy: a chain mixing API shapes.

`primary` is the Anthropic-shaped flaky provider (tests/flaky_provider.py: `x-flaky-status`
makes it fail); the next provider speaks another shape: an OpenAI-compatible backend (a
FakeProvider serving `/v1/chat/completions`) or Bedrock (tests/cloud_fakes.FakeBedrock).
Each attempt translates the caller's body for its own provider; the answer comes back in
the caller's shape, JSON and streamed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.claude_cli import claude_path, run_claude
from tests.cloud_fakes import AwsIdentity, FakeBedrock, serving
from tests.e2e.test_fallback import Primary, _record
from tests.fake_provider import FakeProvider, run_in_thread
from tests.harness import Stack, gateway_config

pytestmark = pytest.mark.e2e

ASKED = "claude-sonnet-4-6"
INTERNAL_MODEL = "gpt-4o-mini"  # the internal OpenAI-compatible backend's model
BEDROCK_MODEL = "claude-haiku-4-5"
BEDROCK_ID = "anthropic.claude-haiku-4-5-20251001-v1:0"
BEDROCK_KEY = "bedrock-api-key-xf"
FAKE_TEXT = "Hello from the fake provider."


@pytest.fixture(scope="module")
def primary() -> Iterator[Primary]:
    server = Primary()
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def internal() -> Iterator[FakeProvider]:
    with run_in_thread() as provider:
        yield provider


@pytest.fixture(scope="module")
def bedrock() -> Iterator[FakeBedrock]:
    server = FakeBedrock(AwsIdentity())
    server.api_keys.add(BEDROCK_KEY)
    with serving(server):
        yield server


def _primary(primary: Primary) -> dict[str, Any]:
    return {
        "api": "anthropic",
        "base_url": f"http://127.0.0.1:{primary.port}",
        "credential": {"value": "sk-primary"},
        "connect_timeout_seconds": 1,
    }


def _stack(providers: dict[str, Any], chain: list[Any], url: str) -> Stack:
    config = gateway_config(url)
    config["providers"] = providers
    # `top_k` has no OpenAI equivalent: this route refuses it rather than drop it.
    translation = {"refuse": ["sampling"]}
    config["profiles"] = {"default": {"fallback": chain, "translation": translation}}
    gateway = Stack(config)
    gateway.start()
    return gateway


@pytest.fixture(scope="module")
def stack(primary: Primary, internal: FakeProvider) -> Iterator[Stack]:
    """Anthropic, then the internal OpenAI-compatible model."""
    providers = {
        "primary": _primary(primary),
        "internal": {"api": "openai", "base_url": internal.url, "credential": {"value": "sk-i"}},
    }
    chain = ["primary", {"provider": "internal", "model": INTERNAL_MODEL}]
    gateway = _stack(providers, chain, internal.url)
    yield gateway
    gateway.close()


@pytest.fixture(scope="module")
def cloud_stack(primary: Primary, bedrock: FakeBedrock) -> Iterator[Stack]:
    """Anthropic, then Bedrock (with a Bedrock API key)."""
    providers = {
        "primary": _primary(primary),
        "bedrock": {
            "api": "bedrock",
            "base_url": bedrock.url,
            "credential": {"value": BEDROCK_KEY},
            "cloud": {
                "kind": "bedrock",
                "region": "us-east-1",
                "sigv4": False,
                "models": {BEDROCK_MODEL: BEDROCK_ID},
            },
        },
    }
    chain = ["primary", {"provider": "bedrock", "model": BEDROCK_MODEL}]
    gateway = _stack(providers, chain, bedrock.url)
    yield gateway
    gateway.close()


def _anthropic(base: str, **headers: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="client-key", base_url=base, max_retries=0, default_headers=headers
    )


def _attempts(stack: Stack, request_id: str) -> list[tuple[str, int]]:
    record = _record(stack, request_id)
    return [(a["provider"], a["status"]) for a in record["attempts"]]


def test_an_anthropic_caller_is_answered_by_the_openai_backend_in_its_shape(
    stack: Stack, internal: FakeProvider
) -> None:
    internal.clear()
    client = _anthropic(stack.url, **{"x-flaky-status": "529"})
    raw = client.messages.with_raw_response.create(
        model=ASKED,
        max_tokens=2048,
        system="be brief",
        messages=[{"role": "user", "content": "hi"}],
        thinking={"type": "enabled", "budget_tokens": 1024},  # no such thing at OpenAI
    )
    message = raw.parse()
    assert message.type == "message"
    assert message.content[0].type == "text"
    assert message.content[0].text == FAKE_TEXT
    assert message.stop_reason == "end_turn"
    (call,) = [r for r in internal.received if r.path == "/v1/chat/completions"]
    sent = call.json()
    assert sent["model"] == INTERNAL_MODEL
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert "anthropic-version" not in call.headers
    record = _record(stack, raw.headers["x-gateway-request-id"])
    assert [(a["provider"], a["status"]) for a in record["attempts"]] == [
        ("primary", 529),
        ("internal", 200),
    ]
    assert record["translation"]["provider_api"] == "openai"
    assert record["translation"]["dropped"] == {"reasoning": 1}


def test_an_anthropic_stream_is_answered_by_the_openai_backend_in_its_shape(
    stack: Stack, internal: FakeProvider
) -> None:
    internal.clear()
    client = _anthropic(stack.url, **{"x-flaky-status": "529"})
    with client.messages.stream(
        model=ASKED, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        request_id = stream.response.headers["x-gateway-request-id"]
        types = [event.type for event in stream]
        message = stream.get_final_message()
    assert message.content[0].type == "text"
    assert message.content[0].text == FAKE_TEXT
    assert types[0] == "message_start"
    assert "content_block_delta" in types
    assert types[-1] == "message_stop"
    assert message.usage.output_tokens > 0
    record = _record(stack, request_id)
    assert record["streamed"] is True
    assert [(a["provider"], a["status"]) for a in record["attempts"]] == [
        ("primary", 529),
        ("internal", 200),
    ]


def test_an_openai_caller_is_served_by_the_anthropic_first_provider(stack: Stack) -> None:
    """Attempt 1 translates the OpenAI body for the Anthropic provider; its answer comes
    back as a chat completion."""
    client = openai.OpenAI(api_key="client-key", base_url=f"{stack.url}/v1", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=ASKED, max_tokens=32, messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "from the first provider"
    assert completion.choices[0].finish_reason == "stop"
    assert _attempts(stack, raw.headers["x-gateway-request-id"]) == [("primary", 200)]


def test_an_openai_caller_falls_back_to_the_openai_backend(
    stack: Stack, internal: FakeProvider
) -> None:
    internal.clear()
    client = openai.OpenAI(
        api_key="client-key",
        base_url=f"{stack.url}/v1",
        max_retries=0,
        default_headers={"x-flaky-status": "500"},
    )
    raw = client.chat.completions.with_raw_response.create(
        model=ASKED, max_tokens=32, messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == FAKE_TEXT
    (call,) = [r for r in internal.received if r.path == "/v1/chat/completions"]
    assert call.json()["model"] == INTERNAL_MODEL
    assert _attempts(stack, raw.headers["x-gateway-request-id"]) == [
        ("primary", 500),
        ("internal", 200),
    ]


def test_an_anthropic_caller_falls_back_to_bedrock(
    cloud_stack: Stack, bedrock: FakeBedrock
) -> None:
    stack = cloud_stack
    bedrock.calls.clear()
    client = _anthropic(stack.url, **{"x-flaky-status": "500"})
    raw = client.messages.with_raw_response.create(
        model=ASKED, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    message = raw.parse()
    assert message.content[0].type == "text"
    (call,) = bedrock.calls
    assert call.model_id == BEDROCK_ID
    assert "model" not in call.body
    assert _attempts(stack, raw.headers["x-gateway-request-id"]) == [
        ("primary", 500),
        ("bedrock", 200),
    ]


def test_an_openai_caller_is_refused_a_chain_with_a_provider_it_cannot_reach(
    cloud_stack: Stack,
) -> None:
    """No translator from OpenAI's shape to Bedrock's: 400 wrong_api, before any attempt."""
    client = openai.OpenAI(api_key="client-key", base_url=f"{cloud_stack.url}/v1", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=ASKED, messages=[{"role": "user", "content": "x"}])
    assert caught.value.response.headers["x-gateway-error"] == "wrong_api"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "bedrock" in caught.value.message


def test_a_refused_translation_is_a_400_before_any_attempt(
    stack: Stack, primary: Primary, internal: FakeProvider
) -> None:
    """The route refuses what the internal provider's translation would drop; the first
    provider needs no translation, but the answer must not depend on who answers."""
    internal.clear()
    client = _anthropic(stack.url)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model=ASKED,
            max_tokens=16,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"top_k": 5},
        )
    assert caught.value.response.headers["x-gateway-error"] == "untranslatable"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert "top_k" in caught.value.message
    assert internal.received == []


def test_an_anthropic_stream_falls_back_to_bedrock(
    cloud_stack: Stack, bedrock: FakeBedrock
) -> None:
    """Bedrock streams in AWS event-stream framing; the caller gets Anthropic SSE."""
    bedrock.calls.clear()
    client = _anthropic(cloud_stack.url, **{"x-flaky-status": "529"})
    with client.messages.stream(
        model=ASKED, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        request_id = stream.response.headers["x-gateway-request-id"]
        assert stream.response.headers["content-type"].startswith("text/event-stream")
        message = stream.get_final_message()
    assert message.content[0].type == "text"
    assert message.stop_reason == "end_turn"
    (call,) = bedrock.calls
    assert call.action == "invoke-with-response-stream"
    assert _attempts(cloud_stack, request_id) == [("primary", 529), ("bedrock", 200)]


@pytest.mark.skipif(claude_path() is None, reason="the Claude Code CLI is not installed")
def test_claude_code_is_answered_by_the_openai_backend(
    tmp_path: Path, stack: Stack, internal: FakeProvider
) -> None:
    """Anthropic overloaded: Claude Code's requests are served by the internal model."""
    internal.clear()
    result = run_claude(
        tmp_path,
        *("-p", "hi", "--model", ASKED),
        ANTHROPIC_BASE_URL=stack.url,
        ANTHROPIC_API_KEY="client-key",
        ANTHROPIC_CUSTOM_HEADERS="x-flaky-status: 529",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert FAKE_TEXT in result.stdout
    calls = [r for r in internal.received if r.path == "/v1/chat/completions"]
    assert calls
    assert all(c.json()["model"] == INTERNAL_MODEL for c in calls)
