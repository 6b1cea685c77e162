"""The service-layer harness plays Envoy faithfully: what it sends, in which order and mode,
and what the client and the provider end up with. The harness is what the other service
tests stand on, so its Envoy behaviour is checked here (the e2e suite checks the real one)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.decisions import CONTINUE
from extproc.envoy_api import extend_timeout, phase_of, to_response
from extproc.policies.auth import hash_key
from tests.service.harness import ServiceStack, service_config

MODE = processing_mode_pb2.ProcessingMode
KEY = "gwk_alice_" + "a" * 40
ANTHROPIC = {"anthropic-version": "2023-06-01", "x-api-key": KEY}
OPENAI = {"authorization": f"Bearer {KEY}"}
OWN_KEY = {"anthropic-version": "2023-06-01", "x-api-key": "sk-caller-own"}  # passes upstream


def ask(**extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": "hi"}]
    return {"model": "claude-opus-4-8", "max_tokens": 20, "messages": messages, **extra}


@pytest.fixture
async def stack() -> AsyncIterator[ServiceStack]:
    config = service_config(auth={"keys": [{"id": "alice", "hash": hash_key(KEY)}]})
    config["providers"]["anthropic"]["credential"] = {"value": "sk-held"}
    config["providers"]["openai"]["credential"] = {"value": "sk-oai"}
    service = ServiceStack(config)
    yield service
    await service.close()


def phases(reply: Any) -> list[str | None]:
    return [request.WhichOneof("request") for request in reply.rpc.sent]


async def test_json_request_goes_through_in_envoys_order(stack: ServiceStack) -> None:
    reply = await stack.drive("POST", "/v1/messages", json=ask(), headers=ANTHROPIC)
    assert reply.status == 200
    assert reply.json()["content"][0]["text"] == "Hello from the fake provider."
    assert phases(reply) == ["request_headers", "request_body", "response_headers", "response_body"]
    assert reply.rpc is not None
    assert reply.rpc.received[2].mode_override.response_body_mode == MODE.BUFFERED
    sent = reply.upstream
    assert sent is not None
    assert sent.headers["x-api-key"] == "sk-held"  # the gateway key never leaves
    assert KEY not in orjson.dumps(sent.headers).decode()
    assert reply.cluster == "provider_anthropic"
    assert reply.headers["x-gateway-request-id"]
    (record,) = await stack.settled()
    assert (record["outcome"], record["route"]) == ("ok", "anthropic")


async def test_sse_in_awkward_pieces_is_streamed_chunk_by_chunk(stack: ServiceStack) -> None:
    headers = {**ANTHROPIC, "x-fake-chunking": "split"}
    reply = await stack.drive("POST", "/v1/messages", json=ask(stream=True), headers=headers)
    assert reply.status == 200
    assert reply.rpc is not None
    assert reply.rpc.received[2].mode_override.response_body_mode == MODE.STREAMED
    assert phases(reply).count("response_body") > 10  # one message per piece, then the end
    assert reply.rpc.sent[-1].response_body.end_of_stream
    types = [event["type"] for event in reply.events]
    assert types[0] == "message_start"
    assert types[-1] == "message_stop"
    (record,) = await stack.settled()
    assert record["streamed"] is True
    assert record["output_tokens"] == 5  # the fake's five words


async def test_openai_stream_gets_usage_the_client_never_sees(stack: ServiceStack) -> None:
    body = {"model": "gpt-5", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    reply = await stack.drive("POST", "/v1/chat/completions", json=body, headers=OPENAI)
    assert reply.upstream is not None
    assert reply.upstream.json()["stream_options"] == {"include_usage": True}
    assert reply.upstream.headers["authorization"] == "Bearer sk-oai"
    assert all(event.get("usage") is None for event in reply.events)
    assert reply.body.endswith(b"data: [DONE]\n\n")
    (record,) = await stack.settled()
    assert record["route"] == "openai"
    assert record["output_tokens"] == 5


async def test_a_compressed_answer_reaches_the_client_decoded(stack: ServiceStack) -> None:
    headers = {**ANTHROPIC, "x-fake-compress": "gzip"}
    reply = await stack.drive("POST", "/v1/messages", json=ask(), headers=headers)
    assert "content-encoding" not in reply.headers
    assert reply.json()["type"] == "message"


async def test_a_refusal_is_an_immediate_response_and_nothing_goes_upstream(
    stack: ServiceStack,
) -> None:
    reply = await stack.drive("POST", "/v1/messages", body=b"{", headers=ANTHROPIC)
    assert reply.answered_by_gateway
    assert reply.status == 400
    assert reply.headers["x-gateway-error"] == "invalid_json"
    assert reply.error["type"] == "invalid_request_error"
    assert stack.fake.received == []
    assert phases(reply) == ["request_headers", "request_body"]


async def test_a_get_has_no_body_phase(stack: ServiceStack) -> None:
    reply = await stack.drive("GET", "/v1/models", headers=ANTHROPIC)
    assert reply.status == 200
    assert phases(reply)[:2] == ["request_headers", "response_headers"]
    assert reply.rpc is not None
    assert reply.rpc.sent[0].request_headers.end_of_stream


async def test_client_gone_and_provider_reset_both_end_the_rpc_as_cut_streams(
    stack: ServiceStack,
) -> None:
    await stack.drive(
        "POST", "/v1/messages", json=ask(stream=True), headers=ANTHROPIC, client_abort_after=2
    )
    headers = {**ANTHROPIC, "x-fake-abort-after": "3"}
    await stack.drive("POST", "/v1/messages", json=ask(stream=True), headers=headers)
    outcomes = [r["outcome"] for r in await stack.settled()]
    # Envoy ends the RPC alike for both: the server cannot tell them apart (its flags can).
    assert outcomes == ["client_abort", "client_abort"]


class Broken:
    """A servicer whose every RPC fails, as a crashed or unreachable gateway's would."""

    async def Process(self, requests: AsyncIterator[Any], context: Any) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "down")


