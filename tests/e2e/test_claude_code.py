"""Claude Code on day one (issue 12): the CLI itself, and what it sends, through real Envoy.

The CLI retries a 401 and every 5xx ten times with backoff unless the answer carries
`x-should-retry: false`; these tests run it against the gateway the way a new user would.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc.policies.auth import hash_key, new_key
from tests.claude_cli import claude_env, claude_path
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config

KEY = new_key("dev")
PROVIDER_SECRET = "sk-ant-held"
MESSAGES: Any = [{"role": "user", "content": "hi"}]
HEADERS = {"anthropic-version": "2023-06-01"}

needs_cli = pytest.mark.skipif(claude_path() is None, reason="the Claude Code CLI is not installed")


@pytest.fixture(scope="module")
def keyed(fake: FakeProvider) -> Iterator[Stack]:
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": PROVIDER_SECRET}
    config["auth"] = {"required": True, "keys": [{"id": "dev", "hash": hash_key(KEY)}]}
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


def run_claude(
    tmp_path: Path, stack: Stack, **env: str
) -> tuple[subprocess.CompletedProcess[str], float]:
    """`claude -p hi` through the stack; the result and how long it took."""
    cli = claude_path()
    assert cli is not None
    environment = claude_env(tmp_path, ANTHROPIC_BASE_URL=stack.url, **env)
    started = time.monotonic()
    result = subprocess.run(
        [cli, "-p", "hi", "--model", "claude-sonnet-4-6"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, time.monotonic() - started


# -- item 3: refusals say whether a retry can help ------------------------------------------


@needs_cli
def test_cli_with_a_wrong_key_fails_fast(
    tmp_path: Path, keyed: Stack, received: FakeProvider
) -> None:
    result, elapsed = run_claude(tmp_path, keyed, ANTHROPIC_API_KEY="gwk_dev_mistyped")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert elapsed < 5, f"the CLI took {elapsed:.1f}s: it retried a refusal"
    assert "invalid gateway key" in output
    assert received.received == []


@needs_cli
def test_cli_with_the_right_key_answers(
    tmp_path: Path, keyed: Stack, received: FakeProvider
) -> None:
    result, _ = run_claude(tmp_path, keyed, ANTHROPIC_API_KEY=KEY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Hello from the fake provider." in result.stdout


@needs_cli
def test_cli_with_both_variables_set_to_the_same_key_answers(
    tmp_path: Path, keyed: Stack, received: FakeProvider
) -> None:
    result, _ = run_claude(tmp_path, keyed, ANTHROPIC_API_KEY=KEY, ANTHROPIC_AUTH_TOKEN=KEY)
    assert result.returncode == 0, result.stdout + result.stderr
    (request,) = [r for r in received.received if r.path == "/v1/messages"][-1:]
    assert request.headers["x-api-key"] == PROVIDER_SECRET
    assert "authorization" not in request.headers


@needs_cli
def test_cli_with_two_different_keys_is_told_which_variables(
    tmp_path: Path, keyed: Stack, received: FakeProvider
) -> None:
    result, elapsed = run_claude(
        tmp_path, keyed, ANTHROPIC_API_KEY=KEY, ANTHROPIC_AUTH_TOKEN="gwk_dev_other"
    )
    assert result.returncode != 0
    assert elapsed < 5
    assert received.received == []
    headers = {**HEADERS, "x-api-key": KEY, "authorization": "Bearer gwk_dev_other"}
    body = {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": MESSAGES}
    response = httpx.post(f"{keyed.url}/v1/messages", json=body, headers=headers, timeout=10)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "ANTHROPIC_API_KEY" in message
    assert "ANTHROPIC_AUTH_TOKEN" in message
    assert response.headers["x-should-retry"] == "false"
