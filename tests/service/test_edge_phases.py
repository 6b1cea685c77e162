"""Issue 11 item 17 at the servicer: Envoy's own local replies pass quietly, and a
`Cache-Control: no-cache` request that replaces a fresh entry is audited as such."""

from __future__ import annotations

import logging

import orjson
import pytest

from extproc.config import parse_config
from extproc.gateway import Gateway
from extproc.server import ExternalProcessor
from extproc.telemetry.metrics import Metrics
from tests.service.test_servicer import (
    BODY,
    ListSink,
    request_body,
    request_headers,
    response_body,
    response_headers,
    run,
)

MESSAGE = orjson.dumps(
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-opus-4-8",
        "content": [{"type": "text", "text": "hi"}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 1},
    }
)


def _servicer(sink: ListSink, metrics: Metrics, cache: bool = False) -> ExternalProcessor:
    config = parse_config(
        {
            "providers": {"main": {"api": "anthropic", "base_url": "http://llm.internal"}},
            "profiles": {"default": {"cache": {"enabled": cache}}},
        }
    )
    return ExternalProcessor(Gateway.from_config(config, metrics=metrics, audit=sink))


async def test_envoys_own_local_reply_passes_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`OPTIONS *` is answered by Envoy (absolute_path_rejected) before the request
    reaches the gateway; only its response headers arrive. Nothing to warn about."""
    sink, metrics = ListSink(), Metrics()
    servicer = _servicer(sink, metrics)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            replies = await run(servicer, [response_headers(404, "text/plain")])
            assert replies[0].WhichOneof("response") == "response_headers"
    assert caplog.records == []
    assert sink.records == []
    assert metrics.registry.get_sample_value("extproc_active_streams") == 0


async def _exchange(servicer: ExternalProcessor, extra: dict[str, str]) -> None:
    await run(
        servicer,
        [
            request_headers("/v1/messages", extra={"x-api-key": "sk-own", **extra}),
            request_body(BODY),
            response_headers(200, "application/json"),
            response_body(MESSAGE, eos=True),
        ],
    )


async def test_no_cache_replacing_a_fresh_entry_is_audited() -> None:
    sink = ListSink()
    servicer = _servicer(sink, Metrics(), cache=True)
    await _exchange(servicer, {})
    await _exchange(servicer, {})
    await _exchange(servicer, {"cache-control": "no-cache"})
    first, hit, refresh = sink.records
    assert (first["cache"], first["cache_stored"]) == ("miss", True)
    assert hit["cache"] == "hit"
    assert (refresh["cache"], refresh["cache_stored"]) == ("bypass", True)
    assert refresh["cache_replaced"] is True
    assert "cache_replaced" not in first
