"""Anthropic clients served by Bedrock and Vertex with gateway-held cloud credentials.

Real Envoy and ext_proc; the fake Bedrock recomputes every SigV4 signature with botocore
from the request it received, the fake Vertex accepts only tokens its fake Google token
endpoint issued for the service account key's RS256 assertion. Clients: the official
`anthropic` SDK and the Claude Code CLI with a plain ANTHROPIC_BASE_URL.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import pytest

from tests.claude_cli import claude_path, run_claude
from tests.cloud_fakes import (
    AwsIdentity,
    FakeBedrock,
    FakeClaudePlatformAws,
    FakeFoundry,
    FakeGoogle,
    serving,
)
from tests.harness import Stack, listen_config

pytestmark = pytest.mark.e2e

KEY_ID, SECRET = "AKIAGATEWAYKEY000001", "gateway-held-secret"
SONNET_BEDROCK = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
TEXT = "Hello from the fake provider."


@dataclass
class Fakes:
    bedrock: FakeBedrock
    google: FakeGoogle
    foundry: FakeFoundry
    platform: FakeClaudePlatformAws


@dataclass
class Clouds(Fakes):
    stack: Stack


def _config(fakes: Fakes, key_file: Path) -> dict[str, object]:
    bedrock, google = fakes.bedrock, fakes.google
    return {
        **listen_config(),
        "providers": {
            "bedrock": {
                "api": "bedrock",
                "base_url": bedrock.url,
                "cloud": {
                    "kind": "bedrock",
                    "region": "us-east-1",
                    "models": {"claude-sonnet-4-5": SONNET_BEDROCK},
                },
            },
            "vertex": {
                "api": "vertex",
                "base_url": google.url,
                "cloud": {
                    "kind": "vertex",
                    "project": "my-project",
                    "region": "us-east5",
                    "key_file": str(key_file),
                    "models": {"claude-haiku-4-5": "claude-haiku-4-5@20251001"},
                },
            },
            "foundry": {
                "api": "anthropic",
                "base_url": f"{fakes.foundry.url}/anthropic",
                "credential": {"value": "foundry-key"},
                "cloud": {"kind": "foundry"},
            },
            "claude-aws": {
                "api": "anthropic",
                "base_url": fakes.platform.url,
                "cloud": {
                    "kind": "claude_platform_aws",
                    "region": "us-west-2",
                    "workspace_id": "wrkspc_01gateway",
                },
            },
        },
        "models": {
            "routes": [
                {"match": "claude-opus-4-8", "provider": "foundry"},
                {"match": "claude-opus-4-1", "provider": "claude-aws"},
                {"match": "claude-haiku-*", "provider": "vertex"},
                {"match": "*", "provider": "bedrock"},
            ]
        },
    }


@pytest.fixture(scope="module")
def clouds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clouds]:
    identity = AwsIdentity()
    identity.static(KEY_ID, SECRET)
    bedrock, google = FakeBedrock(identity), FakeGoogle()
    foundry, platform = FakeFoundry("foundry-key"), FakeClaudePlatformAws(identity)
    workdir = tmp_path_factory.mktemp("clouds")
    with serving(bedrock, google, foundry, platform):
        key_file = workdir / "service-account.json"
        key_file.write_text(json.dumps(google.new_key()))
        fakes = Fakes(bedrock, google, foundry, platform)
        stack = Stack(_config(fakes, key_file), workdir)
        saved = dict(os.environ)
        # The gateway process's AWS chain finds these (env is the chain's first source).
        os.environ.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        try:
            stack.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        yield Clouds(bedrock, google, foundry, platform, stack)
        stack.close()


@pytest.fixture
def client(clouds: Clouds) -> anthropic.Anthropic:
    clouds.bedrock.calls.clear()
    clouds.bedrock.refused.clear()
    clouds.google.calls.clear()
    return anthropic.Anthropic(api_key="client-key", base_url=clouds.stack.url, max_retries=0)


def test_a_stream_from_bedrock_is_signed_and_reaches_the_client_as_sse(
    clouds: Clouds, client: anthropic.Anthropic
) -> None:
    with client.messages.stream(
        model="claude-sonnet-4-5",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        # The first is Anthropic-API-only: Bedrock would answer 400 "invalid beta flag".
        extra_headers={"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"},
    ) as stream:
        text = stream.get_final_text()
        final = stream.get_final_message()
    assert text == TEXT
    assert final.usage.output_tokens > 0
    assert clouds.bedrock.refused == []
    (call,) = clouds.bedrock.calls
    assert call.model_id == SONNET_BEDROCK
    assert call.action == "invoke-with-response-stream"
    assert call.body["anthropic_beta"] == ["interleaved-thinking-2025-05-14"]
    assert call.access_key == KEY_ID
    assert "client-key" not in json.dumps(call.headers)
    record = _audit_record(clouds.stack, stream.response.headers["x-gateway-request-id"])
    assert record["provider"] == "bedrock"
    assert record["served_model"] == "claude-sonnet-4-5-20250929"  # as Bedrock answers
    assert record["output_tokens"] == final.usage.output_tokens
    assert record["cost_usd"] is not None


def _audit_record(stack: Stack, request_id: str) -> dict[str, object]:
    """The audit record of one request (written when its stream closes: polled)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [r for r in stack.audit_records() if r.get("request_id") == request_id]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no audit record for {request_id}")


