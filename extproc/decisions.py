"""What a phase decides, as plain values.

Policies and the per-request stream return these; only `extproc.envoy_api`
turns them into Envoy `ProcessingResponse` protobufs. Keeping them free of
protobuf types lets the policy layer be tested with plain asserts.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from extproc.slots import slot_init


class BodyMode(enum.Enum):
    """How Envoy sends the rest of a body to us (a `mode_override`)."""

    NONE = "none"
    BUFFERED = "buffered"
    STREAMED = "streamed"


@slot_init
@dataclass(frozen=True, slots=True)
class HeaderChanges:
    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.remove)


@slot_init
@dataclass(frozen=True, slots=True)
class Continue:
    """Let the message through, optionally changed."""

    headers: HeaderChanges = HeaderChanges()
    body: bytes | None = None
    clear_route_cache: bool = False
    response_body_mode: BodyMode | None = None
    dynamic_metadata: Mapping[str, Any] | None = None


@slot_init
@dataclass(frozen=True, slots=True)
class Respond:
    """Answer the client now; nothing reaches (or further leaves) the provider."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = field(default=(("content-type", "application/json"),))
    details: str = "extproc"


Decision = Continue | Respond

CONTINUE = Continue()
