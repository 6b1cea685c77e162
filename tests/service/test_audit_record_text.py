"""`audit.record_text` per route: a compliance route keeps prompts and answers, a zero data
retention route keeps metadata only, whatever the global setting says."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extproc.config import ConfigError, parse_config
from extproc.gateway import Gateway
from extproc.server import ExternalProcessor
from extproc.telemetry.metrics import Metrics
from tests.service.test_servicer import (
    ListSink,
    headers,
    request_body,
    response_body,
    response_headers,
    run,
)

BODY = orjson.dumps(
    {"model": "claude-opus-4-8", "max_tokens": 5, "messages": [{"role": "user", "content": "q?"}]}
)
MESSAGE = orjson.dumps(
    {
        "model": "claude-opus-4-8",
        "usage": {"input_tokens": 11, "output_tokens": 7},
        "content": [{"type": "text", "text": "the answer"}],
    }
)
EVENTS = (
    b'event: message_start\ndata: {"type":"message_start","message":{"model":"m",'
    b'"usage":{"input_tokens":3,"output_tokens":1}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"streamed answer"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":9}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
)


def gateway(record_text: bool, sink: ListSink) -> ExternalProcessor:
    config = parse_config(
        {
            "providers": {"main": {"api": "anthropic", "base_url": "http://llm:8000"}},
            "audit": {"record_text": record_text},
            "profiles": {
                "default": {},
                "compliance": {"audit": {"record_text": True}},
                "zdr": {"zero_data_retention": True},
            },
        }
    )
    return ExternalProcessor(Gateway.from_config(config, metrics=Metrics(), audit=sink))


def on_route(policy: dict[str, Any]) -> pb.ProcessingRequest:
    """Request headers from an Envoy route whose `extproc` metadata is `policy`."""
    fields = " ".join(f'fields {{ key: "{k}" value {{ {_value(v)} }} }}' for k, v in policy.items())
    metadata = f'filter_metadata {{ key: "extproc" value {{ {fields} }} }}'
    attributes = struct_pb2.Struct()
    attributes.update({"xds.route_name": "r", "xds.route_metadata": metadata})
    pairs = {":method": "POST", ":path": "/v1/messages", "x-request-id": "req-1"}
    return pb.ProcessingRequest(
        request_headers=headers(pairs), attributes={"envoy.filters.http.ext_proc": attributes}
    )


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return f"bool_value: {str(value).lower()}"
    return f'string_value: "{value}"'


async def audited(
    record_text: bool, policy: dict[str, Any], streamed: bool = False
) -> dict[str, Any]:
    sink = ListSink()
    script = [on_route(policy), request_body(BODY)]
    if streamed:
        script += [response_headers(200, "text/event-stream"), response_body(EVENTS, eos=True)]
    else:
        script += [response_headers(200, "application/json"), response_body(MESSAGE, eos=True)]
    await run(gateway(record_text, sink), script)
    (record,) = sink.records
    assert record["outcome"] == "ok"
    return record


@pytest.mark.parametrize("global_text", [True, False])
async def test_compliance_route_keeps_prompt_and_answer(global_text: bool) -> None:
    record = await audited(global_text, {"profile": "compliance"})
    assert record["prompt"] == {"messages": [{"role": "user", "content": "q?"}]}
    assert record["completion"] == [{"type": "text", "text": "the answer"}]


async def test_compliance_route_keeps_a_streamed_answer() -> None:
    record = await audited(False, {"profile": "compliance"}, streamed=True)
    assert record["completion"] == [{"type": "text", "text": "streamed answer"}]


@pytest.mark.parametrize(
    "policy",
    [{"profile": "zdr"}, {"profile": "compliance", "zero_data_retention": True}],
    ids=["zdr-profile", "route-override"],
)
@pytest.mark.parametrize("streamed", [False, True])
async def test_zero_data_retention_keeps_metadata_only_despite_global_setting(
    policy: dict[str, Any], streamed: bool
) -> None:
    record = await audited(True, policy, streamed=streamed)
    assert "prompt" not in record
    assert "completion" not in record
    assert b"the answer" not in orjson.dumps(record)
    assert b"streamed answer" not in orjson.dumps(record)
    assert record["input_tokens"] > 0  # the metadata is all there


async def test_global_setting_applies_where_the_route_is_silent() -> None:
    assert "prompt" in await audited(True, {"profile": "default"})
    assert "prompt" not in await audited(False, {"profile": "default"})


def test_a_profile_cannot_be_both_zdr_and_recording() -> None:
    with pytest.raises(ConfigError, match="zero_data_retention"):
        parse_config(
            {
                "profiles": {
                    "default": {},
                    "x": {"zero_data_retention": True, "audit": {"record_text": True}},
                }
            }
        )


async def test_route_metadata_cannot_turn_zero_data_retention_off() -> None:
    sink = ListSink()
    replies = await run(
        gateway(True, sink),
        [on_route({"profile": "zdr", "zero_data_retention": False}), request_body(BODY)],
    )
    assert replies[0].immediate_response.status.code == 503
    assert "zero_data_retention" in replies[0].immediate_response.body.decode()
    assert "prompt" not in sink.records[0]
