"""Store-managed gateway keys via the CLI, across two replicas sharing one redis-server.

Rotation overlaps, expiry and the key-cache bound are tested at the service layer on a
test clock (tests/service/test_keys_store.py) instead of sleeping past them here."""

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
