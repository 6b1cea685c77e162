"""The response cache at the service layer: the servicer driven as Envoy would drive it
(tests/service/harness.py), on a test clock. Moved from tests/e2e/test_cache.py with their
assertions; the e2e file keeps what needs Envoy or a real client: the SDK stream replays,
single-flight through Envoy's message timeout, the purge CLI against Redis.

Single-flight is made deterministic here: the fake provider holds the first call until
every follower is known to be waiting (each asked Envoy for more time with
`override_message_timeout`), instead of assuming who won a race after a fixed sleep."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest

from extproc.apis import anthropic as anthropic_api
from extproc.apis.sse import SseParser
from extproc.policies.auth import hash_key, new_key
from extproc.store.redis import RedisStore
from tests.data.claude_code_request import build_request
from tests.redis_server import RedisServer
from tests.service.harness import ClientReply, ServiceStack, service_config, until

KEYS = {name: new_key(name) for name in ("alpha-1", "alpha-2", "beta-1")}
HEADERS = {"anthropic-version": "2023-06-01"}


def _config() -> dict[str, Any]:
    config = service_config()
    config["providers"]["anthropic"]["credential"] = {"value": "sk-held"}
    config["providers"]["openai"]["credential"] = {"value": "sk-held"}
    config["profiles"] = {"default": {"cache": {"enabled": True, "ttl_seconds": 300}}}
    config["cache"] = {"wait_seconds": 20}
    config["auth"] = {
        "keys": [
            {"id": "alpha-1", "hash": hash_key(KEYS["alpha-1"]), "team": "alpha"},
            {"id": "alpha-2", "hash": hash_key(KEYS["alpha-2"]), "team": "alpha"},
            {"id": "beta-1", "hash": hash_key(KEYS["beta-1"]), "team": "beta"},
        ]
    }
    return config


@pytest.fixture
async def cached() -> AsyncIterator[ServiceStack]:
    stack = ServiceStack(_config())
    yield stack
    await stack.close()


async def post(
    stack: ServiceStack, body: dict[str, Any], key: str = "alpha-1", **headers: str
) -> ClientReply:
    all_headers = {**HEADERS, "x-api-key": KEYS[key], **headers}
    return await stack.drive("POST", "/v1/messages", json=body, headers=all_headers)


def fold(response: ClientReply) -> dict[str, Any]:
    """The answer as JSON, whether it came as JSON or as an Anthropic SSE stream."""
    if response.headers["content-type"].startswith("application/json"):
        answer: dict[str, Any] = response.json()
        return answer
    parser, accumulator = SseParser(), anthropic_api.StreamAccumulator()
    for event in parser.feed(response.body) + parser.close():
        accumulator.feed(event)
    return accumulator.folded_message()


def body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def record_for(stack: ServiceStack, reply: ClientReply) -> dict[str, Any]:
    request_id = reply.headers["x-gateway-request-id"]
    (record,) = [r for r in stack.records if r["request_id"] == request_id]
    return record


async def test_claude_code_sized_request_hits_across_runs(cached: ServiceStack) -> None:
    first = build_request()
    second = copy.deepcopy(first)
    second["metadata"] = {"user_id": "user_abc_account__session_another-run"}
    assert first["metadata"] != second["metadata"]
    miss = await post(cached, first)
    assert miss.headers["x-gateway-cache"] == "miss"
    cached.clock.advance(30)
    hit = await post(cached, second)
    assert hit.status == 200
    assert hit.headers["x-gateway-cache"] == "hit"
    assert int(hit.headers["age"]) == 30  # the test clock moved 30 s
    assert hit.headers["content-type"] == miss.headers["content-type"]
    assert fold(hit) == fold(miss)
    assert len(cached.fake.received) == 1
    record = record_for(cached, hit)
    assert record["outcome"] == "cache_hit"
    assert record["input_tokens"] == fold(miss)["usage"]["input_tokens"] > 20_000
    labels = {"model": first["model"], "type": "input"}
    saved = cached.metrics.registry.get_sample_value("extproc_cache_saved_tokens_total", labels)
    assert saved == record["input_tokens"]


async def test_an_entry_expires_with_its_ttl(cached: ServiceStack) -> None:
    request = body("ttl")
    assert (await post(cached, request)).headers["x-gateway-cache"] == "miss"
    cached.clock.advance(299)
    assert (await post(cached, request)).headers["x-gateway-cache"] == "hit"
    cached.clock.advance(2)  # past ttl_seconds: 300
    assert (await post(cached, request)).headers["x-gateway-cache"] == "miss"
    assert len(cached.fake.received) == 2


async def test_stream_replayed_from_json_and_json_from_stream(cached: ServiceStack) -> None:
    json_first = await post(cached, body("json first"))
    replayed = await post(cached, body("json first", stream=True))
    assert replayed.headers["x-gateway-cache"] == "hit"
    assert replayed.headers["content-type"].startswith("text/event-stream")
    assert fold(replayed) == fold(json_first)
    streamed = await post(cached, body("stream first", stream=True))
    from_stream = await post(cached, body("stream first"))
    assert from_stream.headers["x-gateway-cache"] == "hit"
    assert fold(from_stream) == fold(streamed)
    assert len(cached.fake.received) == 2


async def test_openai_stream_replay(cached: ServiceStack) -> None:
    messages = [{"role": "user", "content": "openai cache"}]
    auth = {"authorization": f"Bearer {KEYS['alpha-1']}"}
    request = {"model": "gpt-5", "messages": messages}
    first = await cached.drive("POST", "/v1/chat/completions", json=request, headers=auth)
    chunks = await cached.drive(
        "POST", "/v1/chat/completions", json={**request, "stream": True}, headers=auth
    )
    assert chunks.headers["x-gateway-cache"] == "hit"
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks.events if c["choices"]
    )
    assert text == first.json()["choices"][0]["message"]["content"]
    assert len(cached.fake.received) == 1


async def test_tenants_are_isolated(cached: ServiceStack) -> None:
    request = body("tenant isolation")
    assert (await post(cached, request, "alpha-1")).headers["x-gateway-cache"] == "miss"
    assert (await post(cached, request, "alpha-2")).headers["x-gateway-cache"] == "hit"
    assert (await post(cached, request, "beta-1")).headers["x-gateway-cache"] == "miss"
    assert len(cached.fake.received) == 2


async def test_errors_and_aborted_streams_are_not_cached(cached: ServiceStack) -> None:
    request = body("errors are not cached")
    assert (await post(cached, request, **{"x-fake-status": "429"})).status == 429
    assert (await post(cached, request)).headers["x-gateway-cache"] == "miss"
    streamed = body("aborted", stream=True)
    cut = await post(cached, streamed, **{"x-fake-abort-after": "3"})  # the provider resets
    assert "message_stop" not in cut.body.decode()
    assert (await post(cached, streamed)).headers["x-gateway-cache"] == "miss"
    left = body("client left", stream=True)
    gone = await cached.drive(
        "POST",
        "/v1/messages",
        json=left,
        headers={**HEADERS, "x-api-key": KEYS["alpha-1"]},
        client_abort_after=2,
    )
    assert "message_stop" not in gone.body.decode()
    assert (await post(cached, left)).headers["x-gateway-cache"] == "miss"
    assert len(cached.fake.received) == 6
    outcomes = [r["outcome"] for r in await cached.settled()]
    assert outcomes.count("client_abort") == 2  # both cut streams (the server cannot tell who)


async def test_cache_control_no_cache_and_no_store(cached: ServiceStack) -> None:
    request = body("cache control")
    no_store = await post(cached, request, **{"cache-control": "no-store"})
    assert no_store.headers["x-gateway-cache"] == "miss"
    assert (await post(cached, request)).headers["x-gateway-cache"] == "miss"  # nothing stored
    assert (await post(cached, request)).headers["x-gateway-cache"] == "hit"
    no_cache = await post(cached, request, **{"cache-control": "no-cache"})
    assert no_cache.headers["x-gateway-cache"] == "bypass"
    assert len(cached.fake.received) == 3


async def _followers_waiting(stack: ServiceStack, count: int) -> None:
    """Until `count` followers wait on the in-flight call (each asked Envoy for more time)."""
    await until(lambda: stack.extensions >= count, what=f"{count} waiting followers")


async def test_single_flight_one_provider_call(cached: ServiceStack) -> None:
    request = body("single flight", stream=True)
    cached.fake.hold()  # the first call stays in flight until every follower waits
    leader = asyncio.ensure_future(post(cached, request))
    await until(lambda: cached.fake.in_flight == 1, what="the leader at the provider")
    followers = [asyncio.ensure_future(post(cached, request)) for _ in range(7)]
    await _followers_waiting(cached, 7)
    cached.fake.release()
    responses = [await leader, *await asyncio.gather(*followers)]
    assert all(r.status == 200 for r in responses)
    assert [r.headers["x-gateway-cache"] for r in responses] == ["miss"] + ["hit"] * 7
    assert len({orjson.dumps(fold(r)) for r in responses}) == 1
    assert len(cached.fake.received) == 1


async def test_waiters_survive_a_failing_first_call(cached: ServiceStack) -> None:
    request = body("first call fails")
    cached.fake.hold()
    leader = asyncio.ensure_future(post(cached, request, **{"x-fake-status": "500"}))
    await until(lambda: cached.fake.in_flight == 1, what="the leader at the provider")
    waiters = [asyncio.ensure_future(post(cached, request)) for _ in range(3)]
    await _followers_waiting(cached, 3)  # all three wait on the call that will fail
    cached.fake.release()
    assert (await leader).status == 500
    statuses = [(await w).status for w in waiters]
    assert statuses == [200, 200, 200]
    assert len(cached.fake.received) == 2  # the failed call and one replacement


async def test_volatile_values_are_named(cached: ServiceStack) -> None:
    def prompt(stamp: str) -> dict[str, Any]:
        return body(f"Build started at {stamp}. Summarise the lint output.")

    await post(cached, prompt("2026-11-22T10:00:00Z"))
    response = await post(cached, prompt("2026-11-22T10:05:00Z"))
    assert response.headers["x-gateway-cache"] == "miss"
    assert "messages[0].content" in response.headers["x-gateway-cache-hint"]
    record = record_for(cached, response)
    assert record["cache_volatile_paths"] == ["messages[0].content"]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def test_single_flight_across_replicas(redis: RedisServer) -> None:
    """Identical requests arriving at two gateways sharing Redis make one provider call."""
    replicas = []
    for _ in range(2):
        config = _config()
        config["store"] = redis.url
        replicas.append(ServiceStack(config))
    fake = replicas[0].fake
    replicas[1].upstream = fake  # one provider behind both replicas
    request = body("single flight across replicas", stream=True)
    try:
        fake.hold()
        leader = asyncio.ensure_future(post(replicas[0], request))
        await until(lambda: fake.in_flight == 1, what="the leader at the provider")
        followers = [asyncio.ensure_future(post(replicas[i % 2], request)) for i in range(1, 6)]
        await until(lambda: sum(r.extensions for r in replicas) >= 5, what="5 followers")
        fake.release()
        responses = [await leader, *await asyncio.gather(*followers)]
    finally:
        for stack in replicas:
            await stack.close()
    assert [r.status for r in responses] == [200] * 6
    assert sorted(r.headers["x-gateway-cache"] for r in responses) == ["hit"] * 5 + ["miss"]
    assert len(fake.received) == 1
    assert isinstance(replicas[0].gateway.store, RedisStore)
