"""The servicer fed scripted ProcessingRequest sequences: no sockets, no Envoy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config import parse_config
from extproc.gateway import Gateway
from extproc.server import ExternalProcessor
from extproc.telemetry.metrics import Metrics
from tests.service.harness import (
    ListSink,
    headers,
    request_body,
    request_headers,
    response_body,
    response_headers,
    set_headers,
)

__all__ = [  # the scripted-sequence helpers other service tests use
    "ListSink",
    "headers",
    "request_body",
    "request_headers",
    "response_body",
    "response_headers",
    "set_headers",
]


@pytest.fixture
def sink() -> ListSink:
    return ListSink()


@pytest.fixture
def servicer(sink: ListSink) -> ExternalProcessor:
    config = parse_config(
        {
            "providers": {
                "main": {
                    "api": "anthropic",
                    "base_url": "https://llm.internal/anthropic",
                    "credential": {"value": "sk-held"},
                },
                "oai": {"api": "openai", "base_url": "http://vllm:8000"},
            }
        }
    )
    return ExternalProcessor(Gateway.from_config(config, metrics=Metrics(), audit=sink))


class Context:
    """Collects what the servicer writes, as grpc.aio's ServicerContext would send it."""

    def __init__(self) -> None:
        self.written: list[pb.ProcessingResponse] = []

    async def write(self, response: pb.ProcessingResponse) -> None:
        self.written.append(response)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)


class Aborted(Exception):
    """What grpc.aio's `context.abort` raises to end the RPC with an error status."""


async def run(
    servicer: ExternalProcessor, requests: Sequence[pb.ProcessingRequest]
) -> list[pb.ProcessingResponse]:
    async def iterate() -> AsyncIterator[pb.ProcessingRequest]:
        for request in requests:
            yield request

    context = Context()
    await servicer.Process(iterate(), context)
    await servicer.gateway.settle_pending(10)  # the settle and audit task of the stream
    return context.written


BODY = orjson.dumps({"model": "claude-opus-4-8", "max_tokens": 5, "messages": []})
MESSAGE = orjson.dumps(
    {"model": "claude-opus-4-8", "usage": {"input_tokens": 11, "output_tokens": 7}, "content": []}
)


async def test_json_request_is_routed_and_accounted(
    servicer: ExternalProcessor, sink: ListSink
) -> None:
    replies = await run(
        servicer,
        [
            request_headers("/v1/messages", extra={"x-claude-code-session-id": "s1"}),
            request_body(BODY),
            response_headers(200, "application/json"),
            response_body(MESSAGE, eos=True),
        ],
    )
    assert [r.WhichOneof("response") for r in replies] == [
        "request_headers",
        "request_body",
        "response_headers",
        "response_body",
    ]
    body_reply = replies[1].request_body.response
    assert body_reply.clear_route_cache
    changes = set_headers(body_reply)
    assert changes["x-gateway-cluster"] == "provider_main"
    assert changes[":path"] == "/anthropic/v1/messages"
    assert changes["x-api-key"] == "sk-held"
    assert "authorization" in body_reply.header_mutation.remove_headers
    assert (
        replies[2].mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.BUFFERED
    )
    (record,) = sink.records
    assert record["route"] == "agent"
    assert record["session_id"] == "s1"
    assert (record["input_tokens"], record["output_tokens"]) == (11, 7)
    assert record["outcome"] == "ok"


