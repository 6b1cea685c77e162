"""`extproc serve --workers N`: processes sharing the port and a password-protected Redis."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx

from tests.fake_provider import FakeProvider
from tests.harness import Stack, child_pids, gateway_config
from tests.redis_server import RedisServer

BODY = {"model": "claude-opus-4-8", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "caller-key"}


def _served(stack: Stack) -> float:
    metrics = stack.metrics_text()
    pattern = r'^extproc_requests_total\{.*status="200".*\} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, metrics, re.M))


def test_workers_share_the_port_redis_and_metrics(fake: FakeProvider, tmp_path: Path) -> None:
    password_file = tmp_path / "redis-password"
    password_file.write_text("s3cret-from-a-mounted-file\n")
    with RedisServer(password="s3cret-from-a-mounted-file") as redis:
        config = gateway_config(
            fake.url, store=redis.url, store_password={"file": str(password_file)}
        )
        config["profiles"] = {"default": {"cache": {"enabled": True}}}
        stack = Stack(config)
        try:
            stack.start_extproc("--workers", "2")
            stack.start_envoy()
            supervisor = stack.processes["extproc"]
            deadline = time.monotonic() + 10  # until the supervisor has forked its workers
            while len(workers := child_pids(supervisor.pid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(workers) == 2
            fake.clear()
            with httpx.Client(base_url=stack.url, timeout=10) as client:
                statuses = [
                    client.post("/v1/messages", json=BODY, headers=HEADERS).status_code
                    for _ in range(20)
                ]
            assert statuses == [200] * 20
            deadline = time.monotonic() + 5
            while (served := _served(stack)) < 20 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert served == 20  # the supervisor sums every worker's counters
            # One provider call: the cache in Redis served every repeat, whichever worker
            # Envoy's connections landed on.
            assert len(fake.received) == 1
        finally:
            stack.close()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            assert time.monotonic() < deadline, "a worker outlived the supervisor"
            time.sleep(0.05)
