"""OpenTelemetry GenAI telemetry through the SDK (imported only when `telemetry.otel` is set).

Follows the OpenTelemetry semantic conventions for generative AI (metrics
`gen_ai.client.token.usage`, `gen_ai.client.operation.duration`,
`gen_ai.server.time_to_first_token`, `gen_ai.server.time_per_output_token`; a CLIENT
span named `{operation} {model}` with `gen_ai.*` attributes) plus the gateway's own
`extproc.*` attributes: identity, cache, guard verdicts, budget scopes and cost.

Everything is fed by the audit record (`extproc.telemetry.record`), so nothing here
reads a request a second time. The span starts when the request headers arrive, so its
id can go upstream in `traceparent` (the provider's call is the span's child) and back
to the client; its parent is the caller's `traceparent` (Envoy's span when Envoy traces).

Export never runs on the request path: the SDK's BatchSpanProcessor and
PeriodicExportingMetricReader hold finished spans and aggregated metrics in memory and
send them from their own threads; a full span queue drops spans instead of waiting.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from extproc.config import Config, OtelConfig
from extproc.credentials import Credential
from extproc.telemetry.otel import RequestTrace

# Bucket boundaries the conventions advise for each histogram.
_TOKEN_BUCKETS = [4.0**i for i in range(14)]  # 1, 4, 16 ... 67108864
_DURATION_BUCKETS = [0.01 * 2**i for i in range(14)]  # 0.01 ... 81.92
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0]
_TTFT_BUCKETS += [7.5, 10.0]
_TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]

# `gen_ai.operation.name` per endpoint (the conventions name "chat"; others keep ours).
_OPERATION = {"messages": "chat", "chat_completions": "chat"}
_SCOPE = "extproc"


class Otel:
    """The OpenTelemetry SDK set up from `telemetry.otel`; one per process."""

    def __init__(
        self, config: OtelConfig, gateway: Config, environ: Mapping[str, str] | None = None
    ) -> None:
        self.config = config
        headers = {name: Credential(src, environ).get() for name, src in config.headers.items()}
        resource = Resource.create(
            {
                "service.name": config.service_name,
                # Worker processes of one replica each export their own cumulative series.
                "service.instance.id": f"{uuid.uuid4().hex[:12]}-{os.getpid()}",
            }
        )
        self._propagator = TraceContextTextMapPropagator()
        self._servers = {name: (p.hostname, p.port) for name, p in gateway.providers.items()}
        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None
        if config.traces:
            self._start_traces(resource, headers)
        if config.metrics:
            self._start_metrics(resource, headers)

    def _start_traces(self, resource: Resource, headers: dict[str, str]) -> None:
        sampler = ParentBased(TraceIdRatioBased(self.config.sample_ratio))
        provider = TracerProvider(resource=resource, sampler=sampler)
        processor = BatchSpanProcessor(
            _span_exporter(self.config, headers),
            max_queue_size=self.config.max_queue_size,
            schedule_delay_millis=1000,
            export_timeout_millis=self.config.export_timeout_seconds * 1000,
        )
        provider.add_span_processor(processor)
        self.tracer_provider = provider
        self._tracer = provider.get_tracer(_SCOPE)

    def _start_metrics(self, resource: Resource, headers: dict[str, str]) -> None:
        reader = PeriodicExportingMetricReader(
            _metric_exporter(self.config, headers),
            export_interval_millis=self.config.export_interval_seconds * 1000,
            export_timeout_millis=self.config.export_timeout_seconds * 1000,
        )
        self.meter_provider = provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = provider.get_meter(_SCOPE)
        self._tokens = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Input and output tokens used per request.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
        )
        self._duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="Time from request headers to the end of the answer.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token",
            unit="s",
            description="Time to the first content event of a successful streamed answer.",
            explicit_bucket_boundaries_advisory=_TTFT_BUCKETS,
        )
        self._tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="Time per output token after the first, for successful streamed answers.",
            explicit_bucket_boundaries_advisory=_TPOT_BUCKETS,
        )
        self._cost = meter.create_counter(
            "extproc.spend", unit="USD", description="Settled spend in USD."
        )
        self._saved = meter.create_counter(
            "extproc.cache.saved", unit="USD", description="What cache hits did not spend, in USD."
        )

    # -- per request ----------------------------------------------------------------------

    def start(self, headers: Mapping[str, str]) -> RequestTrace | None:
        """Open the request's span under the caller's `traceparent` (a new trace without one)."""
        if self.tracer_provider is None:
            return None
        parent: Context | None = None
        if "traceparent" in headers:
            parent = self._propagator.extract(headers)
        start_ns = time.time_ns()
        span = self._tracer.start_span(
            "gen_ai", context=parent, kind=SpanKind.CLIENT, start_time=start_ns
        )
        ctx = span.get_span_context()
        traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
        return RequestTrace(span, traceparent, start_ns)

    def record(
        self, trace: RequestTrace | None, record: Mapping[str, Any], generates: bool
    ) -> None:
        """Record a finished request's metrics and end its span (called once, from `account`)."""
        if self.meter_provider is not None and generates:
            self._record_metrics(record)
        if trace is not None:
            self._end_span(trace, record)

    def _common(self, record: Mapping[str, Any]) -> dict[str, Any]:
        api = record["api"]
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": _OPERATION.get(record["endpoint"] or "", record["endpoint"]),
            "gen_ai.provider.name": api,
            "gen_ai.system": api,
            "gen_ai.request.model": record["requested_model"] or "",
        }
        if record["served_model"]:
            attributes["gen_ai.response.model"] = record["served_model"]
        server = self._servers.get(record["provider"] or "")
        if server is not None:
            attributes["server.address"], attributes["server.port"] = server
        return attributes

    def _record_metrics(self, record: Mapping[str, Any]) -> None:
        common = self._common(record)
        error = _error_type(record)
        duration = dict(common, **{"error.type": error}) if error else common
        self._duration.record(record["latency_ms"] / 1000, duration)
        if error is not None:
            return
        team = {"extproc.team": record["team"] or ""}
        if record["outcome"] == "cache_hit":
            if record.get("cost_saved_usd"):
                self._saved.add(record["cost_saved_usd"], dict(common, **team))
            return
        for kind, value in (("input", _input_tokens(record)), ("output", record["output_tokens"])):
            if value:
                self._tokens.record(value, dict(common, **team, **{"gen_ai.token.type": kind}))
        if record.get("cost_usd"):
            self._cost.add(record["cost_usd"], dict(common, **team))
        self._record_speed(record, common)

    def _record_speed(self, record: Mapping[str, Any], common: dict[str, Any]) -> None:
        ttft_ms = record["ttft_ms"]
        if not record["streamed"] or ttft_ms is None:
            return
        self._ttft.record(ttft_ms / 1000, common)
        output = record["output_tokens"]
        if output > 1:
            self._tpot.record((record["latency_ms"] - ttft_ms) / 1000 / (output - 1), common)

    def _end_span(self, trace: RequestTrace, record: Mapping[str, Any]) -> None:
        span = trace.span
        if span.is_recording():
            attributes = self._common(record)
            model = attributes["gen_ai.request.model"]
            span.update_name(f"{attributes['gen_ai.operation.name']} {model}".rstrip())
            attributes.update(span_attributes(record))
            span.set_attributes({k: v for k, v in attributes.items() if v is not None})
            error = _error_type(record)
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=trace.start_ns + int(record["latency_ms"] * 1e6))

    def shutdown(self) -> None:
        """Flush what is queued (bounded by the export timeout) and stop the export threads."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown(timeout_millis=self.config.export_timeout_seconds * 1000)

    def force_flush(self) -> None:
        """Export everything now (tests and shutdown)."""
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()
        if self.meter_provider is not None:
            self.meter_provider.force_flush()


def span_attributes(record: Mapping[str, Any]) -> dict[str, Any]:
    """The span's usage, response and gateway attributes, from the audit record."""
    attributes: dict[str, Any] = {
        "gen_ai.usage.input_tokens": _input_tokens(record),
        "gen_ai.usage.output_tokens": record["output_tokens"],
        "gen_ai.usage.cache_read.input_tokens": record["cache_read_input_tokens"],
        "gen_ai.usage.cache_creation.input_tokens": record["cache_creation_input_tokens"],
        "gen_ai.response.finish_reasons": tuple(record.get("finish_reasons") or ()),
        "gen_ai.conversation.id": record["session_id"],
        "http.response.status_code": record["status"] or None,
        "error.type": _error_type(record),
    }
    for name in ("request_id", "route", "api", "endpoint", "outcome", "provider", "streamed"):
        attributes[f"extproc.{name}"] = record[name]
    for name in ("identity", "key_id", "user", "team", "project", "tier", "ttft_ms"):
        attributes[f"extproc.{name}"] = record[name]
    attributes["extproc.cost_usd"] = record.get("cost_usd")
    attributes["extproc.cost_saved_usd"] = record.get("cost_saved_usd")
    scopes = record.get("scopes")
    if scopes:
        attributes["extproc.budget.scopes"] = tuple(f"{k}:{v}" for k, v in scopes.items())
    if "cache" in record:
        attributes["extproc.cache.result"] = record["cache"]
        attributes["extproc.cache.stored"] = record["cache_stored"]
    guard = record.get("guard")
    if guard is not None:
        attributes.update(_guard_attributes(guard))
    return attributes


