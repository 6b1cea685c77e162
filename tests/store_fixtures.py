"""Pytest fixtures for stores; import them into a test module to use them.

`redis_server`   one redis-server for the session (skips when not installed)
`fresh_redis`    a redis-server of the test's own, for outage tests that kill it
`harness`        parametrized over ["memory", "redis"]: a store on a ManualClock,
                 emptied before each test, plus `advance(seconds)` which moves the
                 clock and, for Redis, also sleeps so Redis-side TTLs move too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from extproc.store import ManualClock, Store
from extproc.store.memory import MemoryStore
from extproc.store.redis import RedisStore
from tests.redis_server import RedisServer, redis_server_binary

__all__ = ["StoreHarness", "flush", "fresh_redis", "harness", "redis_server"]


def _server() -> RedisServer:
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    for _ in range(3):  # a free port can be taken between probe and bind
        server = RedisServer()
        try:
            server.start()
        except RuntimeError:
            server.stop()
            continue
        return server
    raise RuntimeError("could not start redis-server")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = _server()
    yield server
    server.stop()


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    server = _server()
    yield server
    server.stop()


async def flush(url: str) -> None:
    """Empty the database behind `url` with a throwaway client."""
    client = Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


@dataclass
class StoreHarness:
    kind: str
    store: Store
    clock: ManualClock
    server: RedisServer | None = None

    async def advance(self, seconds: float) -> None:
        """Move the store's time; Redis keeps its own TTL clock, so sleep for it too."""
        self.clock.advance(seconds)
        if self.kind == "redis":
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", "redis"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[StoreHarness]:
    clock = ManualClock()
    if request.param == "memory":
        result = StoreHarness("memory", MemoryStore(clock=clock), clock)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        await flush(server.url)
        result = StoreHarness("redis", RedisStore.from_url(server.url, clock=clock), clock, server)
    yield result
    await result.store.close()
