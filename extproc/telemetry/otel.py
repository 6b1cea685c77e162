"""OpenTelemetry telemetry as the request path sees it: start a span, record a request.

`open_otel` gives `NoOtel` when `telemetry.otel` is absent (nothing started, recorded or
propagated, and the SDK is never imported) and otherwise the SDK-backed `Otel` from
`extproc.telemetry.otel_sdk`, which documents what is emitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from extproc.config import Config
    from extproc.telemetry.otel_sdk import Otel


class OtelUnavailable(Exception):
    """The OpenTelemetry packages cannot run (for example a stale `opentelemetry.proto`)."""


@dataclass(slots=True)
class RequestTrace:
    """The span of one request and its W3C `traceparent`, for the provider and the client."""

    span: Span
    traceparent: str
    start_ns: int


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


def open_otel(config: Config, environ: Mapping[str, str] | None = None) -> Otel | NoOtel:
    otel = config.telemetry.otel
    if otel is None:
        return NoOtel()
    _check_proto()
    from extproc.telemetry.otel_sdk import Otel

    return Otel(otel, config, environ)


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
