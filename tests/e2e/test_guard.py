"""Guardrails both ways through real Envoy, as real clients see them: the SDKs' stream
parsing of screened answers and replays, and the Claude Code CLI.

The guard's contracts (redaction, blocking rules, injection, output screening, schemas)
are tested at the service layer: tests/service/test_guard.py."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anthropic
import openai
import orjson
import pytest

from tests.claude_cli import claude_env, claude_path
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config

EMAIL = "alice.liddell@contoso.io"  # example.* domains are documentation: not flagged


@pytest.fixture(scope="module")
def guarded(fake: FakeProvider) -> Iterator[Stack]:
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": "sk-held"}
    config["guard"] = {
        "hash_key": {"value": "test-hash-key"},
        "profiles": {
            "default": {
                "actions": {"pem_private_key": "block"},
                "masking": {"enabled": True, "kinds": ["pii"]},
                "injection": {"action": "block"},
                "output": {"deny": [{"id": "no_rm_rf", "phrase": "rm -rf /", "action": "block"}]},
            }
        },
    }
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


@pytest.mark.parametrize("stream", [False, True])
def test_masked_pii_round_trips_through_the_sdk(
    guarded: Stack, received: FakeProvider, stream: bool
) -> None:
    client = anthropic.Anthropic(
        api_key="caller-key",
        base_url=guarded.url,
        max_retries=0,
        default_headers={"x-fake-echo": "1", "x-fake-piece-chars": "2"},
    )
    prompt: Any = [{"role": "user", "content": f"Write to {EMAIL} about the outage"}]
    if stream:
        with client.messages.stream(model="claude-opus-4-8", max_tokens=50, messages=prompt) as s:
            text = "".join(s.text_stream)
    else:
        message = client.messages.create(model="claude-opus-4-8", max_tokens=50, messages=prompt)
        text = message.content[0].text  # type: ignore[union-attr]
    sent = received.received[0].body.decode()
    assert EMAIL not in sent  # the provider never sees it
    assert text == f"Write to {EMAIL} about the outage"  # the user does


GH = "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"  # shaped like a GitHub token


@pytest.fixture(scope="module")
def guarded_cache(fake: FakeProvider) -> Iterator[Stack]:
    config = gateway_config(fake.url)
    config["guard"] = {"profiles": {"default": {}}}
    config["profiles"] = {"default": {"cache": {"enabled": True}}}
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


def test_streamed_tool_calls_are_screened_and_replayed_screened(
    guarded_cache: Stack, received: FakeProvider
) -> None:
    """A secret in a streamed tool call, split across deltas after an escaped line break,
    never reaches the client, live or from the cache, and the input stays valid JSON."""
    tool_input = orjson.dumps({"command": f"git push\n{GH}", GH: "key"}).decode()
    fake_headers = {"x-fake-tool-input": tool_input, "x-fake-piece-chars": "3"}
    client = anthropic.Anthropic(api_key="k", base_url=guarded_cache.url, max_retries=0)
    ask: Any = {
        "model": "claude-opus-4-8",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "push it"}],
    }
    with client.messages.stream(**ask, extra_headers=fake_headers) as stream:
        live = stream.get_final_message()
    replay = client.messages.with_raw_response.create(**ask, extra_headers=fake_headers)
    assert replay.headers["x-gateway-cache"] == "hit"
    assert len(received.received) == 1
    for message in (live, replay.parse()):
        (block,) = message.content
        assert block.type == "tool_use"
        tool = cast(dict[str, Any], block.model_dump()["input"])
        (key,) = [k for k in tool if k != "command"]
        assert tool["command"].startswith("git push\n[REDACTED:github_token:")
        assert key.startswith("[REDACTED:github_token:")
        assert GH not in orjson.dumps(tool).decode()


def test_streamed_openai_tool_arguments_are_screened(
    guarded_cache: Stack, received: FakeProvider
) -> None:
    arguments = orjson.dumps({"cmd": f"export GH={GH}"}).decode()
    client = openai.OpenAI(api_key="k", base_url=f"{guarded_cache.url}/v1", max_retries=0)
    messages: Any = [{"role": "user", "content": "export it"}]
    headers = {"x-fake-tool-input": arguments, "x-fake-piece-chars": "4"}
    stream = client.chat.completions.create(
        model="gpt-5", messages=messages, stream=True, extra_headers=headers
    )
    pieces = []
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                if call.function is not None and call.function.arguments:
                    pieces.append(call.function.arguments)
    got = orjson.loads("".join(pieces))
    assert got["cmd"].startswith("export GH=[REDACTED:github_token:")
    assert len(received.received) == 1


def test_a_real_claude_code_session_passes_the_guard_untouched(
    guarded: Stack, received: FakeProvider, tmp_path: Path
) -> None:
    """The CLI's real request (system prompt, tools and their schemas, reminders) goes
    through every field the walker scans without a single redaction or block."""
    cli = claude_path()
    if cli is None:
        pytest.skip("the Claude Code CLI is not installed (scripts/test installs it)")
    env = claude_env(tmp_path, ANTHROPIC_BASE_URL=guarded.url, ANTHROPIC_API_KEY="caller-key")
    done = subprocess.run(
        [cli, "-p", "say hello"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert "Hello from the fake provider" in done.stdout.decode()
    sent = [r for r in received.received if r.path.startswith("/v1/messages")]
    assert sent
    for request in sent:
        assert b"[REDACTED:" not in request.body
        assert b'"tools"' in request.body or b"count_tokens" in request.path.encode()