async def test_sse_response_switches_to_streamed_and_splits_are_parsed(
    servicer: ExternalProcessor, sink: ListSink
) -> None:
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"m",'
        b'"usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}}\n\n'
        b'event: content_block_delta\ndata:{"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        b'"usage":{"output_tokens":9}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    chunks = [events[i : i + 7] for i in range(0, len(events), 7)]
    script = [
        request_headers("/v1/messages"),
        request_body(BODY),
        response_headers(200, "text/event-stream"),
    ]
    script += [response_body(c, eos=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    replies = await run(servicer, script)
    assert (
        replies[2].mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.STREAMED
    )
    assert all(not r.response_body.response.HasField("body_mutation") for r in replies[3:])
    (record,) = sink.records
    assert (record["input_tokens"], record["output_tokens"]) == (3, 9)
    assert record["streamed"] is True
    assert record["ttft_ms"] is not None


async def test_rejection_is_an_immediate_response_accounted_once(
    servicer: ExternalProcessor, sink: ListSink
) -> None:
    replies = await run(servicer, [request_headers("/v1/messages"), request_body(b"{")])
    immediate = replies[1].immediate_response
    assert immediate.status.code == 400
    assert immediate.details == "extproc_invalid_json"
    assert orjson.loads(immediate.body)["error"]["type"] == "invalid_request_error"
    assert [r["outcome"] for r in sink.records] == ["rejected_invalid_json"]


async def test_get_without_body_is_forwarded_at_headers(servicer: ExternalProcessor) -> None:
    replies = await run(servicer, [request_headers("/v1/models", method="GET", eos=True)])
    changes = set_headers(replies[0].request_headers.response)
    assert changes["x-gateway-cluster"] == "provider_main"


async def test_openai_provider_gets_bearer_and_no_x_api_key(servicer: ExternalProcessor) -> None:
    body = orjson.dumps({"model": "gpt-5", "messages": []})
    replies = await run(
        servicer,
        [
            request_headers("/v1/chat/completions", extra={"authorization": "Bearer client"}),
            request_body(body),
        ],
    )
    reply = replies[1].request_body.response
    changes = set_headers(reply)
    assert changes["x-gateway-cluster"] == "provider_oai"
    assert ":path" not in changes  # base_url has no path prefix
    assert "authorization" not in changes  # no credential held: the caller's passes


async def test_stream_ended_by_envoy_mid_answer_is_a_client_abort(
    servicer: ExternalProcessor, sink: ListSink
) -> None:
    await run(
        servicer,
        [
            request_headers("/v1/messages"),
            request_body(BODY),
            response_headers(200, "text/event-stream"),
            response_body(b"event: ping\ndata: {}\n\n", eos=False),
        ],
    )
    assert [r["outcome"] for r in sink.records] == ["client_abort"]


async def test_out_of_order_phases_do_not_crash(
    servicer: ExternalProcessor, sink: ListSink
) -> None:
    async def iterate() -> AsyncIterator[pb.ProcessingRequest]:
        yield request_body(BODY)  # a body before any headers

    context = Context()
    with pytest.raises(Aborted):  # the RPC fails: Envoy applies failure_mode_allow
        await servicer.Process(iterate(), context)
    await servicer.gateway.settle_pending(10)
    assert context.written == []
    assert sink.records == []  # no request had started
    assert servicer.gateway.metrics.active_streams._value.get() == 0


async def test_active_streams_gauge_returns_to_zero(servicer: ExternalProcessor) -> None:
    await run(servicer, [request_headers("/v1/messages"), request_body(b"{")])
    await run(servicer, [request_headers("/v1/nope")])
    await run(servicer, [request_headers("/v1/messages"), request_body(BODY)])
    gauge = servicer.gateway.metrics.active_streams
    assert gauge._value.get() == 0


async def test_an_out_of_order_phase_fails_the_rpc_and_is_audited(
    servicer: ExternalProcessor, sink: ListSink
) -> None:
    """Envoy must not carry on unguarded: a failed RPC gets failure_mode_allow's answer."""

    async def iterate() -> AsyncIterator[pb.ProcessingRequest]:
        yield request_headers("/v1/messages")
        yield request_headers("/v1/messages")  # request headers twice: out of order

    context = Context()
    with pytest.raises(Aborted):
        await servicer.Process(iterate(), context)
    await servicer.gateway.settle_pending(10)
    assert context.aborted[0] is grpc.StatusCode.INTERNAL
    (record,) = sink.records
    assert record["outcome"] == "rejected_protocol_error"
