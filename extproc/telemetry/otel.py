"""OpenTelemetry telemetry as the request path sees it: start a span, record a request.

`open_otel` gives `NoOtel` when `telemetry.otel` is absent (nothing started, recorded or
propagated) and otherwise `OtelProcess`, which picks span ids on the request path and
hands each finished audit record to a telemetry process running the SDK
(`extproc.telemetry.otel_sdk`, which documents what is emitted). The gateway process
never imports the SDK.
"""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from extproc.credentials import Credential

if TYPE_CHECKING:
    from extproc.config import Config


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


# Largest message to the telemetry process; a record is a few KB (no prompt text).
MAX_MESSAGE = 1 << 20
# Finished requests the socket buffers for the telemetry process, as bytes per request.
_BYTES_PER_RECORD = 2048
# Requests sent to the telemetry process together, and how long one may wait for more.
_BATCH = 64
_BATCH_SECONDS = 0.05
_TEXT_FIELDS = ("prompt", "completion")


class OtelProcess:
    """The gateway's side of OpenTelemetry: span ids on the request path, the rest in a
    telemetry process (`python -m extproc.telemetry.otel_sdk`).

    `record` sends finished audit records, in batches, over a non-blocking SOCK_SEQPACKET
    socket (message boundaries kept, so no framing); a full socket buffer drops the batch
    (`on_drop` per request) instead of waiting. The SDK's CPU work (metrics, spans, OTLP encoding)
    runs in that process, on another core, without the gateway's GIL. It dies with the
    gateway (PR_SET_PDEATHSIG) and reads EOF if the gateway's socket closes."""

    def __init__(
        self,
        config: Config,
        environ: Mapping[str, str] | None = None,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        otel = config.telemetry.otel
        assert otel is not None
        self.config = otel
        self._on_drop = on_drop
        self._bound = round(otel.sample_ratio * (TRACE_ID_LIMIT + 1))
        self.dropped = 0
        self._pending: list[tuple[Any, ...]] = []
        self._swap = threading.Lock()
        setup = orjson.dumps(
            {
                "otel": otel.model_dump(mode="json", exclude={"headers"}),
                "headers": {k: Credential(v, environ).get() for k, v in otel.headers.items()},
                "servers": {n: [p.hostname, p.port] for n, p in config.providers.items()},
            }
        )
        self._socket, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        buffer = otel.max_queue_size * _BYTES_PER_RECORD
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        self._socket.send(setup)  # the first message; queued before the process exists
        self._socket.setblocking(False)
        self.process = _spawn(theirs)
        theirs.close()

    def start(self, headers: Mapping[str, str]) -> RequestTrace | None:
        """Choose the request's span ids under the caller's `traceparent` (a few µs)."""
        return start_trace(headers, self._bound) if self.config.traces else None

    def record(
        self, trace: RequestTrace | None, record: Mapping[str, Any], generates: bool
    ) -> None:
        """Hand a finished request to the telemetry process; never blocks.

        Requests go in batches (at most `_BATCH` or `_BATCH_SECONDS` old): one message and
        one wake-up of the telemetry process per batch, not per request."""
        if any(field in record for field in _TEXT_FIELDS):  # telemetry never carries text
            record = {k: v for k, v in record.items() if k not in _TEXT_FIELDS}
        ids: tuple[Any, ...] | None = None
        if trace is not None:  # the fields in order; a 128-bit id as hex (JSON has no int128)
            ids = (f"{trace.trace_id:032x}", trace.span_id, trace.sampled, trace.start_ns)
            ids += (trace.parent_id, trace.parent_flags, trace.tracestate)
        self._pending.append((ids, record, generates))
        if len(self._pending) >= _BATCH:
            self._send_pending()
        elif len(self._pending) == 1:
            self._schedule_send()

    def _schedule_send(self) -> None:
        try:
            asyncio.get_running_loop().call_later(_BATCH_SECONDS, self._send_pending)
        except RuntimeError:  # no event loop (a script): send at once
            self._send_pending()

    def _send_pending(self) -> None:
        with self._swap:  # shutdown sends from a worker thread while the loop may too
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            self._socket.send(orjson.dumps(["records", batch]))
        except (OSError, TypeError):  # buffer full, process gone, or unencodable
            self.dropped += len(batch)
            if self._on_drop is not None:
                for _ in batch:
                    self._on_drop()

    def _ask(self, request: str, seconds: float) -> bool:
        """Send `request` behind every record so far and wait for its answer."""
        try:
            self._socket.setblocking(True)
            self._socket.settimeout(seconds)
            self._socket.send(orjson.dumps([request]))
            return bool(self._socket.recv(MAX_MESSAGE))
        except OSError:
            return False
        finally:
            self._socket.setblocking(False)

    def force_flush(self) -> None:
        """Record and export everything sent so far (tests, benchmarks)."""
        self._send_pending()
        self._ask("flush", self.config.export_timeout_seconds * 2 + 5)

    def shutdown(self) -> None:
        """Flush and stop the telemetry process: bounded by the export timeout."""
        seconds = self.config.export_timeout_seconds * 2 + 5
        self._send_pending()
        self._ask("stop", seconds)
        self._socket.close()
        try:
            self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _spawn(channel: socket.socket) -> subprocess.Popen[bytes]:
    """Start the telemetry process with its end of the socket pair.

    No `preexec_fn`: forking a process whose gRPC threads are running and then running
    Python in the child before `exec` is unsafe (CI saw the child die before it read its
    setup). The process needs no death signal either: when the gateway is gone, its end
    of the socket closes and the process flushes and exits."""
    command = [sys.executable, "-m", "extproc.telemetry.otel_sdk", str(channel.fileno())]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, pass_fds=(channel.fileno(),))


def open_otel(
    config: Config,
    environ: Mapping[str, str] | None = None,
    on_drop: Callable[[], None] | None = None,
) -> OtelProcess | NoOtel:
    """`on_drop` is called (on the request path) for each request telemetry had to drop."""
    if config.telemetry.otel is None:
        return NoOtel()
    _check_proto()
    return OtelProcess(config, environ, on_drop)


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
