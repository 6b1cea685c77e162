"""OpenTelemetry through the real stack: SDK client -> Envoy -> ext_proc -> fake provider,
with the gateway exporting to a loopback OTLP receiver (tests/otlp_receiver.py).

Checks the trace joins up (caller's span -> gateway span -> provider call), that the
exported span and metrics carry the tokens the audit record has for the same request,
and that the Prometheus counters the dashboard reads per scope appear on /metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from extproc.policies.auth import hash_key, new_key
from tests.e2e.test_data_path import record_for
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config
from tests.otlp_receiver import Receiver, Span, otlp_receiver, wait_until

pytestmark = pytest.mark.e2e

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
KEY = new_key("otel")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with otlp_receiver() as r:
        yield r


@pytest.fixture(scope="module")
def traced(fake: FakeProvider, receiver: Receiver) -> Iterator[Stack]:
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": "sk-ant-held-by-gateway"}
    config["auth"] = {
        "required": True,
        "keys": [{"id": "otel", "hash": hash_key(KEY), "team": "platform", "user": "ada"}],
    }
    config["budgets"] = {"rules": [{"scope": "team", "id": "*", "window": "daily", "usd": 50}]}
    config["telemetry"] = {
        "otel": {
            "endpoint": receiver.grpc_url,
            "service_name": "gw-e2e",
            "export_interval_seconds": 1,
        }
    }
    stack = Stack(config)
    stack.start()
    yield stack
    stack.close()


def _span_of(receiver: Receiver, request_id: str) -> Span:
    def found() -> bool:
        return any(
            s.attributes.get("extproc.request_id") == request_id for s in receiver.received.spans()
        )

    wait_until(found, seconds=15)
    return next(
        s for s in receiver.received.spans() if s.attributes.get("extproc.request_id") == request_id
    )


def test_streamed_request_is_traced_end_to_end(
    traced: Stack, received: FakeProvider, receiver: Receiver
) -> None:
    client = anthropic.Anthropic(
        api_key=KEY,
        base_url=traced.url,
        max_retries=0,
        default_headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
    )
    with client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        stream.until_done()
        reply_headers = stream.response.headers
    request_id = reply_headers["x-gateway-request-id"]
    record = record_for(traced, request_id)
    span = _span_of(receiver, request_id)

    # caller's span -> gateway span -> the provider's call
    assert (span.trace_id, span.parent_span_id) == (TRACE_ID, CALLER_SPAN)
    ours = f"00-{TRACE_ID}-{span.span_id}-01"
    (upstream,) = received.received
    assert upstream.headers["traceparent"] == ours
    assert reply_headers["traceparent"] == ours

    attributes = span.attributes
    assert span.name == f"chat {record['requested_model']}"
    assert span.resource["service.name"] == "gw-e2e"
    assert attributes["gen_ai.usage.output_tokens"] == record["output_tokens"] > 0
    assert (
        attributes["gen_ai.usage.input_tokens"]
        == record["input_tokens"]
        + record["cache_read_input_tokens"]
        + record["cache_creation_input_tokens"]
    )
    assert attributes["gen_ai.response.finish_reasons"] == record["finish_reasons"] == ["end_turn"]
    assert attributes["extproc.team"] == "platform"
    assert attributes["extproc.key_id"] == "otel"
    assert "team:platform" in attributes["extproc.budget.scopes"]
    assert attributes["extproc.cost_usd"] == pytest.approx(record["cost_usd"])
    assert attributes["extproc.streamed"] is True

    def exported(name: str) -> bool:
        return any(p.metric == name for p in receiver.received.points())

    wait_until(lambda: exported("gen_ai.server.time_to_first_token"), seconds=15)
    output = [
        p
        for p in receiver.received.points()
        if p.metric == "gen_ai.client.token.usage"
        and p.attributes["gen_ai.token.type"] == "output"
        and p.attributes["extproc.team"] == "platform"
    ]
    # Cumulative temporality: the latest export holds this request's output tokens.
    assert output[-1].sum >= record["output_tokens"]

    metrics = traced.metrics_text(wait_for='extproc_scope_spend_usd_total{id="platform"')
    assert 'extproc_scope_tokens_total{id="ada",scope="user",type="output"}' in metrics
    assert 'extproc_scope_spend_usd_total{id="otel",scope="key"}' in metrics