def test_a_json_answer_from_bedrock(clouds: Clouds, client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text"
    assert message.content[0].text == TEXT
    (call,) = clouds.bedrock.calls
    assert call.action == "invoke"


def test_count_tokens_on_bedrock_is_501_not_supported_and_not_retried(
    clouds: Clouds, client: anthropic.Anthropic
) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.count_tokens(
            model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 501
    assert caught.value.response.headers["x-gateway-error"] == "not_supported"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert clouds.bedrock.calls == []


def test_a_model_without_a_bedrock_id_is_a_clear_400(
    clouds: Clouds, client: anthropic.Anthropic
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="claude-sonnet-9", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert "no Bedrock id" in str(caught.value)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert clouds.bedrock.calls == []


def test_a_stream_from_vertex_carries_a_google_token(
    clouds: Clouds, client: anthropic.Anthropic
) -> None:
    with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        assert stream.get_final_text() == TEXT
    (call,) = clouds.google.calls
    assert call.model_id == "claude-haiku-4-5@20251001"
    assert call.action == "streamRawPredict"
    assert (call.project, call.region) == ("my-project", "us-east5")
    assert call.headers["authorization"].removeprefix("Bearer ") in clouds.google.tokens


def test_foundry_gets_its_api_key_never_the_callers(
    clouds: Clouds, client: anthropic.Anthropic
) -> None:
    clouds.foundry.received.clear()
    message = client.messages.create(
        model="claude-opus-4-8", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text"
    (headers,) = clouds.foundry.received
    assert headers["x-api-key"] == "foundry-key"
    assert headers["api-key"] == "foundry-key"
    assert "authorization" not in headers


def test_claude_platform_on_aws_is_signed_and_names_the_workspace(
    clouds: Clouds, client: anthropic.Anthropic
) -> None:
    clouds.platform.received.clear()
    with client.messages.stream(
        model="claude-opus-4-1", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        assert stream.get_final_text() == TEXT
    assert clouds.platform.refused == []
    (headers,) = clouds.platform.received
    assert headers["anthropic-workspace-id"] == "wrkspc_01gateway"
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=" + KEY_ID)
    assert "x-api-key" not in headers


needs_cli = pytest.mark.skipif(claude_path() is None, reason="Claude Code CLI not installed")


def _claude(clouds: Clouds, home: Path, model: str, *extra: str, **env: str) -> str:
    result = run_claude(
        home,
        *("-p", "hi", "--model", model, *extra),
        ANTHROPIC_BASE_URL=clouds.stack.url,
        ANTHROPIC_API_KEY="k",
        **env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_cli
def test_claude_code_with_a_plain_base_url_is_served_by_bedrock(
    clouds: Clouds, tmp_path: Path
) -> None:
    clouds.bedrock.calls.clear()
    assert TEXT in _claude(clouds, tmp_path, "claude-sonnet-4-5")
    assert clouds.bedrock.refused == []
    assert any(c.action == "invoke-with-response-stream" for c in clouds.bedrock.calls)


@needs_cli
def test_claude_code_runs_a_tool_turn_through_bedrock(clouds: Clouds, tmp_path: Path) -> None:
    clouds.bedrock.calls.clear()
    headers = 'x-fake-tool-input: {"command": "echo tool-ran"}\nx-fake-tool-once: 1'
    out = _claude(
        clouds, tmp_path, "claude-sonnet-4-5", "--allowedTools", "Bash",
        ANTHROPIC_CUSTOM_HEADERS=headers,
    )  # fmt: skip
    assert TEXT in out
    turns = [c for c in clouds.bedrock.calls if c.action == "invoke-with-response-stream"]
    results = [
        block
        for call in turns
        for message in call.body["messages"]
        if isinstance(message["content"], list)
        for block in message["content"]
        if block.get("type") == "tool_result"
    ]
    assert results, "the CLI never sent the tool's result back"
    assert "tool-ran" in json.dumps(results)
    assert clouds.bedrock.refused == []


@needs_cli
def test_claude_code_with_a_plain_base_url_is_served_by_vertex(
    clouds: Clouds, tmp_path: Path
) -> None:
    clouds.google.calls.clear()
    assert TEXT in _claude(clouds, tmp_path, "claude-haiku-4-5")
    assert any(c.model_id == "claude-haiku-4-5@20251001" for c in clouds.google.calls)


# --------------------------------------------------------------------------- credential failures


def _bedrock_only(
    bedrock: FakeBedrock, env: dict[str, str], workdir: Path, **provider: object
) -> Stack:
    config: dict[str, object] = {
        **listen_config(),
        "metrics_listen": None,
        "providers": {
            "bedrock": {
                "api": "bedrock",
                "base_url": bedrock.url,
                "cloud": {"kind": "bedrock", "region": "us-east-1", "inference_profile": "us"},
                **provider,
            }
        },
        "models": {"routes": [{"match": "*", "provider": "bedrock"}]},
    }
    stack = Stack(config, workdir)
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(
        AWS_CONFIG_FILE=str(workdir / "no-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(workdir / "no-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        **env,
    )
    try:
        return stack.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)


MODEL_ID = "anthropic.claude-sonnet-4-5-20250929-v1:0"


def test_no_aws_credentials_anywhere_is_503_no_credential_not_retried(
    clouds: Clouds, tmp_path: Path
) -> None:
    clouds.bedrock.calls.clear()
    stack = _bedrock_only(clouds.bedrock, {}, tmp_path)
    try:
        client = anthropic.Anthropic(api_key="k", base_url=stack.url, max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as caught:
            client.messages.create(
                model=MODEL_ID, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        stack.close()
    assert caught.value.status_code == 503
    assert caught.value.response.headers["x-gateway-error"] == "no_credential"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert clouds.bedrock.calls == []


def test_a_bedrock_api_key_instead_of_sigv4(clouds: Clouds, tmp_path: Path) -> None:
    clouds.bedrock.calls.clear()
    clouds.bedrock.api_keys.add("bedrock-api-key-1")
    stack = _bedrock_only(
        clouds.bedrock,
        {},
        tmp_path,
        credential={"value": "bedrock-api-key-1"},
        cloud={"kind": "bedrock", "region": "us-east-1", "sigv4": False},
    )
    try:
        client = anthropic.Anthropic(api_key="k", base_url=stack.url, max_retries=0)
        message = client.messages.create(
            model=MODEL_ID, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    finally:
        stack.close()
    assert message.content[0].type == "text"
    (call,) = clouds.bedrock.calls
    assert call.headers["authorization"] == "Bearer bedrock-api-key-1"
    assert "x-amz-date" not in call.headers


def test_a_bedrock_refusal_reaches_the_client_in_the_anthropic_shape(
    clouds: Clouds, tmp_path: Path
) -> None:
    env = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    stack = _bedrock_only(clouds.bedrock, env, tmp_path)
    try:
        client = anthropic.Anthropic(api_key="k", base_url=stack.url, max_retries=0)
        with pytest.raises(anthropic.PermissionDeniedError) as caught:
            client.messages.create(
                model=MODEL_ID, max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        stack.close()
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "permission_error"
    assert "signature" in body["error"]["message"]
    assert "does not match" in clouds.bedrock.refused[-1]
