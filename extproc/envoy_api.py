"""The one place that speaks Envoy's ext_proc protobufs.

Each incoming `ProcessingRequest` becomes one frozen event value (`event_of`, see
`extproc.phases`); `Decision` values (see `extproc.decisions`) become
`ProcessingResponse`s. Nothing else in the package imports Envoy types.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format, struct_pb2, text_format

from extproc.decisions import CONTINUE, BodyMode, Continue, Decision, HeaderChanges, Respond
from extproc.phases import (
    Event,
    Phase,
    RequestBody,
    RequestHeaders,
    ResponseBody,
    ResponseHeaders,
    Trailers,
)

__all__ = [
    "Phase",
    "attributes_of",
    "body_of",
    "dynamic_metadata_of",
    "event_of",
    "extend_timeout",
    "headers_of",
    "host_metadata_of",
    "phase_of",
    "route_policy_of",
    "to_response",
]

EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
METADATA_NAMESPACE = "extproc"

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_MODES = {
    BodyMode.NONE: processing_mode_pb2.ProcessingMode.NONE,
    BodyMode.BUFFERED: processing_mode_pb2.ProcessingMode.BUFFERED,
    BodyMode.STREAMED: processing_mode_pb2.ProcessingMode.STREAMED,
}


_PHASES = {phase.value: phase for phase in Phase if phase is not Phase.LOCAL_REPLY}
# Each phase's oneof field name (`Phase.value` is a Python-level descriptor call).
_FIELD = {phase: phase.value for phase in Phase}


def phase_of(request: pb.ProcessingRequest) -> Phase | None:
    which = request.WhichOneof("request")
    return _PHASES.get(which) if which else None


def event_of(request: pb.ProcessingRequest, jwt_namespace: str | None = None) -> Event | None:
    """The message as a frozen event (None for a message with no phase);
    `jwt_namespace`: where jwt_authn's claims are, when the config uses it."""
    phase = phase_of(request)
    if phase is Phase.REQUEST_HEADERS:
        headers, eos = headers_of(request, phase)
        attributes = attributes_of(request)
        claims = dynamic_metadata_of(request, jwt_namespace) if jwt_namespace else {}
        return RequestHeaders(
            headers,
            eos,
            route_name=str(attributes.get("xds.route_name", "")),
            route_policy=route_policy_of(attributes),
            jwt_metadata=claims,
        )
    if phase is Phase.REQUEST_BODY:
        return RequestBody(*body_of(request, phase))
    if phase is Phase.RESPONSE_HEADERS:
        details = attributes_of(request).get("response.code_details", "")
        return ResponseHeaders(*headers_of(request, phase), details=str(details))
    if phase is Phase.RESPONSE_BODY:
        return ResponseBody(*body_of(request, phase))
    return Trailers(phase) if phase is not None else None


def headers_of(request: pb.ProcessingRequest, phase: Phase) -> tuple[dict[str, str], bool]:
    """Lower-cased header dict (repeated headers joined by ',') and end_of_stream."""
    message = getattr(request, _FIELD[phase])
    out: dict[str, str] = {}
    for header in message.headers.headers:
        raw = header.raw_value  # each field read is a descriptor call: read it once
        value = raw.decode("utf-8", "replace") if raw else header.value
        key = header.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out, bool(message.end_of_stream)


def body_of(request: pb.ProcessingRequest, phase: Phase) -> tuple[bytes, bool]:
    message = getattr(request, _FIELD[phase])
    return bytes(message.body), bool(message.end_of_stream)


def attributes_of(request: pb.ProcessingRequest) -> dict[str, Any]:
    """The request attributes Envoy sent (e.g. `xds.route_name`, `xds.route_metadata`)."""
    struct = request.attributes.get(EXT_PROC_FILTER)  # one map lookup, never an insert
    return {} if struct is None else _struct_dict(struct)


def _struct_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as `json_format.MessageToDict` makes it; the usual all-string one (route
    name and metadata text, response code details) read directly: json_format builds a
    printer and walks descriptors on every call."""
    out: dict[str, Any] = {}
    fields = struct.fields
    for name in fields:  # keys then lookups: a upb map's items() costs ~3x as much
        value = fields[name]
        if value.WhichOneof("kind") != "string_value":
            return dict(json_format.MessageToDict(struct))
        out[name] = value.string_value
    return out


@functools.lru_cache(maxsize=1024)
def _route_policy(text: str) -> dict[str, Any]:
    metadata = base_pb2.Metadata()
    text_format.Parse(text, metadata)
    if METADATA_NAMESPACE not in metadata.filter_metadata:
        return {}
    return json_format.MessageToDict(metadata.filter_metadata[METADATA_NAMESPACE])


def route_policy_of(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """The route's `extproc` metadata namespace (Envoy sends it as protobuf text)."""
    text = attributes.get("xds.route_metadata")
    if not isinstance(text, str) or not text:
        return {}
    return dict(_route_policy(text))