class Slow:
    """A servicer that answers each message after `delay` s, asking for `extend` s first."""

    def __init__(self, delay: float, extend: float | None) -> None:
        self.delay, self.extend = delay, extend

    async def Process(self, requests: AsyncIterator[pb.ProcessingRequest], context: Any) -> None:
        async for request in requests:
            if self.extend is not None:
                await context.write(extend_timeout(self.extend))
            await asyncio.sleep(self.delay)
            phase = phase_of(request)
            assert phase is not None
            await context.write(to_response(phase, CONTINUE))


async def test_a_failed_rpc_is_envoys_503_or_passes_with_failure_mode_allow() -> None:
    for allow, status in ((False, 503), (True, 200)):
        service = ServiceStack(service_config(), failure_mode_allow=allow)
        service.servicer = Broken()  # type: ignore[assignment]
        reply = await service.drive("POST", "/v1/messages", json=ask(), headers=OWN_KEY)
        assert reply.status == status
        if not allow:
            assert reply.headers["x-gateway-error"] == "gateway_unavailable"
            assert service.fake.received == []
        await service.close()


async def test_envoy_waits_no_longer_than_its_message_timeout() -> None:
    service = ServiceStack(service_config(), message_timeout=0.05)
    service.servicer = Slow(delay=0.2, extend=None)  # type: ignore[assignment]
    reply = await service.drive("POST", "/v1/messages", json=ask(), headers=OWN_KEY)
    assert reply.status == 503
    assert service.fake.received == []
    service.servicer = Slow(delay=0.2, extend=5.0)  # type: ignore[assignment]
    reply = await service.drive("POST", "/v1/messages", json=ask(), headers=OWN_KEY)
    assert reply.status == 200
    assert reply.extensions == 3  # more time asked for before each of its three replies
    await service.close()


async def test_a_client_cannot_pick_the_cluster(stack: ServiceStack) -> None:
    headers = {**ANTHROPIC, "x-gateway-cluster": "provider_openai"}
    reply = await stack.drive("POST", "/v1/messages", json=ask(), headers=headers)
    assert reply.cluster == "provider_anthropic"
    assert reply.upstream is not None
    assert "x-gateway-cluster" not in reply.upstream.headers
