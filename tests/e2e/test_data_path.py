"""The data path through real Envoy + the ext_proc server, driven by the official SDKs."""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.e2e.conftest import PROVIDER_SECRET
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config

MODEL = "claude-opus-4-8"
MESSAGES: Any = [{"role": "user", "content": "Say hello"}]


def record_for(stack: Stack, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for record in stack.audit_records():
            if record["request_id"] == request_id:
                return record
        time.sleep(0.05)
    raise AssertionError(f"no audit record for {request_id}")


def test_messages_json_reaches_provider_and_is_accounted(
    claude: anthropic.Anthropic, stack: Stack, received: FakeProvider
) -> None:
    raw = claude.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=64,
        messages=MESSAGES,
        extra_headers={"X-Claude-Code-Session-Id": "session-123"},
    )
    message = raw.parse()
    assert message.content[0].type == "text"
    assert message.content[0].text == "Hello from the fake provider."
    record = record_for(stack, raw.headers["x-gateway-request-id"])
    assert record["session_id"] == "session-123"
    assert record["outcome"] == "ok"
    assert record["status"] == 200
    assert record["streamed"] is False
    assert record["requested_model"] == MODEL
    assert record["served_model"] == MODEL
    assert record["provider"] == "anthropic"
    assert record["input_tokens"] == message.usage.input_tokens > 0
    assert record["output_tokens"] == message.usage.output_tokens == 5
    assert record["latency_ms"] > 0
    assert "prompt" not in record


def test_headers_reach_provider_unchanged_and_credential_is_swapped(
    claude: anthropic.Anthropic, received: FakeProvider
) -> None:
    claude.messages.create(
        model=MODEL,
        max_tokens=16,
        messages=MESSAGES,
        extra_headers={
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "prompt-caching-2024-07-31,interleaved-thinking-2025-05-14",
            "x-custom-header": "kept",
        },
    )
    (request,) = received.received
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["anthropic-beta"] == (
        "prompt-caching-2024-07-31,interleaved-thinking-2025-05-14"
    )
    assert request.headers["x-custom-header"] == "kept"
    assert request.headers["x-api-key"] == PROVIDER_SECRET
    assert "client-key" not in str(request.headers)
    assert "x-gateway-cluster" not in request.headers


def test_cache_control_blocks_pass_through_byte_identical(
    claude: anthropic.Anthropic, received: FakeProvider
) -> None:
    system: Any = [
        {"type": "text", "text": "You are a reviewer.", "cache_control": {"type": "ephemeral"}}
    ]
    message = claude.messages.create(model=MODEL, max_tokens=16, system=system, messages=MESSAGES)
    (request,) = received.received
    assert request.json()["system"] == system
    assert message.usage.cache_creation_input_tokens


def test_messages_stream_is_accounted(
    claude: anthropic.Anthropic, stack: Stack, received: FakeProvider
) -> None:
    with claude.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["x-gateway-request-id"]
    assert text == "Hello from the fake provider."
    record = record_for(stack, request_id)
    assert record["streamed"] is True
    assert record["outcome"] == "ok"
    assert record["input_tokens"] == final.usage.input_tokens
    assert record["output_tokens"] == final.usage.output_tokens == 5
    assert record["ttft_ms"] is not None
    assert 0 < record["ttft_ms"] <= record["latency_ms"]


def test_usage_survives_awkward_sse_chunking(
    claude: anthropic.Anthropic, stack: Stack, received: FakeProvider
) -> None:
    """Events split across body chunks and `data:` without its space still parse."""
    text = "one two three four five six seven eight nine ten"
    with claude.messages.stream(
        model=MODEL,
        max_tokens=64,
        messages=MESSAGES,
        extra_headers={"x-fake-chunking": "split", "x-fake-text": text},
    ) as stream:
        final = stream.get_final_message()
        request_id = stream.response.headers["x-gateway-request-id"]
    record = record_for(stack, request_id)
    assert record["output_tokens"] == final.usage.output_tokens == 10
    assert record["input_tokens"] == final.usage.input_tokens


