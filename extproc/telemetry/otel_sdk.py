"""OpenTelemetry GenAI telemetry through the SDK, in the gateway's telemetry process.

Follows the OpenTelemetry semantic conventions for generative AI (metrics
`gen_ai.client.token.usage`, `gen_ai.client.operation.duration`,
`gen_ai.server.time_to_first_token`, `gen_ai.server.time_per_output_token`; a CLIENT
span named `{operation} {model}` with `gen_ai.*` attributes) plus the gateway's own
`extproc.*` attributes: identity, cache, guard verdicts, budget scopes and cost.

Everything is fed by the audit record (`extproc.telemetry.record`), so nothing here
reads a request a second time. The gateway's request path only chooses the span's ids
when the headers arrive (`extproc.telemetry.otel.start_trace`: the caller's
`traceparent` is the parent, our span goes upstream and back to the client as the new
`traceparent`) and sends the finished record, in batches, to this process
(`extproc.telemetry.otel.OtelProcess`). Here `main` builds the metrics and the span
(with those ids, through `_ChosenIds`) and the SDK's BatchSpanProcessor and
PeriodicExportingMetricReader export them from their own threads. The SDK's CPU work
never competes with the gateway's event loop for a GIL, and nothing on the request path
waits on it or on the collector.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
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
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)
from opentelemetry.trace.span import TraceState

from extproc.config import OtelConfig
from extproc.telemetry.otel import MAX_MESSAGE, RequestTrace

log = logging.getLogger(__name__)

# Bucket boundaries the conventions advise for each histogram.
_TOKEN_BUCKETS = [4.0**i for i in range(14)]  # 1, 4, 16 ... 67108864
_DURATION_BUCKETS = [0.01 * 2**i for i in range(14)]  # 0.01 ... 81.92
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0]
_TTFT_BUCKETS += [7.5, 10.0]
_TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]

# `gen_ai.operation.name` per endpoint (the conventions name "chat"; others keep ours).
_OPERATION = {"messages": "chat", "chat_completions": "chat"}
_SCOPE = "extproc"


class _ChosenIds(IdGenerator):
    """Hands the SDK the ids the request path already chose (and sent on in `traceparent`).

    Only the recording thread creates spans, so one pending pair is enough."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_span_id(self) -> int:
        return self.span_id

    def generate_trace_id(self) -> int:
        return self.trace_id


class Otel:
    """The OpenTelemetry SDK set up from `telemetry.otel`: turns finished requests into
    metrics and spans. It runs in the telemetry process (`main`), never in the gateway's,
    so its work does not compete with the event loop for the GIL."""

    def __init__(
        self,
        config: OtelConfig,
        headers: Mapping[str, str],
        servers: Mapping[str, tuple[str, int]],
    ) -> None:
        self.config = config
        resource = Resource.create(
            {
                "service.name": config.service_name,
                # Worker processes of one replica each export their own cumulative series.
                "service.instance.id": f"{uuid.uuid4().hex[:12]}-{os.getppid()}",
            }
        )
        self._servers = dict(servers)
        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None
        if config.traces:
            self._start_traces(resource, dict(headers))
        if config.metrics:
            self._start_metrics(resource, dict(headers))

    def _start_traces(self, resource: Resource, headers: dict[str, str]) -> None:
        # The request path samples (`start_trace`); the SDK records what it is given.
        self._ids = _ChosenIds()
        provider = TracerProvider(resource=resource, sampler=ALWAYS_ON, id_generator=self._ids)
        processor = BatchSpanProcessor(
            _span_exporter(self.config, headers),
            max_queue_size=self.config.max_queue_size,
            max_export_batch_size=min(512, self.config.max_queue_size),
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

    def record(
        self, trace: RequestTrace | None, record: Mapping[str, Any], generates: bool
    ) -> None:
        """Record one finished request's metrics and, if sampled, its span."""
        if self.meter_provider is not None and generates:
            self._record_metrics(record)
        if trace is not None and trace.sampled:
            self._emit_span(trace, record)

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

    def _emit_span(self, trace: RequestTrace, record: Mapping[str, Any]) -> None:
        attributes = self._common(record)
        name = f"{attributes['gen_ai.operation.name']} {attributes['gen_ai.request.model']}"
        attributes.update(span_attributes(record))
        parent = None
        if trace.parent_id is not None:
            state = TraceState.from_header([trace.tracestate]) if trace.tracestate else None
            caller = SpanContext(
                trace.trace_id, trace.parent_id, True, TraceFlags(trace.parent_flags), state
            )
            parent = set_span_in_context(NonRecordingSpan(caller))
        self._ids.trace_id, self._ids.span_id = trace.trace_id, trace.span_id
        span = self._tracer.start_span(
            name.rstrip(),
            context=parent,
            kind=SpanKind.CLIENT,
            attributes={k: v for k, v in attributes.items() if v is not None},
            start_time=trace.start_ns,
        )
        error = _error_type(record)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=trace.start_ns + int(record["latency_ms"] * 1e6))

    def shutdown(self) -> None:
        """Flush what is recorded (bounded by the export timeout) and stop exporting."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown(timeout_millis=self.config.export_timeout_seconds * 1000)

    def force_flush(self) -> None:
        """Export everything recorded now."""
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
    if outcome in ("client_abort", "provider_reset", "truncated"):
        return outcome  # the answer was cut short
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


# -- the telemetry process ----------------------------------------------------------------


def main() -> None:
    """`python -m extproc.telemetry.otel_sdk FD`: the gateway's telemetry process.

    Reads messages from the gateway on the SOCK_SEQPACKET socket FD (see `OtelProcess`):
    first its setup (config, resolved headers, provider servers) as JSON, then records."""
    channel = socket.socket(fileno=int(sys.argv[1]))
    setup = orjson.loads(channel.recv(MAX_MESSAGE))
    config = OtelConfig.model_validate(setup["otel"])
    servers = {name: (host, port) for name, (host, port) in setup["servers"].items()}
    otel = Otel(config, setup["headers"], servers)
    while True:
        message = channel.recv(MAX_MESSAGE)
        if not message:  # the gateway is gone
            otel.shutdown()
            return
        kind, *body = orjson.loads(message)
        if kind == "records":
            for trace, record, generates in body[0]:
                ids = RequestTrace(int(trace[0], 16), *trace[1:]) if trace else None
                _safely(otel.record, ids, record, generates)
        elif kind == "flush":
            otel.force_flush()
            channel.send(b'"flushed"')
        elif kind == "stop":
            otel.shutdown()
            channel.send(b'"stopped"')
            return


def _safely(record: Any, *args: Any) -> None:
    try:
        record(*args)
    except Exception:  # one bad record must not stop telemetry for the rest
        log.exception("cannot record OpenTelemetry data for a request")


if __name__ == "__main__":
    main()
