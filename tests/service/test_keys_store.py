"""Store-managed gateway keys at the service layer: two gateway replicas sharing one store,
on one test clock, so key-cache, overlap and expiry bounds are crossed by advancing time
instead of sleeping past them. Moved from tests/e2e/test_keys_store.py (which keeps the
CLI against a real redis-server across two Envoy stacks)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import pytest

from extproc import admin_cli
from extproc.store import ManualClock
from extproc.store.memory import MemoryStore
from tests.service.harness import ClientReply, ServiceStack, service_config

BODY = {"model": "claude-opus-4-8", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
CACHE_SECONDS = 3


@pytest.fixture
async def replicas() -> AsyncIterator[list[ServiceStack]]:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    config = service_config(auth={"required": True, "cache_seconds": CACHE_SECONDS})
    config["providers"]["anthropic"]["credential"] = {"value": "sk-held"}
    stacks = [ServiceStack(config, clock=clock, store=store) for _ in range(2)]
    yield stacks
    for stack in stacks:
        await stack.close()


async def call(stack: ServiceStack, key: str) -> ClientReply:
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    return await stack.drive("POST", "/v1/messages", json=BODY, headers=headers)


async def statuses(stacks: list[ServiceStack], key: str) -> list[int]:
    return [(await call(stack, key)).status for stack in stacks]


async def create(stack: ServiceStack, key_id: str, expires: str | None = None) -> str:
    """`extproc keys create --id ID --team ci [--expires EXPIRES]`, at the shared store."""
    args = argparse.Namespace(
        id=key_id, user=None, team="ci", project=None, tier=None, models=None, label=[]
    )
    args.expires = expires
    return await admin_cli.create(stack.gateway.store, args, stack.clock.time())


async def rotate(stack: ServiceStack, key_id: str, overlap: str = "0s") -> str:
    """`extproc keys rotate ID --overlap OVERLAP`, at the store the replicas share."""
    seconds = admin_cli.parse_duration(overlap)
    return await admin_cli.rotate(stack.gateway.store, key_id, seconds, stack.clock.time())


def past_the_key_cache(stack: ServiceStack) -> None:
    stack.clock.advance(CACHE_SECONDS + 0.5)


async def test_revocation_reaches_every_replica_within_the_key_cache(
    replicas: list[ServiceStack],
) -> None:
    key = await create(replicas[0], "pipeline-7")
    assert await statuses(replicas, key) == [200, 200]
    await admin_cli.revoke(replicas[1].gateway.store, "pipeline-7")
    past_the_key_cache(replicas[0])
    assert await statuses(replicas, key) == [401, 401]


async def test_rotate_with_overlap_then_without(replicas: list[ServiceStack]) -> None:
    old = await create(replicas[0], "rotating")
    new = await rotate(replicas[0], "rotating", overlap="1h")
    assert new != old
    past_the_key_cache(replicas[0])
    assert [(await call(replicas[0], old)).status, (await call(replicas[0], new)).status] == [
        200,
        200,
    ]
    newest = await rotate(replicas[0], "rotating")
    past_the_key_cache(replicas[0])
    assert await statuses(replicas, new) == [401, 401]
    assert (await call(replicas[1], newest)).status == 200


async def test_the_overlap_ends(replicas: list[ServiceStack]) -> None:
    old = await create(replicas[0], "overlapping")
    new = await rotate(replicas[0], "overlapping", overlap="1h")
    replicas[0].clock.advance(3600 + 1)
    assert await statuses(replicas, old) == [401, 401]
    assert await statuses(replicas, new) == [200, 200]


async def test_expiry_from_the_cli(replicas: list[ServiceStack]) -> None:
    key = await create(replicas[0], "short", expires="2s")
    assert (await call(replicas[0], key)).status == 200
    replicas[0].clock.advance(2.5)
    response = await call(replicas[1], key)
    assert response.status == 401
    assert "expired" in response.error["message"]