def test_stream_is_not_buffered(claude: anthropic.Anthropic, received: FakeProvider) -> None:
    """With a slow provider the client sees the first event long before the last."""
    started = time.monotonic()
    arrivals: list[float] = []
    with claude.messages.stream(
        model=MODEL,
        max_tokens=64,
        messages=MESSAGES,
        extra_headers={"x-fake-delay-ms": "300"},
    ) as stream:
        for _event in stream:
            arrivals.append(time.monotonic() - started)
    total = arrivals[-1]
    assert total > 2.0  # about ten events, 300 ms apart
    assert arrivals[0] < 0.5 * total


def test_count_tokens_and_models(claude: anthropic.Anthropic, stack: Stack) -> None:
    count = claude.messages.count_tokens(model=MODEL, messages=MESSAGES)
    assert count.input_tokens > 0
    models = [model.id for model in claude.models.list()]
    assert MODEL in models
    assert claude.models.retrieve(MODEL).id == MODEL


def test_openai_chat_json_and_stream(oai: openai.OpenAI, stack: Stack) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="gpt-5", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the fake provider."
    record = record_for(stack, raw.headers["x-gateway-request-id"])
    assert completion.usage is not None
    assert record["api"] == "openai"
    assert record["provider"] == "openai"
    assert record["input_tokens"] == completion.usage.prompt_tokens
    assert record["output_tokens"] == completion.usage.completion_tokens

    chunks = oai.chat.completions.create(
        model="gpt-5", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    usage = None
    with chunks:
        request_id = chunks.response.headers["x-gateway-request-id"]
        text = ""
        for chunk in chunks:
            usage = chunk.usage or usage
            text += "".join(choice.delta.content or "" for choice in chunk.choices)
    assert text == "Hello from the fake provider."
    record = record_for(stack, request_id)
    assert usage is not None
    assert record["streamed"] is True
    assert record["output_tokens"] == usage.completion_tokens
    assert record["input_tokens"] == usage.prompt_tokens


def test_openai_models_list(oai: openai.OpenAI) -> None:
    assert "gpt-5" in [model.id for model in oai.models.list()]


def test_provider_errors_pass_through_and_are_audited(
    claude: anthropic.Anthropic, stack: Stack
) -> None:
    with pytest.raises(anthropic.RateLimitError) as caught:
        claude.messages.create(
            model=MODEL, max_tokens=8, messages=MESSAGES, extra_headers={"x-fake-status": "429"}
        )
    assert caught.value.response.headers.get("retry-after")
    record = record_for(stack, caught.value.response.headers["x-gateway-request-id"])
    assert record["status"] == 429
    assert record["outcome"] == "provider_error"
    assert record["error_type"] == "rate_limit_error"


def test_client_gone_mid_stream_is_audited_as_client_abort(stack: Stack) -> None:
    body = {"model": MODEL, "max_tokens": 64, "stream": True, "messages": MESSAGES}
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01", "x-fake-delay-ms": "400"}
    with (
        httpx.Client(base_url=stack.url) as client,
        client.stream("POST", "/v1/messages", json=body, headers=headers) as response,
    ):
        request_id = response.headers["x-gateway-request-id"]
        next(response.iter_bytes())
    record = record_for(stack, request_id)
    assert record["outcome"] == "client_abort"
    assert record["input_tokens"] > 0


def test_metrics_are_exported(claude: anthropic.Anthropic, stack: Stack) -> None:
    claude.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES)
    text = stack.metrics_text(wait_for="extproc_time_to_first_token_seconds_bucket")
    assert 'extproc_requests_total{api="anthropic",endpoint="messages"' in text
    assert 'extproc_tokens_total{model="claude-opus-4-8",provider="anthropic",type="input"}' in text
    assert "extproc_request_duration_seconds_bucket" in text
    assert "extproc_time_to_first_token_seconds_bucket" in text
    assert "extproc_active_streams" in text


def test_bodies_past_grpc_default_message_size_pass_intact(fake: FakeProvider) -> None:
    """A 6 MB request (Claude Code with images) crosses the 4 MB gRPC default intact."""
    stack = Stack(gateway_config(fake.url))  # default limits.max_body_bytes: 32 MiB
    try:
        stack.start()
        fake.clear()
        big = "x" * (6 * 1024 * 1024)
        body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": big}]}
        headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
        response = httpx.post(f"{stack.url}/v1/messages", json=body, headers=headers, timeout=60)
    finally:
        stack.close()
    assert response.status_code == 200, response.text
    assert fake.received[0].json()["messages"][0]["content"] == big
