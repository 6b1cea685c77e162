"""OpenTelemetry telemetry as the request path sees it: start a span, record a request.

`open_otel` gives `NoOtel` when `telemetry.otel` is absent (nothing started, recorded or
propagated, and the SDK is never imported) and otherwise the SDK-backed `Otel` from
`extproc.telemetry.otel_sdk`, which documents what is emitted.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from extproc.config import Config
    from extproc.telemetry.otel_sdk import Otel


class OtelUnavailable(Exception):
    """The OpenTelemetry packages cannot run (for example a stale `opentelemetry.proto`)."""


@dataclass(frozen=True, slots=True)
class RequestTrace:
    """One request's span as decided on the request path: ids, sampling, its parent.

    The SDK span itself is built later, off the request path, with these ids."""

    trace_id: int
    span_id: int
    sampled: bool
    start_ns: int
    parent_id: int | None  # the caller's span, from a valid `traceparent`
    parent_flags: int
    tracestate: str | None

    @property
    def traceparent(self) -> str:
        """This span as a W3C `traceparent`: the provider's call and the client's view are
        its children."""
        flags = "01" if self.sampled else "00"
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{flags}"


_HEX = frozenset("0123456789abcdef")
TRACE_ID_LIMIT = (1 << 64) - 1


def parse_traceparent(value: str | None) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a valid W3C `traceparent`, else None."""
    if value is None or len(value) < 55:
        return None
    parts = value.split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    version, trace, span, flags = parts[:4]
    if parts[0] == "00" and len(parts) != 4:
        return None
    if (len(trace), len(span), len(flags)) != (32, 16, 2):
        return None
    if not _HEX.issuperset(version + trace + span + flags):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags, 16)


def start_trace(headers: Mapping[str, str], bound: int) -> RequestTrace:
    """The request's span under the caller's `traceparent` (a new trace without a valid one).

    A caller's sampling decision is followed; a new trace is sampled when the low 64 bits
    of its id fall under `bound` (the rule of the SDK's TraceIdRatioBased sampler)."""
    parent = parse_traceparent(headers.get("traceparent"))
    span_id = random.getrandbits(64) or 1  # ids, not secrets
    if parent is None:
        trace_id = random.getrandbits(128) or 1
        sampled = trace_id & TRACE_ID_LIMIT < bound
        return RequestTrace(trace_id, span_id, sampled, time.time_ns(), None, 0, None)
    trace_id, parent_id, flags = parent
    state = headers.get("tracestate")
    return RequestTrace(trace_id, span_id, bool(flags & 1), time.time_ns(), parent_id, flags, state)


class NoOtel:
    """Telemetry off."""

    def start(self, headers: Mapping[str, str]) -> RequestTrace | None:
        return None

    def record(
        self, trace: RequestTrace | None, record: Mapping[str, Any], generates: bool
    ) -> None:
        return None

    def shutdown(self) -> None:
        return None


def open_otel(
    config: Config,
    environ: Mapping[str, str] | None = None,
    on_drop: Callable[[], None] | None = None,
) -> Otel | NoOtel:
    """`on_drop` is called (on the request path) for each request the full queue refuses."""
    otel = config.telemetry.otel
    if otel is None:
        return NoOtel()
    _check_proto()
    from extproc.telemetry.otel_sdk import Otel

    return Otel(otel, config, environ, on_drop=on_drop)


def _check_proto() -> None:
    """xds-protos ships an old copy of `opentelemetry/proto` that, installed after
    opentelemetry-proto, overwrites it; the OTLP exporters then fail on import."""
    from opentelemetry.proto.common.v1 import common_pb2

    if not hasattr(common_pb2, "InstrumentationScope"):
        raise OtelUnavailable(
            "telemetry.otel: the installed opentelemetry/proto files are xds-protos' old copy; "
            "run `pip install --force-reinstall --no-deps opentelemetry-proto` (scripts/test "
            "and the Dockerfile do this)"
        )