def _guard_attributes(guard: Mapping[str, Any]) -> dict[str, Any]:
    def verdicts(entries: list[dict[str, Any]]) -> tuple[str, ...]:
        return tuple(f"{v['rule']}:{v['action']}:{v['count']}" for v in entries)

    attributes: dict[str, Any] = {
        "extproc.guard.profile": guard["profile"],
        "extproc.guard.input": verdicts(guard["input"]),
        "extproc.guard.output": verdicts(guard["output"]),
    }
    injection = guard.get("injection")
    if injection:
        attributes["extproc.guard.injection.score"] = injection["score"]
        attributes["extproc.guard.injection.action"] = injection["action"]
    return attributes


def _input_tokens(record: Mapping[str, Any]) -> int:
    """All input tokens, cached ones included, as the conventions count them."""
    total: int = (
        record["input_tokens"]
        + record["cache_read_input_tokens"]
        + record["cache_creation_input_tokens"]
    )
    return total


def _error_type(record: Mapping[str, Any]) -> str | None:
    outcome = record["outcome"] or ""
    if outcome.startswith("rejected_"):
        return outcome.removeprefix("rejected_")
    if record.get("error_type"):
        return str(record["error_type"])
    status = record["status"] or 0
    if status >= 400:
        return str(status)
    if outcome == "aborted":
        return "aborted"
    return None


def _span_exporter(config: OtelConfig, headers: dict[str, str]) -> SpanExporter:
    timeout = config.export_timeout_seconds
    if config.protocol == "http":
        return HttpSpanExporter(
            endpoint=f"{config.endpoint}/v1/traces", headers=headers, timeout=timeout
        )
    return GrpcSpanExporter(
        endpoint=config.endpoint,
        insecure=config.endpoint.startswith("http://"),
        headers=tuple(headers.items()),
        timeout=timeout,
    )


def _metric_exporter(config: OtelConfig, headers: dict[str, str]) -> MetricExporter:
    timeout = config.export_timeout_seconds
    if config.protocol == "http":
        return HttpMetricExporter(
            endpoint=f"{config.endpoint}/v1/metrics", headers=headers, timeout=timeout
        )
    return GrpcMetricExporter(
        endpoint=config.endpoint,
        insecure=config.endpoint.startswith("http://"),
        headers=tuple(headers.items()),
        timeout=timeout,
    )
