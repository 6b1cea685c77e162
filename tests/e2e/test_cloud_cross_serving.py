"""Bedrock- and Vertex-mode clients served by Bedrock and Vertex upstreams through real
Envoy (issue 14 items 1 and 5): the developer's cloud-mode client holds only a gateway
key; the gateway signs upstream with its own AWS identity (the fake Bedrock recomputes
every SigV4 signature) or Google token, and a team can move a cloud-mode client from one
cloud to the other (or to the Anthropic API) without touching developer machines.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from aiohttp import web
from anthropic import AnthropicBedrock, AnthropicVertex

from extproc.apis.eventstream import CONTENT_TYPE as EVENT_STREAM
from extproc.policies.auth import hash_key, new_key
from tests.claude_cli import claude_path, run_claude
from tests.cloud_fakes import (
    AwsIdentity,
    BedrockCall,
    FakeBedrock,
    FakeGoogle,
    bedrock_chunk,
    serving,
)
from tests.harness import Stack, listen_config

pytestmark = pytest.mark.e2e

KEY = new_key("dev")
KEY_ID, SECRET = "AKIAGATEWAYKEY000002", "gateway-held-secret-2"
PROFILE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
VERTEX_SONNET = "claude-sonnet-4-5@20250929"
VERTEX_HAIKU = "claude-haiku-4-5@20251001"
TEXT = "Hello from the fake provider."
GITHUB_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"

needs_cli = pytest.mark.skipif(claude_path() is None, reason="the Claude Code CLI is not installed")


class BrokenBedrock(FakeBedrock):
    """The fake Bedrock, whose stream breaks on request: `x-fake-broken-frames: corrupt`
    flips a byte in the third frame, `truncate` ends the stream inside it."""

    async def _answer(self, request: web.Request, call: BedrockCall) -> web.StreamResponse:
        mode = call.headers.get("x-fake-broken-frames")
        if mode is None:
            return await super()._answer(request, call)
        message: dict[str, Any] = {
            "id": "msg_x",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 3, "output_tokens": 1},
        }
        start = {"type": "message_start", "message": message}
        text_block = {"type": "text", "text": ""}
        block = {"type": "content_block_start", "index": 0, "content_block": text_block}
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}
        third = bedrock_chunk({**delta, "delta": {"type": "text_delta", "text": "lost"}})
        if mode == "corrupt":
            third = third[:20] + bytes((third[20] ^ 1,)) + third[21:]
        else:
            third = third[:25]
        response = web.StreamResponse(headers={"content-type": EVENT_STREAM})
        await response.prepare(request)
        for frame in (bedrock_chunk(start), bedrock_chunk(block), third):
            await response.write(frame)
        await response.write_eof()
        return response


@dataclass
class Clouds:
    bedrock: FakeBedrock
    google: FakeGoogle
    stack: Stack


def _config(bedrock: FakeBedrock, google: FakeGoogle, key_file: Path) -> dict[str, Any]:
    return {
        **listen_config(),
        "providers": {
            "bedrock": {
                "api": "bedrock",
                "base_url": bedrock.url,
                "cloud": {
                    "kind": "bedrock",
                    "region": "us-east-1",
                    "models": {"claude-sonnet-4-5": PROFILE},
                },
            },
            "vertex": {
                "api": "vertex",
                "base_url": google.url,
                "cloud": {
                    "kind": "vertex",
                    "project": "gateway-project",
                    "region": "us-east5",
                    "key_file": str(key_file),
                },
            },
        },
        "auth": {"required": True, "keys": [{"id": "dev", "hash": hash_key(KEY)}]},
        # Every client's sonnet is one model to the gateway: priced, budgeted and cached
        # as claude-sonnet-4-5, served by Bedrock (whose adapter maps it back to PROFILE).
        "models": {
            "aliases": {PROFILE: "claude-sonnet-4-5", VERTEX_SONNET: "claude-sonnet-4-5"},
            "routes": [
                {"match": "claude-haiku-*", "provider": "vertex"},
                {"match": "*", "provider": "bedrock"},
            ],
        },
        "budgets": {"rules": [{"scope": "key", "id": "dev", "window": "daily", "tokens": 10**6}]},
        "guard": {},
    }


@pytest.fixture(scope="module")
def clouds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clouds]:
    identity = AwsIdentity()
    identity.static(KEY_ID, SECRET)
    bedrock, google = BrokenBedrock(identity), FakeGoogle()
    workdir = tmp_path_factory.mktemp("cross")
    with serving(bedrock, google):
        key_file = workdir / "service-account.json"
        key_file.write_text(json.dumps(google.new_key()))
        stack = Stack(_config(bedrock, google, key_file), workdir)
        saved = dict(os.environ)
        os.environ.update(AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
        try:
            stack.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        yield Clouds(bedrock, google, stack)
        stack.close()


@pytest.fixture
def fresh(clouds: Clouds) -> Clouds:
    clouds.bedrock.calls.clear()
    clouds.bedrock.refused.clear()
    clouds.google.calls.clear()
    return clouds


def bedrock_client(stack: Stack) -> AnthropicBedrock:
    return AnthropicBedrock(
        api_key=KEY, base_url=f"{stack.url}/bedrock", aws_region="us-east-1", max_retries=0
    )


def vertex_client(stack: Stack) -> AnthropicVertex:
    return AnthropicVertex(
        access_token=KEY,
        base_url=f"{stack.url}/vertex/v1",
        region="europe-west1",
        project_id="developer-project",
        max_retries=0,
    )


def ask(text: str) -> Any:
    return [{"role": "user", "content": text}]


def test_bedrock_client_served_by_bedrock(fresh: Clouds) -> None:
    client = bedrock_client(fresh.stack)
    with client.messages.stream(
        model=PROFILE,
        max_tokens=64,
        messages=ask("bedrock to bedrock"),
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEXT
    assert final.usage.output_tokens > 0
    assert fresh.bedrock.refused == []
    [call] = fresh.bedrock.calls
    assert (call.model_id, call.action) == (PROFILE, "invoke-with-response-stream")
    assert call.access_key == KEY_ID  # signed with the gateway's identity
    assert call.body["anthropic_version"] == "bedrock-2023-05-31"
    assert call.body["anthropic_beta"] == ["interleaved-thinking-2025-05-14"]
    assert "model" not in call.body
    assert "stream" not in call.body
    assert KEY not in str(call.headers)


def _record_where(
    stack: Stack, before: int, wanted: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first audit record after the first `before` that `wanted` picks (polled: a
    record is written after the answer has left)."""
    deadline = time.monotonic() + 10
    while True:
        found = [r for r in stack.audit_records()[before:] if wanted(r)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, "no such audit record within 10 s"
        time.sleep(0.05)


def _used_tokens(stack: Stack) -> int:
    report = httpx.get(
        f"{stack.url}/v1/gateway/quota", headers={"authorization": f"Bearer {KEY}"}, timeout=10
    )
    assert report.status_code == 200, report.text
    [budget] = report.json()["budgets"]
    return int(budget["used"])


def test_budget_and_audit_from_the_event_stream(fresh: Clouds) -> None:
    before = len(fresh.stack.audit_records())
    used_before = _used_tokens(fresh.stack)  # audited too: two records to wait for
    with bedrock_client(fresh.stack).messages.stream(
        model=PROFILE, max_tokens=64, messages=ask("count my spend")
    ) as stream:
        usage = stream.get_final_message().usage
    record = _record_where(fresh.stack, before, lambda r: r["path"].startswith("/bedrock/"))
    assert (record["api"], record["provider"]) == ("bedrock", "bedrock")
    assert record["requested_model"] == PROFILE
    assert (record["input_tokens"], record["output_tokens"]) == (
        usage.input_tokens,
        usage.output_tokens,
    )
    assert record["cost_usd"] > 0  # priced as claude-sonnet-4-5, the gateway's name for it
    assert record["outcome"] == "ok"
    # The key's token budget was charged what the event stream's usage said (settled
    # after the answer left: polled).
    charged = usage.input_tokens + usage.output_tokens
    deadline = time.monotonic() + 10
    while _used_tokens(fresh.stack) - used_before != charged:
        assert time.monotonic() < deadline, "the budget was not charged the stream's usage"
        time.sleep(0.05)


def test_secret_split_across_event_stream_frames(fresh: Clouds) -> None:
    headers = {"x-fake-text": f"it is {GITHUB_TOKEN} now", "x-fake-piece-chars": "2"}
    with bedrock_client(fresh.stack).messages.stream(
        model=PROFILE, max_tokens=64, messages=ask("leak it"), extra_headers=headers
    ) as stream:
        text = "".join(stream.text_stream)
    assert GITHUB_TOKEN not in text
    assert text.startswith("it is ")
    assert text.endswith(" now")


@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
def test_a_broken_upstream_event_stream_is_withheld(fresh: Clouds, mode: str) -> None:
    """Frames that fail their CRC (or end mid-frame) never reach the client as content:
    the stream under way ends with an exception frame the SDK raises, audited as such."""
    before = len(fresh.stack.audit_records())
    session = f"broken-frames-{mode}"
    with (
        pytest.raises(anthropic.APIStatusError, match="not a valid AWS event stream"),
        bedrock_client(fresh.stack).messages.stream(
            model=PROFILE,
            max_tokens=64,
            messages=ask(f"break it: {mode}"),
            # The session id marks this request's record: another test's late record for
            # a /bedrock/ path may land after `before` is counted.
            extra_headers={"x-fake-broken-frames": mode, "x-claude-code-session-id": session},
        ) as stream,
    ):
        "".join(stream.text_stream)
    record = _record_where(fresh.stack, before, lambda r: r["session_id"] == session)
    assert record["outcome"] != "ok"
    assert record["error_type"] == "undecodable_answer"


def test_vertex_client_served_by_vertex(fresh: Clouds) -> None:
    with vertex_client(fresh.stack).messages.stream(
        model=VERTEX_HAIKU, max_tokens=64, messages=ask("vertex to vertex")
    ) as stream:
        assert "".join(stream.text_stream) == TEXT
    [call] = fresh.google.calls
    # The gateway's project and region, not the developer's: it holds the identity.
    assert (call.project, call.region) == ("gateway-project", "us-east5")
    assert (call.model_id, call.action) == (VERTEX_HAIKU, "streamRawPredict")
    assert call.body["anthropic_version"] == "vertex-2023-10-16"


def test_vertex_client_served_by_bedrock(fresh: Clouds) -> None:
    """A team moves its Vertex-mode developers onto Bedrock in the gateway config only."""
    with vertex_client(fresh.stack).messages.stream(
        model=VERTEX_SONNET, max_tokens=64, messages=ask("vertex to bedrock")
    ) as stream:
        assert "".join(stream.text_stream) == TEXT
    [call] = fresh.bedrock.calls
    assert call.model_id == PROFILE
    assert call.body["anthropic_version"] == "bedrock-2023-05-31"
    assert fresh.google.calls == []


def test_bedrock_client_json_invoke(fresh: Clouds) -> None:
    message = bedrock_client(fresh.stack).messages.create(
        model=PROFILE, max_tokens=64, messages=ask("json please")
    )
    assert message.content[0].type == "text"
    [call] = fresh.bedrock.calls
    assert call.action == "invoke"


@needs_cli
def test_claude_code_bedrock_mode_served_by_bedrock(tmp_path: Path, fresh: Clouds) -> None:
    """The rollout the issue describes: Claude Code in Bedrock mode with a gateway key,
    the gateway signing with its IAM identity; a tool-using turn."""
    tool_turn = (
        'x-fake-tool-input: {"command": "echo hi", "description": "hi"}\nx-fake-tool-once: 1'
    )
    result = run_claude(
        tmp_path,
        *("-p", "say hi with a tool", "--allowedTools", "Bash"),
        cwd=tmp_path,
        CLAUDE_CODE_USE_BEDROCK="1",
        ANTHROPIC_BEDROCK_BASE_URL=f"{fresh.stack.url}/bedrock",
        CLAUDE_CODE_SKIP_BEDROCK_AUTH="1",
        AWS_REGION="us-east-1",
        ANTHROPIC_MODEL=PROFILE,
        ANTHROPIC_AUTH_TOKEN=KEY,
        ANTHROPIC_CUSTOM_HEADERS=tool_turn,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert TEXT in result.stdout
    assert fresh.bedrock.refused == []
    streamed = [c for c in fresh.bedrock.calls if c.action == "invoke-with-response-stream"]
    assert len(streamed) >= 2
    last = streamed[-1].body["messages"][-1]["content"]
    assert any(part.get("type") == "tool_result" for part in last)
