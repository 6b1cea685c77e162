"""The OTLP relay: `/v1/metrics`, `/v1/logs`, `/v1/traces` from Claude Code to a collector.

Claude Code, signed in to a gateway, sends its OTLP/HTTP exports (protobuf or JSON)
here. Each export is stamped with the authenticated user (`enduser.id` and, for SSO
users, `extproc.sso_group` on every resource) and forwarded to `otlp_relay.endpoint`
in the background; the client always gets 200 at once (a 404 or a slow collector
would make its exporter log errors on every flush). Without an endpoint exports are
dropped. At most `max_in_flight` forwards run at once; more are dropped and counted.

Stamping protobuf needs no OTLP schema: every Export*ServiceRequest is a list of
Resource{Metrics,Logs,Spans} in field 1, each with its `Resource` in field 1, and
protobuf merges a repeated embedded message, so appending one more `resource` with
the extra attributes to each entry adds them.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import orjson

from extproc.signin.config import OtlpRelayConfig

log = logging.getLogger(__name__)

SIGNALS = {
    "/v1/metrics": "resourceMetrics",
    "/v1/logs": "resourceLogs",
    "/v1/traces": "resourceSpans",
}


class OtlpFormatError(Exception):
    """The body is not the OTLP it claims to be."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise OtlpFormatError("truncated varint")


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """Top-level (field number, wire type, raw field bytes including the tag)."""
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = _read_varint(data, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = _read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            pos += length
        else:
            raise OtlpFormatError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise OtlpFormatError("truncated field")
        yield tag >> 3, wire, data[start:pos]


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _attribute(key: str, value: str) -> bytes:
    any_value = _length_delimited(1, value.encode())
    return _length_delimited(1, key.encode()) + _length_delimited(2, any_value)


def stamp_protobuf(body: bytes, attributes: dict[str, str]) -> bytes:
    resource = b"".join(_length_delimited(1, _attribute(k, v)) for k, v in attributes.items())
    extra = _length_delimited(1, resource)
    out = bytearray()
    for number, wire, raw in _fields(body):
        if number == 1 and wire == 2:
            _, start = _read_varint(raw, 0)
            length, start = _read_varint(raw, start)
            out += _length_delimited(1, raw[start : start + length] + extra)
        else:
            out += raw
    return bytes(out)


def stamp_json(body: bytes, signal: str, attributes: dict[str, str]) -> bytes:
    try:
        data = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError as exc:
        raise OtlpFormatError("invalid JSON") from exc
    if not isinstance(data, dict):
        raise OtlpFormatError("expected a JSON object")
    extra = [{"key": k, "value": {"stringValue": v}} for k, v in attributes.items()]
    for entry in data.get(SIGNALS[signal]) or []:
        if isinstance(entry, dict):
            resource = entry.setdefault("resource", {})
            if isinstance(resource, dict):
                resource["attributes"] = [*(resource.get("attributes") or []), *extra]
    return orjson.dumps(data)


def stamp(path: str, content_type: str, body: bytes, attributes: dict[str, str]) -> bytes:
    if "json" in content_type:
        return stamp_json(body, path, attributes)
    return stamp_protobuf(body, attributes)


Send = Callable[[str, bytes, str, float], None]


def _send(url: str, body: bytes, content_type: str, timeout: float) -> None:
    request = urllib.request.Request(url, data=body, method="POST")  # noqa: S310 (validated http(s) URLs)
    request.add_header("content-type", content_type)
    with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 (validated http(s) URL)
        reply.read(65536)


class OtlpRelay:
    def __init__(self, config: OtlpRelayConfig, send: Send = _send) -> None:
        self.config = config
        self._send = send
        self.in_flight = 0
        self.dropped = 0
        self.forwarded = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, path: str, content_type: str, body: bytes, attributes: dict[str, str]) -> None:
        """Stamp and forward one export in the background (or drop it)."""
        if self.config.endpoint is None:
            return
        if self.in_flight >= self.config.max_in_flight:
            self.dropped += 1
            return
        stamped = stamp(path, content_type, body, attributes)
        self.in_flight += 1
        task = asyncio.ensure_future(
            self._forward(self.config.endpoint + path, stamped, content_type)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, url: str, body: bytes, content_type: str) -> None:
        try:
            await asyncio.to_thread(
                self._send, url, body, content_type, self.config.timeout_seconds
            )
            self.forwarded += 1
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.dropped += 1
            log.warning("OTLP relay: the collector refused or is unreachable: %s", exc)
        finally:
            self.in_flight -= 1
