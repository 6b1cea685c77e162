"""The ext_proc phases as plain values: what `envoy_api` makes of each Envoy message.

`envoy_api.event_of` turns one `ProcessingRequest` into one frozen event; the servicer
hands it to `RequestStream.handle`, whose phase table (`stream._NEXT`) is keyed by
`Phase`. Nothing here imports Envoy's protobufs.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.slots import slot_init

__all__ = [
    "Event",
    "Phase",
    "RequestBody",
    "RequestHeaders",
    "ResponseBody",
    "ResponseHeaders",
    "Trailers",
]


class Phase(enum.Enum):
    """An ext_proc message kind (its value is the `ProcessingRequest` oneof name)."""

    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"
    REQUEST_TRAILERS = "request_trailers"
    RESPONSE_TRAILERS = "response_trailers"
    # Not a message: Envoy answered before the request reached the gateway, and its local
    # reply comes through the response phases (the stream's state, for the phase table).
    LOCAL_REPLY = "local_reply"

    # Members are singletons compared by identity: hash them so too (Enum's own __hash__
    # is a Python call, made on every phase-table lookup).
    __hash__ = object.__hash__


@slot_init
@dataclass(frozen=True, slots=True)
class RequestHeaders:
    headers: dict[str, str]  # lower-cased names, repeats joined by ','
    end_of_stream: bool
    route_name: str = ""
    route_policy: Mapping[str, Any] = field(default_factory=dict)  # the route's `extproc`
    jwt_metadata: Mapping[str, Any] = field(default_factory=dict)  # jwt_authn's, if any
    phase = Phase.REQUEST_HEADERS


@slot_init
@dataclass(frozen=True, slots=True)
class RequestBody:
    body: bytes
    end_of_stream: bool
    phase = Phase.REQUEST_BODY


@slot_init
@dataclass(frozen=True, slots=True)
class ResponseHeaders:
    headers: dict[str, str]
    end_of_stream: bool
    details: str = ""  # Envoy's response code details (a first-byte timeout, say)
    phase = Phase.RESPONSE_HEADERS


@slot_init
@dataclass(frozen=True, slots=True)
class ResponseBody:
    body: bytes
    end_of_stream: bool
    phase = Phase.RESPONSE_BODY


@slot_init
@dataclass(frozen=True, slots=True)
class Trailers:
    """Request or response trailers: passed on unchanged."""

    phase: Phase


Event = RequestHeaders | RequestBody | ResponseHeaders | ResponseBody | Trailers
