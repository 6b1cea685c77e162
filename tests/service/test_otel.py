"""OpenTelemetry export: the servicer fed scripted requests, a real OTLP receiver on loopback.

Each test reads back what the receiver decoded from the OTLP protobufs: span ids and
parents, `gen_ai.*` and `extproc.*` attributes, metric names, data-point attributes and
token counts of a request whose usage the test chose.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from extproc.config import parse_config
from extproc.gateway import Gateway
from extproc.server import ExternalProcessor
from extproc.telemetry.metrics import Metrics
from extproc.telemetry.otel import OtelProcess
from tests.otlp_receiver import Receiver, otlp_receiver, wait_until
from tests.service.test_servicer import (
    BODY,
    ListSink,
    request_body,
    request_headers,
    response_body,
    response_headers,
    run,
    set_headers,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SPAN_KIND_CLIENT = 3
STATUS_ERROR = 2

MESSAGE = orjson.dumps(
    {
        "model": "claude-opus-4-8",
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 11, "output_tokens": 7, "cache_read_input_tokens": 5},
        "content": [],
    }
)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as r:
        yield r


def _gateway(receiver: Receiver, protocol: str = "grpc", **otel: Any) -> Gateway:
    receiver.received.clear()
    url = receiver.grpc_url if protocol == "grpc" else receiver.http_url
    config = parse_config(
        {
            "providers": {
                "main": {
                    "api": "anthropic",
                    "base_url": "https://llm.internal:8443/anthropic",
                    "credential": {"value": "sk-held"},
                }
            },
            "budgets": {"rules": [{"scope": "team", "id": "*", "window": "daily", "usd": 100}]},
            "auth": {"keys": []},
            "guard": {},
            "telemetry": {"otel": {"endpoint": url, "protocol": protocol, **otel}},
        }
    )
    return Gateway.from_config(config, metrics=Metrics(), audit=ListSink())


def _flush(gateway: Gateway) -> None:
    assert isinstance(gateway.otel, OtelProcess)
    gateway.otel.force_flush()


def _points(receiver: Receiver, name: str) -> list[Any]:
    return [p for p in receiver.received.points() if p.metric == name]


async def test_json_request_exports_span_and_genai_metrics_over_grpc(receiver: Receiver) -> None:
    gateway = _gateway(receiver, headers={"x-collector-token": {"value": "t0k"}})
    replies = await run(
        ExternalProcessor(gateway),
        [
            request_headers(
                "/v1/messages",
                extra={
                    "traceparent": TRACEPARENT,
                    "tracestate": "vendor=opaque",
                    "x-claude-code-session-id": "sess-1",
                },
            ),
            request_body(BODY),
            response_headers(200, "application/json"),
            response_body(MESSAGE, eos=True),
        ],
    )
    _flush(gateway)
    received = receiver.received
    (span,) = received.spans("grpc")
    assert (span.trace_id, span.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert span.name == "chat claude-opus-4-8"
    assert span.trace_state == "vendor=opaque"
    assert span.kind == SPAN_KIND_CLIENT
    attributes = span.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == attributes["gen_ai.system"] == "anthropic"
    assert attributes["gen_ai.request.model"] == attributes["gen_ai.response.model"]
    assert attributes["gen_ai.usage.input_tokens"] == 16  # 11 + 5 read from the cache
    assert attributes["gen_ai.usage.output_tokens"] == 7
    assert attributes["gen_ai.usage.cache_read.input_tokens"] == 5
    assert attributes["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert attributes["gen_ai.conversation.id"] == "sess-1"
    assert (attributes["server.address"], attributes["server.port"]) == ("llm.internal", 8443)
    assert attributes["extproc.request_id"] == "req-1"
    assert attributes["extproc.outcome"] == "ok"
    assert attributes["extproc.guard.profile"] == "default"
    assert "team:" not in str(attributes.get("extproc.budget.scopes"))  # anonymous: no team
    assert span.resource["service.name"] == "extproc"
    # The provider's call and the client's answer carry this span as their parent.
    ours = f"00-{TRACE_ID}-{span.span_id}-01"
    assert set_headers(replies[1].request_body.response)["traceparent"] == ours
    assert set_headers(replies[2].response_headers.response)["traceparent"] == ours
    assert any(h.get("x-collector-token") == "t0k" for h in received.headers)

    tokens = {
        p.attributes["gen_ai.token.type"]: p for p in _points(receiver, "gen_ai.client.token.usage")
    }
    assert (tokens["input"].sum, tokens["output"].sum) == (16, 7)
    assert tokens["input"].unit == "{token}"
    assert tokens["input"].attributes["gen_ai.request.model"] == "claude-opus-4-8"
    assert tokens["input"].bounds[:3] == [1, 4, 16]
    (duration,) = _points(receiver, "gen_ai.client.operation.duration")
    assert duration.count == 1
    assert duration.unit == "s"
    assert "error.type" not in duration.attributes
    assert not _points(receiver, "gen_ai.server.time_to_first_token")  # not streamed
    await gateway.close()


async def test_streamed_answer_over_http_gives_ttft_and_time_per_token(
    receiver: Receiver,
) -> None:
    gateway = _gateway(receiver, protocol="http")
    events = (
        b'event: message_start\ndata: {"type":"message_start","message":{"model":"m",'
        b'"usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"text","text":""}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"hi"}}\n\n'
    )
    tail = (
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},'
        b'"usage":{"output_tokens":9}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    await run(
        ExternalProcessor(gateway),
        [
            request_headers("/v1/messages"),
            request_body(BODY),
            response_headers(200, "text/event-stream"),
            response_body(events, eos=False),
            response_body(tail, eos=True),
        ],
    )
    _flush(gateway)
    (span,) = receiver.received.spans("http")
    assert span.parent_span_id == ""  # no traceparent came in: a new trace
    assert span.attributes["gen_ai.response.finish_reasons"] == ["max_tokens"]
    assert span.attributes["extproc.streamed"] is True
    assert {p.metric for p in receiver.received.points("http")} >= {
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.duration",
        "gen_ai.server.time_to_first_token",
        "gen_ai.server.time_per_output_token",
    }
    (ttft,) = _points(receiver, "gen_ai.server.time_to_first_token")
    assert ttft.count == 1
    assert 0 < ttft.sum < 5
    (tpot,) = _points(receiver, "gen_ai.server.time_per_output_token")
    assert tpot.count == 1
    await gateway.close()


async def test_rejection_is_an_error_span_and_answers_with_traceparent(
    receiver: Receiver,
) -> None:
    gateway = _gateway(receiver)
    replies = await run(
        ExternalProcessor(gateway),
        [request_headers("/v1/messages", extra={"traceparent": TRACEPARENT}), request_body(b"{")],
    )
    _flush(gateway)
    (span,) = receiver.received.spans()
    assert span.status_code == STATUS_ERROR
    assert span.attributes["error.type"] == "invalid_json"
    assert span.attributes["http.response.status_code"] == 400
    immediate = replies[1].immediate_response
    sent = {h.header.key: h.header.raw_value.decode() for h in immediate.headers.set_headers}
    assert sent["traceparent"] == f"00-{TRACE_ID}-{span.span_id}-01"
    (duration,) = _points(receiver, "gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == "invalid_json"
    assert not _points(receiver, "gen_ai.client.token.usage")
    await gateway.close()


async def test_sample_ratio_zero_keeps_metrics_and_follows_a_sampled_caller(
    receiver: Receiver,
) -> None:
    gateway = _gateway(receiver, sample_ratio=0)
    script = [
        request_body(BODY),
        response_headers(200, "application/json"),
        response_body(MESSAGE, eos=True),
    ]
    unsampled = await run(ExternalProcessor(gateway), [request_headers("/v1/messages"), *script])
    sampled_headers = request_headers("/v1/messages", extra={"traceparent": TRACEPARENT})
    await run(ExternalProcessor(gateway), [sampled_headers, *script])
    _flush(gateway)
    (span,) = receiver.received.spans()  # only the caller-sampled one
    assert span.parent_span_id == PARENT_ID
    # The unsampled request still passes a (not-sampled) context on to the provider.
    flags = set_headers(unsampled[1].request_body.response)["traceparent"].rsplit("-", 1)[1]
    assert int(flags, 16) & 1 == 0  # the sampled bit is off
    (duration,) = _points(receiver, "gen_ai.client.operation.duration")
    assert duration.count == 2
    await gateway.close()


async def test_unreachable_collector_never_slows_a_request() -> None:
    with otlp_receiver() as gone:
        url = gone.grpc_url
    config = parse_config(
        {
            "providers": {"main": {"api": "anthropic", "base_url": "https://llm.internal"}},
            "telemetry": {"otel": {"endpoint": url, "export_timeout_seconds": 1}},
        }
    )
    gateway = Gateway.from_config(config, metrics=Metrics(), audit=ListSink())
    script = [
        request_headers("/v1/messages"),
        request_body(BODY),
        response_headers(200, "application/json"),
        response_body(MESSAGE, eos=True),
    ]
    began = time.perf_counter()
    for _ in range(50):
        await run(ExternalProcessor(gateway), script)
    per_request = (time.perf_counter() - began) / 50
    assert per_request < 0.02, per_request
    began = time.perf_counter()
    await asyncio.wait_for(gateway.close(), 10)  # shutdown is bounded by the export timeout
    assert time.perf_counter() - began < 8


def test_receiver_polling_is_bounded() -> None:
    with pytest.raises(AssertionError):
        wait_until(lambda: False, seconds=0.05)


def test_a_full_queue_drops_records_instead_of_waiting(receiver: Receiver) -> None:
    gateway = _gateway(receiver, max_queue_size=64)
    otel = gateway.otel
    assert isinstance(otel, OtelProcess)
    otel.process.send_signal(signal.SIGSTOP)  # a telemetry process that reads nothing
    try:
        record = {"outcome": "ok", "padding": "x" * 1024}
        began = time.perf_counter()
        for _ in range(5000):
            otel.record(None, record, False)
        assert time.perf_counter() - began < 0.5
    finally:
        otel.process.send_signal(signal.SIGCONT)
    assert 0 < otel.dropped < 5000
    counted = gateway.metrics.registry.get_sample_value("extproc_otel_dropped_total")
    assert counted == otel.dropped
    otel.shutdown()
    assert otel.process.returncode == 0


def test_telemetry_process_ends_with_the_gateway(receiver: Receiver) -> None:
    gateway = _gateway(receiver)
    otel = gateway.otel
    assert isinstance(otel, OtelProcess)
    otel._socket.close()  # as when the gateway process dies: the socket reads EOF
    assert otel.process.wait(20) == 0
