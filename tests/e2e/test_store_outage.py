"""redis-server taken away under load: no crash, no hang, the configured failure mode,
and correct counters once it is back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from extproc.policies.auth import hash_key, new_key
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config
from tests.redis_server import RedisServer

KEY = new_key("load")
BODY = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "hi"}],
}
HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": KEY}


def _stack(fake: FakeProvider, redis: RedisServer, fail_open: bool) -> Stack:
    config = gateway_config(fake.url, store=redis.url)
    config["providers"]["anthropic"]["credential"] = {"value": "sk-held"}
    config["auth"] = {
        "required": True,
        "keys": [{"id": "load", "hash": hash_key(KEY), "team": "t"}],
    }
    config["budgets"] = {
        "fail_open": fail_open,
        # A reservation caught in flight by the outage expires quickly in this test.
        "reservation_ttl_seconds": 4,
        "rules": [{"scope": "team", "window": "daily", "tokens": 10_000_000}],
    }
    return Stack(config)


class Load:
    """A client thread sending requests back to back, recording (status, seconds)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.results: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.stack.url, timeout=30) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                status = client.post("/v1/messages", json=BODY, headers=HEADERS).status_code
                self.results.append((status, time.monotonic() - started))

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(60)

    def since(self, index: int) -> list[int]:
        return [status for status, _ in self.results[index:]]

    def wait_for(self, count: int, since: int = 0, timeout: float = 20.0) -> None:
        """Until `count` requests have completed after `since` (bounded): a phase of the
        test lasts as many requests as it needs, not a fixed time."""
        deadline = time.monotonic() + timeout
        while len(self.results) - since < count:
            assert time.monotonic() < deadline, f"fewer than {count} requests in {timeout} s"
            time.sleep(0.02)

    def wait_until_ok(self, timeout: float = 20.0) -> None:
        """Until a request that started after this call has succeeded (bounded)."""
        start = len(self.results) + 1  # the one in flight now may still fail
        deadline = time.monotonic() + timeout
        while 200 not in self.since(start):
            assert time.monotonic() < deadline, f"no request succeeded in {timeout} s"
            time.sleep(0.02)


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def _used(stack: Stack) -> int:
    report = httpx.get(f"{stack.url}/v1/gateway/quota", headers=HEADERS, timeout=10).json()
    (budget,) = report["budgets"]
    used: int = budget["used"]
    return used


def _spent(stack: Stack) -> int:
    settled = [r for r in stack.audit_records() if r["outcome"] == "ok"]
    return sum(r["input_tokens"] + r["output_tokens"] for r in settled)


@pytest.mark.parametrize("outage", ["kill", "pause"])
def test_fail_closed_then_recover(fake: FakeProvider, redis: RedisServer, outage: str) -> None:
    stack = _stack(fake, redis, fail_open=False)
    try:
        stack.start()
        with Load(stack) as load:
            load.wait_for(5)
            assert set(load.since(0)) == {200}
            mark = len(load.results)
            redis.kill() if outage == "kill" else redis.pause()
            load.wait_for(3, since=mark + 1)
            during = load.since(mark + 1)  # the request in flight at the cut may go either way
            redis.start() if outage == "kill" else redis.resume()
            load.wait_until_ok()  # the gateway is back on the store
            after = len(load.results)
            load.wait_for(5, since=after)
        assert during, "requests must keep completing while the store is down"
        assert set(during) == {503}
        assert max(seconds for _, seconds in load.results) < 5  # bounded, never hangs
        assert set(load.since(after)) == {200}
        assert stack.processes["extproc"].poll() is None  # no crash
        if outage == "pause":  # data kept: the counters reconcile with what was settled
            # A reserve sent into the paused server runs when it resumes although the
            # gateway had given up on it (503): the gateway releases it by id once the
            # store answers again (an expired hold would count as spent).
            deadline = time.monotonic() + 10
            while _used(stack) != _spent(stack) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _used(stack) == _spent(stack)
    finally:
        stack.close()


def test_fail_open_lets_requests_through_and_counts_them(
    fake: FakeProvider, redis: RedisServer
) -> None:
    stack = _stack(fake, redis, fail_open=True)
    try:
        stack.start()
        redis.kill()
        response = httpx.post(f"{stack.url}/v1/messages", json=BODY, headers=HEADERS, timeout=10)
        assert response.status_code == 200
        assert 'extproc_store_errors_total{operation="admit_fail_open"}' in stack.metrics_text()
    finally:
        stack.close()
