"""OpenTelemetry through the real stack: SDK client -> Envoy -> ext_proc -> fake provider,
with the gateway exporting to a loopback OTLP receiver (tests/otlp_receiver.py).

Checks the trace joins up (caller's span -> gateway span -> provider call, and with
Envoy's own tracing on: caller -> Envoy's spans -> gateway span), that the exported span
and metrics carry the tokens the audit record has for the same request, and that the
Prometheus counters the dashboard reads per scope appear on /metrics.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.policies.auth import hash_key, new_key
from tests.e2e.test_data_path import record_for
from tests.fake_provider import FakeProvider
from tests.harness import Stack, gateway_config
from tests.otlp_receiver import Receiver, Span, otlp_receiver, wait_until
from tests.unit.test_grafana_dashboard import emitted

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

    # The dashboard test reads names and labels from the registry: they match the live page.
    known = emitted()
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name.startswith("extproc_") and not sample.name.endswith("_created"):
                assert set(sample.labels) == known[sample.name], sample


def _with_envoy_tracing(bootstrap: dict[str, Any], collector_port: int) -> dict[str, Any]:
    """The stack's Envoy with its OpenTelemetry tracer on, exporting to the receiver."""
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["tracing"] = {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otel_collector"}},
                "service_name": "front-envoy",
            },
        }
    }
    collector = copy.deepcopy(
        next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "extproc")
    )
    collector["name"] = "otel_collector"
    collector.pop("health_checks", None)
    collector.pop("outlier_detection", None)
    endpoint = collector["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = collector_port
    collector["load_assignment"]["cluster_name"] = "otel_collector"
    bootstrap["static_resources"]["clusters"].append(collector)
    # Envoy buffers spans (5 s or 5 spans by default): flush each one promptly.
    layer = {"tracing.opentelemetry.min_flush_spans": 1}
    layer["tracing.opentelemetry.flush_interval_ms"] = 200
    bootstrap["layered_runtime"] = {"layers": [{"name": "static", "static_layer": layer}]}
    return bootstrap


def test_envoys_span_is_the_parent_when_envoy_traces(
    fake: FakeProvider, receiver: Receiver
) -> None:
    config = gateway_config(fake.url)
    config["providers"]["anthropic"]["credential"] = {"value": "sk-ant-held-by-gateway"}
    config["telemetry"] = {"otel": {"endpoint": receiver.grpc_url}}
    stack = Stack(config)
    try:
        stack.start_extproc()
        port = int(receiver.grpc_url.rsplit(":", 1)[1])
        stack.start_envoy(_with_envoy_tracing(stack.bootstrap(), port))
        client = anthropic.Anthropic(
            api_key="client-key",
            base_url=stack.url,
            max_retries=0,
            default_headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
        )
        reply = client.messages.with_raw_response.create(
            model="claude-sonnet-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        )
        ours = _span_of(receiver, reply.headers["x-gateway-request-id"])

        def envoys() -> list[Span]:
            return [
                s for s in receiver.received.spans() if s.resource["service.name"] == "front-envoy"
            ]

        # Envoy ends its ingress span after the answer: wait for both of its spans.
        wait_until(lambda: len(envoys()) >= 2, seconds=15)
    finally:
        stack.close()
    spans = {s.span_id: s for s in envoys()}
    # client -> Envoy's ingress span -> Envoy's ext_proc call span -> the gateway's span
    call = spans[ours.parent_span_id]
    assert call.name.startswith("async envoy.service.ext_proc.v3.ExternalProcessor")
    ingress = spans[call.parent_span_id]
    assert ingress.parent_span_id == CALLER_SPAN
    assert {ours.trace_id, call.trace_id, ingress.trace_id} == {TRACE_ID}
    # Envoy's router writes its own span into the upstream request after the filters, so
    # with Envoy tracing on the provider call hangs under Envoy's ingress span.
    assert fake.received[-1].headers["traceparent"] == f"00-{TRACE_ID}-{ingress.span_id}-01"
