"""Store-managed gateway keys via the CLI, across two replicas sharing one redis-server."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config
from tests.redis_server import RedisServer

BODY = {"model": "claude-opus-4-8", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def replicas(fake: FakeProvider, redis: RedisServer) -> Iterator[list[Stack]]:
    stacks = []
    try:
        for _ in range(2):
            config = gateway_config(fake.url, store=redis.url)
            config["auth"] = {"required": True, "cache_seconds": 3}
            config["providers"]["anthropic"]["credential"] = {"value": "sk-held"}
            stacks.append(Stack(config).start())
        yield stacks
    finally:
        for stack in stacks:
            stack.close()


def keys(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "extproc", "keys", "--config", str(stack.config_path), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def status(stack: Stack, key: str) -> int:
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return httpx.post(
        f"{stack.url}/v1/messages", json=BODY, headers=headers, timeout=10
    ).status_code


def wait_until_refused(stacks: list[Stack], key: str, limit: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit + 2:
        if all(status(stack, key) == 401 for stack in stacks):
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError("a replica still accepts the key")


def test_create_list_revoke_across_replicas(replicas: list[Stack]) -> None:
    created = keys(
        replicas[0], "create", "--id", "pipeline-7", "--team", "ci", "--models", "claude-*"
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("gwk_pipeline-7_")
    assert [status(stack, key) for stack in replicas] == [200, 200]

    listed = keys(replicas[0], "list")
    assert '"id":"pipeline-7"' in listed.stdout
    assert key not in listed.stdout
    assert "sha256" not in listed.stdout

    duplicate = keys(replicas[0], "create", "--id", "pipeline-7")
    assert duplicate.returncode == 2
    assert "already exists" in duplicate.stderr

    revoked = keys(replicas[1], "revoke", "pipeline-7")
    assert revoked.returncode == 0, revoked.stderr
    assert wait_until_refused(replicas, key, limit=5) <= 5


def test_rotate_with_overlap_then_without(replicas: list[Stack]) -> None:
    old = keys(replicas[0], "create", "--id", "rotating").stdout.strip()
    new = keys(replicas[0], "rotate", "rotating", "--overlap", "1h").stdout.strip()
    assert new != old
    time.sleep(3.5)  # past auth.cache_seconds
    assert [status(replicas[0], old), status(replicas[0], new)] == [200, 200]
    newest = keys(replicas[0], "rotate", "rotating").stdout.strip()
    wait_until_refused(replicas, new, limit=5)
    assert status(replicas[1], newest) == 200


def test_expiry_from_the_cli(replicas: list[Stack]) -> None:
    key = keys(replicas[0], "create", "--id", "short", "--expires", "2s").stdout.strip()
    assert status(replicas[0], key) == 200
    time.sleep(2.5)
    response = httpx.post(
        f"{replicas[1].url}/v1/messages",
        json=BODY,
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        timeout=10,
    )
    assert response.status_code == 401
    assert "expired" in response.json()["error"]["message"]


def test_keys_need_a_shared_store(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"store": "memory://"}))
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "keys", "--config", str(config), "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "keys generate" in result.stderr
