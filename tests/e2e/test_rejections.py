"""Every way the gateway refuses a request, through real Envoy: status, shape, nothing upstream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.e2e.test_data_path import record_for
from tests.fake_provider import FakeProvider
from tests.harness import Stack

ANTHROPIC = {
    "anthropic-version": "2023-06-01",
    "x-api-key": "k",
    "content-type": "application/json",
}
OPENAI = {"authorization": "Bearer k", "content-type": "application/json"}


def _anthropic_error(response: httpx.Response, status: int, error_type: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    message: str = body["error"]["message"]
    assert message
    return message


def _openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["message"]
    assert error["type"]
    return error


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"", "empty"),
        (b'{"model": 42, "messages": []}', "'model' must be a string"),
        (b'{"model": null, "messages": []}', "'model' is required"),
        (b'{"messages": []}', "'model' is required"),
        (b'{"model": "claude\\r\\nx-injected: 1", "messages": []}', "line breaks"),
        (b'{"model": "claude\\u0000", "messages": []}', "control characters"),
        (b'{"model": "' + b"a" * 300 + b'", "messages": []}', "at most 256"),
        (b'{"model": "claude-opus-4-8", "stream": "yes", "messages": []}', "'stream'"),
    ],
)
def test_bad_anthropic_bodies_get_400(
    http: httpx.Client, received: FakeProvider, body: bytes, fragment: str
) -> None:
    response = http.post("/v1/messages", content=body, headers=ANTHROPIC)
    assert fragment in _anthropic_error(response, 400, "invalid_request_error")
    assert "x-injected" not in response.headers
    assert received.received == []


def test_bad_openai_body_gets_400_in_openai_shape(
    http: httpx.Client, received: FakeProvider
) -> None:
    response = http.post("/v1/chat/completions", content=b"{oops", headers=OPENAI)
    error = _openai_error(response, 400)
    assert error["code"] == "invalid_json"
    assert received.received == []


def test_sdk_raises_its_typed_error(claude: anthropic.Anthropic, oai: openai.OpenAI) -> None:
    with pytest.raises(anthropic.BadRequestError, match="'model'"):
        claude.messages.create(model="bad model", max_tokens=1, messages=[])
    with pytest.raises(openai.BadRequestError, match="'model'"):
        oai.chat.completions.create(model="bad\nmodel", messages=[])


def test_unsupported_path_404_and_wrong_method_405(
    http: httpx.Client, received: FakeProvider
) -> None:
    _anthropic_error(http.get("/v1/complete", headers=ANTHROPIC), 404, "not_found_error")
    _openai_error(http.post("/v1/embeddings", json={}, headers=OPENAI), 404)
    message = _anthropic_error(
        http.get("/v1/messages", headers=ANTHROPIC), 405, "invalid_request_error"
    )
    assert "POST" in message
    assert received.received == []


def test_body_over_limit_by_content_length_is_413(
    http: httpx.Client, received: FakeProvider
) -> None:
    big = b'{"model": "claude-opus-4-8", "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    response = http.post("/v1/messages", content=big, headers=ANTHROPIC)
    assert "max_body_bytes" in _anthropic_error(response, 413, "request_too_large")
    assert received.received == []


def test_chunked_body_over_limit_is_413_json(http: httpx.Client, received: FakeProvider) -> None:
    """Without content-length Envoy's buffer limit trips; its reply is rewritten to JSON."""

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "claude-opus-4-8", "pad": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    response = http.post("/v1/messages", content=chunks(), headers=ANTHROPIC)
    assert response.status_code == 413
    assert response.json()["type"] == "error"
    response = http.post("/v1/chat/completions", content=chunks(), headers=OPENAI)
    assert response.status_code == 413
    assert response.json()["error"]["message"]
    assert received.received == []


def test_duplicate_keys_get_400_naming_the_key(http: httpx.Client, received: FakeProvider) -> None:
    body = b'{"model": "claude-haiku-4-5", "max_tokens": 5, "model": "claude-opus-4-8"}'
    message = _anthropic_error(
        http.post("/v1/messages", content=body, headers=ANTHROPIC), 400, "invalid_request_error"
    )
    assert "'model'" in message
    body = b'{"model": "gpt-5", "messages": [{"role": "user", "content": "a", "content": "b"}]}'
    error = _openai_error(http.post("/v1/chat/completions", content=body, headers=OPENAI), 400)
    assert (error["code"], "'content'" in error["message"]) == ("duplicate_key", True)
    assert received.received == []


def test_many_values_are_checked_in_the_worker_and_forwarded(
    http: httpx.Client, received: FakeProvider
) -> None:
    """30,000 values: over the in-loop bound, so the server's worker process checks it."""
    blocks = [{"type": "text", "text": str(i)} for i in range(10_000)]
    body = {
        "model": "claude-opus-4-8",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": blocks}],
    }
    response = http.post("/v1/messages", json=body, headers=ANTHROPIC, timeout=60)
    assert response.status_code == 200, response.text
    assert len(received.received) == 1


def test_rejections_are_audited(http: httpx.Client, stack: Stack) -> None:
    response = http.post("/v1/messages", content=b"{", headers=ANTHROPIC)
    request_id = response.headers["x-gateway-request-id"]
    assert response.headers["x-gateway-error"] == "invalid_json"
    record = record_for(stack, request_id)
    assert record["status"] == 400
    assert record["outcome"] == "rejected_invalid_json"
