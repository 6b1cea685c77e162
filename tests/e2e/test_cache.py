"""The response cache through real Envoy: SDK stream replays, single-flight under Envoy's
message timeout, the purge CLI against Redis.

The cache's contracts (keys, tenants, TTL, errors and aborts not stored, cache-control,
single-flight and its failure path, across replicas) are tested at the service layer,
deterministically and on a test clock: tests/service/test_cache.py."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from extproc.apis import anthropic as anthropic_api
from extproc.apis.sse import SseParser
from extproc.policies.auth import hash_key, new_key
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config
from tests.redis_server import RedisServer

KEYS = {name: new_key(name) for name in ("alpha-1", "alpha-2", "beta-1")}
HEADERS = {"anthropic-version": "2023-06-01"}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def cached(fake: FakeProvider, redis: RedisServer) -> Iterator[Stack]:
    config = gateway_config(fake.url, store=redis.url)
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
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


def post(
    stack: Stack, body: dict[str, Any], key: str = "alpha-1", **headers: str
) -> httpx.Response:
    all_headers = {**HEADERS, "x-api-key": KEYS[key], **headers}
    return httpx.post(f"{stack.url}/v1/messages", json=body, headers=all_headers, timeout=60)


def fold(response: httpx.Response) -> dict[str, Any]:
    """The answer as JSON, whether it came as JSON or as an Anthropic SSE stream."""
    if response.headers["content-type"].startswith("application/json"):
        answer: dict[str, Any] = response.json()
        return answer
    parser, accumulator = SseParser(), anthropic_api.StreamAccumulator()
    for event in parser.feed(response.content) + parser.close():
        accumulator.feed(event)
    return accumulator.folded_message()


def body(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def test_stream_replayed_from_json_and_json_from_stream(
    cached: Stack, received: FakeProvider
) -> None:
    client = anthropic.Anthropic(api_key=KEYS["alpha-1"], base_url=cached.url, max_retries=0)
    request: Any = {"model": "claude-sonnet-4-6", "max_tokens": 64}
    json_first = client.messages.create(
        messages=[{"role": "user", "content": "json first"}], **request
    )
    with client.messages.stream(
        messages=[{"role": "user", "content": "json first"}], **request
    ) as stream:
        assert stream.response.headers["x-gateway-cache"] == "hit"
        replayed = stream.get_final_message()
    assert replayed.model_dump() == json_first.model_dump()

    with client.messages.stream(
        messages=[{"role": "user", "content": "stream first"}], **request
    ) as stream:
        streamed = stream.get_final_message()
    from_stream = client.messages.with_raw_response.create(
        messages=[{"role": "user", "content": "stream first"}], **request
    )
    assert from_stream.headers["x-gateway-cache"] == "hit"
    assert from_stream.parse().model_dump() == streamed.model_dump()
    assert len(received.received) == 2


def test_openai_stream_replay_parses_in_the_sdk(cached: Stack, received: FakeProvider) -> None:
    client = openai.OpenAI(api_key=KEYS["alpha-1"], base_url=f"{cached.url}/v1", max_retries=0)
    messages: Any = [{"role": "user", "content": "openai cache"}]
    first = client.chat.completions.create(model="gpt-5", messages=messages)
    chunks = client.chat.completions.create(
        model="gpt-5", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    assert len(received.received) == 1


def test_single_flight_one_provider_call(cached: Stack, received: FakeProvider) -> None:
    request = body("single flight", stream=True)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(post, cached, request, **{"x-fake-delay-ms": "100"}) for _ in range(8)
        ]
        responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses)
    assert sorted(r.headers["x-gateway-cache"] for r in responses) == ["hit"] * 7 + ["miss"]
    assert len({orjson.dumps(fold(r)) for r in responses}) == 1
    assert len(received.received) == 1


def test_purge_from_the_cli(cached: Stack, received: FakeProvider) -> None:
    request = body("purge me")
    post(cached, request, "beta-1")
    assert post(cached, request, "beta-1").headers["x-gateway-cache"] == "hit"
    command = [sys.executable, "-m", "extproc", "cache", "--config", str(cached.config_path)]
    result = subprocess.run(
        [*command, "purge", "--scope", "team=beta"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "purged" in result.stdout
    assert post(cached, request, "beta-1").headers["x-gateway-cache"] == "miss"
