"""A small OTLP receiver for tests, built on the official OTLP protobufs (opentelemetry-proto).

The OpenTelemetry Collector is a Go binary that none of the registries here ship, so the
tests run this instead: the OTLP/gRPC `TraceService` and `MetricsService` and the
OTLP/HTTP `/v1/traces` and `/v1/metrics` endpoints (binary protobuf, optionally gzip),
on loopback ports, keeping every export request decoded so a test can assert what
arrived: span ids, parents, attributes, metric names, data-point attributes and values.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2 as metrics_pb,
)
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2_grpc as metrics_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc
from opentelemetry.proto.common.v1 import common_pb2

from tests.harness import free_port


def _value(any_value: common_pb2.AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    status_code: int
    resource: dict[str, Any]
    start_ns: int
    end_ns: int
    trace_state: str


@dataclass
class Point:
    """One metric data point: a histogram's count/sum/buckets or a sum's value."""

    metric: str
    unit: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    count: int = 0
    sum: float = 0.0
    value: float = 0.0
    bounds: list[float] = field(default_factory=list)


@dataclass
class Received:
    traces: list[tuple[str, trace_pb.ExportTraceServiceRequest]] = field(default_factory=list)
    metrics: list[tuple[str, metrics_pb.ExportMetricsServiceRequest]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spans(self, transport: str | None = None) -> list[Span]:
        with self.lock:
            requests = [r for t, r in self.traces if transport in (None, t)]
        return [span for request in requests for span in _spans(request)]

    def points(self, transport: str | None = None) -> list[Point]:
        with self.lock:
            requests = [r for t, r in self.metrics if transport in (None, t)]
        return [point for request in requests for point in _points(request)]

    def clear(self) -> None:
        with self.lock:
            self.traces.clear()
            self.metrics.clear()
            self.headers.clear()


def _spans(request: trace_pb.ExportTraceServiceRequest) -> Iterator[Span]:
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope in resource_spans.scope_spans:
            for s in scope.spans:
                yield Span(
                    s.name,
                    s.trace_id.hex(),
                    s.span_id.hex(),
                    s.parent_span_id.hex(),
                    s.kind,
                    attributes(s.attributes),
                    s.status.code,
                    resource,
                    s.start_time_unix_nano,
                    s.end_time_unix_nano,
                    s.trace_state,
                )


def _points(request: metrics_pb.ExportMetricsServiceRequest) -> Iterator[Point]:
    for resource_metrics in request.resource_metrics:
        resource = attributes(resource_metrics.resource.attributes)
        for scope in resource_metrics.scope_metrics:
            for m in scope.metrics:
                kind = str(m.WhichOneof("data"))
                for p in getattr(m, kind).data_points:
                    point = Point(m.name, m.unit, attributes(p.attributes), resource)
                    if kind == "histogram":
                        point.count, point.sum = p.count, p.sum
                        point.bounds = list(p.explicit_bounds)
                    else:
                        point.value = p.as_double if p.HasField("as_double") else p.as_int
                    yield point


class _Traces(trace_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    def Export(self, request: Any, context: Any) -> Any:
        with self.received.lock:
            self.received.traces.append(("grpc", request))
            self.received.headers.append(dict(context.invocation_metadata()))
        return trace_pb.ExportTraceServiceResponse()


class _Metrics(metrics_grpc.MetricsServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    def Export(self, request: Any, context: Any) -> Any:
        with self.received.lock:
            self.received.metrics.append(("grpc", request))
            self.received.headers.append(dict(context.invocation_metadata()))
        return metrics_pb.ExportMetricsServiceResponse()


def _http_handler(received: Received) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            if self.headers.get("content-type") != "application/x-protobuf":
                self.send_error(415)
                return
            if self.path == "/v1/traces":
                request: Any = trace_pb.ExportTraceServiceRequest.FromString(body)
                reply: Any = trace_pb.ExportTraceServiceResponse()
                target: list[tuple[str, Any]] = received.traces
            elif self.path == "/v1/metrics":
                request = metrics_pb.ExportMetricsServiceRequest.FromString(body)
                reply = metrics_pb.ExportMetricsServiceResponse()
                target = received.metrics
            else:
                self.send_error(404)
                return
            with received.lock:
                target.append(("http", request))
                received.headers.append({k.lower(): v for k, v in self.headers.items()})
            data = reply.SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    return Handler


@dataclass
class Receiver:
    received: Received
    grpc_url: str
    http_url: str


@contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    """Both OTLP transports on free loopback ports, for the duration of the block."""
    received = Received()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_grpc.add_TraceServiceServicer_to_server(_Traces(received), server)  # type: ignore[no-untyped-call]
    metrics_grpc.add_MetricsServiceServicer_to_server(_Metrics(received), server)  # type: ignore[no-untyped-call]
    grpc_port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", free_port()), _http_handler(received))
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield Receiver(
            received, f"http://127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http.server_port}"
        )
    finally:
        http.shutdown()
        http.server_close()
        server.stop(0)


def wait_until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll `check` (bounded in time) instead of sleeping a fixed while."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {seconds} s")
        time.sleep(0.02)
