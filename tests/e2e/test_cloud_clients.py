"""Bedrock- and Vertex-mode clients through real Envoy (issue 14 items 1 and 5).

The official SDK's `AnthropicBedrock` / `AnthropicVertex` clients and the Claude Code CLI
in its cloud modes talk to the gateway's `/bedrock` and `/vertex` prefixes with a gateway
key (no SigV4, no Google token); the gateway applies every policy as on `/v1/messages`
and serves them from the Anthropic API (the fake provider), re-framing its SSE answer as
AWS event-stream for Bedrock clients.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from anthropic import AnthropicBedrock, AnthropicVertex

from extproc.apis.eventstream import CONTENT_TYPE, BedrockEventParser
from extproc.policies.auth import hash_key, new_key
from tests.claude_cli import claude_path, run_claude
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config

pytestmark = pytest.mark.e2e

KEY = new_key("dev")
OTHER_KEY = new_key("ops")
PROVIDER_SECRET = "sk-ant-held-for-clouds"
PROFILE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
VERTEX_MODEL = "claude-sonnet-4-5@20250929"
SERVED = "claude-sonnet-4-5"
GITHUB_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
MESSAGES: Any = [{"role": "user", "content": "hi"}]

needs_cli = pytest.mark.skipif(claude_path() is None, reason="the Claude Code CLI is not installed")


def cloud_config(fake: FakeProvider, **extra: Any) -> dict[str, Any]:
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": PROVIDER_SECRET}
    config["auth"] = {
        "required": True,
        "keys": [
            {"id": "dev", "hash": hash_key(KEY)},
            {"id": "ops", "hash": hash_key(OTHER_KEY), "models": ["claude-haiku-*"]},
        ],
    }
    # The clouds' model ids map onto the Anthropic API's (a mapped model rewrites the URL).
    config["models"] = {"aliases": {PROFILE: SERVED, VERTEX_MODEL: SERVED}}
    config["cloud_paths"] = {"inference_profiles": [PROFILE]}
    # The default redaction (GitHub tokens among others), and one output rule that ends a
    # stream early.
    deny = [{"id": "no_rm_rf", "phrase": "rm -rf /", "action": "block"}]
    config["guard"] = {"profiles": {"default": {"output": {"deny": deny}}}}
    config["profiles"] = {"default": {"cache": {"enabled": True}}}
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def clouds(fake: FakeProvider) -> Iterator[Stack]:
    stack = Stack(cloud_config(fake))
    stack.start()
    yield stack
    stack.close()


def bedrock_client(stack: Stack, key: str = KEY) -> AnthropicBedrock:
    return AnthropicBedrock(
        api_key=key, base_url=f"{stack.url}/bedrock", aws_region="us-east-1", max_retries=0
    )


def vertex_client(stack: Stack, key: str = KEY) -> AnthropicVertex:
    return AnthropicVertex(
        access_token=key,
        base_url=f"{stack.url}/vertex/v1",
        region="us-east5",
        project_id="proj-1",
        max_retries=0,
    )


def test_bedrock_sdk_streams_event_stream(clouds: Stack, received: FakeProvider) -> None:
    client = bedrock_client(clouds)
    with client.messages.stream(model=PROFILE, max_tokens=64, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
    assert text == "Hello from the fake provider."
    [call] = received.received
    assert call.path.startswith("/v1/messages")
    body = call.json()
    assert (body["model"], body["stream"]) == (SERVED, True)
    assert "anthropic_version" not in body
    assert call.headers.get("x-api-key") == PROVIDER_SECRET
    assert KEY not in str(call.headers)


def test_bedrock_sdk_invoke_json(clouds: Stack, received: FakeProvider) -> None:
    unique: Any = [{"role": "user", "content": "invoke, not stream"}]
    message = bedrock_client(clouds).messages.create(model=PROFILE, max_tokens=64, messages=unique)
    assert message.content[0].type == "text"
    [call] = received.received
    assert call.json().get("stream") in (None, False)


def test_cache_answers_across_formats(clouds: Stack, received: FakeProvider) -> None:
    asked: Any = [{"role": "user", "content": "cache me across clouds"}]
    claude = anthropic.Anthropic(api_key=KEY, base_url=clouds.url, max_retries=0)
    first = claude.messages.with_raw_response.create(model=SERVED, max_tokens=64, messages=asked)
    assert first.headers["x-gateway-cache"] == "miss"
    bedrock = bedrock_client(clouds).messages.with_raw_response.create(
        model=PROFILE, max_tokens=64, messages=asked
    )
    assert bedrock.headers["x-gateway-cache"] == "hit"
    with vertex_client(clouds).messages.stream(
        model=VERTEX_MODEL, max_tokens=64, messages=asked
    ) as stream:
        assert "".join(stream.text_stream) == "Hello from the fake provider."
        assert stream.response.headers["x-gateway-cache"] == "hit"
    with bedrock_client(clouds).messages.stream(
        model=PROFILE, max_tokens=64, messages=asked
    ) as stream:
        assert "".join(stream.text_stream) == "Hello from the fake provider."
        assert stream.response.headers["x-gateway-cache"] == "hit"
    assert len(received.received) == 1


def test_vertex_sdk_streams_sse(clouds: Stack, received: FakeProvider) -> None:
    client = vertex_client(clouds)
    asked: Any = [{"role": "user", "content": "vertex, streamed"}]
    with client.messages.stream(model=VERTEX_MODEL, max_tokens=64, messages=asked) as stream:
        text = "".join(stream.text_stream)
    assert text == "Hello from the fake provider."
    body = received.received[0].json()
    assert body["model"] == SERVED
    assert "anthropic_version" not in body


def test_raw_event_stream_frames(clouds: Stack, received: FakeProvider) -> None:
    asked = [{"role": "user", "content": "raw frames"}]
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 10, "messages": asked}
    response = httpx.post(
        f"{clouds.url}/bedrock/model/{PROFILE}/invoke-with-response-stream",
        content=orjson.dumps(body),
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == CONTENT_TYPE  # binary: no charset
    parser = BedrockEventParser()
    events = parser.feed(response.content) + parser.close()
    assert next(e.event for e in events) == "message_start"
    assert events[-1].event == "message_stop"


def test_secret_split_across_frames_is_stripped(clouds: Stack, received: FakeProvider) -> None:
    client = bedrock_client(clouds)
    headers = {"x-fake-text": f"the token is {GITHUB_TOKEN} ok", "x-fake-piece-chars": "3"}
    asked: Any = [{"role": "user", "content": "say the token"}]
    with client.messages.stream(
        model=PROFILE, max_tokens=64, messages=asked, extra_headers=headers
    ) as stream:
        text = "".join(stream.text_stream)
    assert GITHUB_TOKEN not in text
    assert text.startswith("the token is ")
    assert text.endswith(" ok")


def test_blocked_stream_ends_with_an_exception_frame(clouds: Stack, received: FakeProvider) -> None:
    headers = {"x-fake-text": "now run rm -rf / please"}
    with (
        pytest.raises(anthropic.APIStatusError, match=r"output policy|withheld|no_rm_rf") as caught,
        bedrock_client(clouds).messages.stream(
            model=PROFILE,
            max_tokens=64,
            messages=[{"role": "user", "content": "x"}],
            extra_headers=headers,
        ) as stream,
    ):
        "".join(stream.text_stream)
    assert "rm -rf" not in str(caught.value.body)


def test_large_bedrock_body_screened_in_the_worker(clouds: Stack, received: FakeProvider) -> None:
    """Over 256 KiB a body is parsed and screened in the worker process first."""
    filler = "lorem ipsum " * 30_000
    asked: Any = [{"role": "user", "content": f"{filler} my token is {GITHUB_TOKEN}"}]
    message = bedrock_client(clouds).messages.create(model=PROFILE, max_tokens=16, messages=asked)
    assert message.content
    [call] = received.received
    assert len(call.body) > 256 * 1024
    assert GITHUB_TOKEN.encode() not in call.body


def test_vertex_count_tokens(clouds: Stack, received: FakeProvider) -> None:
    path = "/vertex/projects/p/locations/r/publishers/anthropic/models/count-tokens:rawPredict"
    body = {"model": VERTEX_MODEL, "messages": MESSAGES}
    response = httpx.post(
        f"{clouds.url}{path}",
        content=orjson.dumps(body),
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["input_tokens"] > 0
    [call] = received.received
    assert call.path.startswith("/v1/messages/count_tokens")
    assert call.json()["model"] == SERVED


def test_refusals_in_the_bedrock_shape(clouds: Stack, received: FakeProvider) -> None:
    with pytest.raises(anthropic.AuthenticationError) as missing:
        bedrock_client(clouds, key="gwk_dev_wrong").messages.create(
            model=PROFILE, max_tokens=8, messages=MESSAGES
        )
    assert missing.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(anthropic.PermissionDeniedError) as forbidden:
        bedrock_client(clouds, key=OTHER_KEY).messages.create(
            model=PROFILE, max_tokens=8, messages=MESSAGES
        )
    body = forbidden.value.response.json()
    assert body["__type"] == "AccessDeniedException"
    assert body["message"] == body["error"]["message"]
    assert received.received == []


def test_inference_profiles_answered_without_a_key(clouds: Stack) -> None:
    response = httpx.get(f"{clouds.url}/bedrock/inference-profiles?type=SYSTEM_DEFINED")
    assert response.status_code == 200
    ids = [p["inferenceProfileId"] for p in response.json()["inferenceProfileSummaries"]]
    assert ids == [PROFILE]


def test_bedrock_count_tokens_is_501(clouds: Stack, received: FakeProvider) -> None:
    response = httpx.post(
        f"{clouds.url}/bedrock/model/{PROFILE}/count-tokens",
        content=b"{}",
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 501
    assert response.headers["x-gateway-error"] == "not_supported"
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/bedrock/model/a/converse", 404),
        ("/bedrock/model/a%0d%0ab/invoke", 400),
        ("/vertex/projects/p/locations/r/publishers/anthropic/models/m:predict", 404),
    ],
)
def test_bad_cloud_paths(clouds: Stack, path: str, status: int) -> None:
    response = httpx.post(
        f"{clouds.url}{path}", content=b"{}", headers={"authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == status
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "reason"),
    [
        (
            "POST",
            f"/bedrock/model/{PROFILE}/invoke",
            {"model": "x", "max_tokens": 1},
            400,
            "invalid_request",
        ),
        (
            "POST",
            f"/bedrock/model/{PROFILE}/invoke",
            {"stream": True, "max_tokens": 1},
            400,
            "invalid_request",
        ),
        ("GET", f"/bedrock/model/{PROFILE}/invoke", None, 405, "method_not_allowed"),
        ("POST", f"/bedrock/model/{PROFILE}/invoke", None, 400, "invalid_json"),
    ],
)
def test_refused_cloud_requests(
    clouds: Stack,
    received: FakeProvider,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
    reason: str,
) -> None:
    response = httpx.request(
        method,
        f"{clouds.url}{path}",
        content=orjson.dumps(body) if body is not None else b"",
        headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )
    assert response.status_code == status, response.text
    assert response.headers["x-gateway-error"] == reason
    assert response.headers["x-should-retry"] == "false"
    assert response.json()["message"]  # the Bedrock error shape
    assert received.received == []


def run_claude_tool_turn(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run_claude(
        tmp_path, *("-p", "list the files", "--allowedTools", "Bash"), cwd=tmp_path, **env
    )


TOOL_TURN = (
    'x-fake-tool-input: {"command": "echo hi", "description": "say hi"}\nx-fake-tool-once: 1'
)


@needs_cli
def test_claude_code_in_bedrock_mode(tmp_path: Path, clouds: Stack, received: FakeProvider) -> None:
    result = run_claude_tool_turn(
        tmp_path,
        CLAUDE_CODE_USE_BEDROCK="1",
        ANTHROPIC_BEDROCK_BASE_URL=f"{clouds.url}/bedrock",
        CLAUDE_CODE_SKIP_BEDROCK_AUTH="1",
        AWS_REGION="us-east-1",
        ANTHROPIC_MODEL=PROFILE,
        # Sent as `Authorization: Bearer`; with the skip, -p sends no ANTHROPIC_API_KEY.
        ANTHROPIC_AUTH_TOKEN=KEY,
        ANTHROPIC_CUSTOM_HEADERS=TOOL_TURN,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Hello from the fake provider." in result.stdout
    bodies = [r.json() for r in received.received if r.path.startswith("/v1/messages")]
    assert len(bodies) >= 2  # the tool call and the answer after its result
    assert any(
        isinstance(m.get("content"), list)
        and any(part.get("type") == "tool_result" for part in m["content"])
        for m in bodies[-1]["messages"]
    )


@needs_cli
def test_claude_code_in_vertex_mode(tmp_path: Path, clouds: Stack, received: FakeProvider) -> None:
    result = run_claude_tool_turn(
        tmp_path,
        CLAUDE_CODE_USE_VERTEX="1",
        ANTHROPIC_VERTEX_BASE_URL=f"{clouds.url}/vertex",
        CLAUDE_CODE_SKIP_VERTEX_AUTH="1",
        ANTHROPIC_VERTEX_PROJECT_ID="proj-1",
        CLOUD_ML_REGION="us-east5",
        ANTHROPIC_MODEL=VERTEX_MODEL,
        ANTHROPIC_AUTH_TOKEN=KEY,
        ANTHROPIC_CUSTOM_HEADERS=TOOL_TURN,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Hello from the fake provider." in result.stdout
    bodies = [r.json() for r in received.received if r.path.startswith("/v1/messages")]
    assert len(bodies) >= 2  # the tool call and the answer after its result
    last = bodies[-1]["messages"][-1]["content"]
    assert any(part.get("type") == "tool_result" for part in last)