def host_metadata_of(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """The `extproc` metadata of the upstream host an attempt goes to (an upstream filter's
    `xds.upstream_host_metadata`, protobuf text like the route's)."""
    text = attributes.get("xds.upstream_host_metadata")
    if not isinstance(text, str) or not text:
        return {}
    return dict(_route_policy(text))


def dynamic_metadata_of(request: pb.ProcessingRequest, namespace: str) -> dict[str, Any]:
    """Dynamic metadata forwarded by Envoy (metadata_options.forwarding_namespaces)."""
    filter_metadata = request.metadata_context.filter_metadata
    if namespace not in filter_metadata:
        return {}
    return json_format.MessageToDict(filter_metadata[namespace])


def _fill_mutation(mutation: pb.HeaderMutation, changes: HeaderChanges) -> None:
    """Fill `mutation` in place: building sub-messages and copying them costs twice as much."""
    for key, value in changes.set:
        option = mutation.set_headers.add()
        header = option.header  # each sub-message read makes a wrapper: read it once
        header.key = key
        header.raw_value = value.encode()
        option.append_action = _OVERWRITE
    mutation.remove_headers.extend(changes.remove)


def _fill_common(common: pb.CommonResponse, decision: Continue) -> None:
    if decision.clear_route_cache:
        common.clear_route_cache = True
    if decision.headers:
        _fill_mutation(common.header_mutation, decision.headers)
    if decision.body is not None:
        common.body_mutation.body = decision.body


def _immediate(decision: Respond) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = decision.status
    _fill_mutation(immediate.headers, HeaderChanges(set=decision.headers))
    immediate.body = decision.body
    immediate.details = decision.details
    return response


def _metadata(values: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update({METADATA_NAMESPACE: dict(values)})
    return struct


def extend_timeout(seconds: float) -> pb.ProcessingResponse:
    """Ask Envoy to wait longer for the reply to the pending message (up to its
    max_message_timeout), e.g. while waiting on an identical in-flight request."""
    response = pb.ProcessingResponse()
    response.override_message_timeout.FromNanoseconds(int(seconds * 1e9))
    return response


def to_response(phase: Phase, decision: Decision) -> pb.ProcessingResponse:
    """Render a decision as the reply to the message of `phase`.

    The reply to a plain `CONTINUE` is one shared message per phase (half of a request's
    replies), and so is a request-side reply that only changes headers: callers
    serialise it and must not change it."""
    if decision is CONTINUE:
        return _PLAIN[phase]
    if (
        phase in _REQUEST_SIDE
        and type(decision) is Continue
        and decision.body is None
        and decision.dynamic_metadata is None
    ):
        return _shared(phase, decision)
    return _render(phase, decision)


# The request body's reply repeats from request to request (the same cluster header,
# credential and removed gateway key for every request of a route), and building it is
# one protobuf wrapper per field set: a hit costs a tenth of it. Response-side replies
# carry the request's id (x-gateway-request-id) and never repeat, so they are not kept
# (they would only push the repeating ones out); nor is a changed body (large, and
# hashed on every lookup).
_REQUEST_SIDE = frozenset({Phase.REQUEST_HEADERS, Phase.REQUEST_BODY})


@functools.lru_cache(maxsize=256)
def _shared(phase: Phase, decision: Continue) -> pb.ProcessingResponse:
    return _render(phase, decision)


def _render(phase: Phase, decision: Decision) -> pb.ProcessingResponse:
    if isinstance(decision, Respond):
        return _immediate(decision)
    response = pb.ProcessingResponse()
    if phase in (Phase.REQUEST_TRAILERS, Phase.RESPONSE_TRAILERS):
        getattr(response, _FIELD[phase]).SetInParent()
        return response
    message = getattr(response, _FIELD[phase])
    message.SetInParent()
    message.response.SetInParent()
    _fill_common(message.response, decision)
    if decision.response_body_mode is not None:
        response.mode_override.response_body_mode = _MODES[decision.response_body_mode]
    if decision.dynamic_metadata:
        response.dynamic_metadata.CopyFrom(_metadata(decision.dynamic_metadata))
    return response


_PLAIN: dict[Phase, pb.ProcessingResponse] = {
    phase: _render(phase, CONTINUE) for phase in Phase if phase is not Phase.LOCAL_REPLY
}
