"""The translator slot between a client's dialect and a provider's.

A `Translator` turns a request in the client's schema into the provider's (body and
path) and the provider's answer back (a JSON body, or a stream event by event).
`translator_for(client, upstream)` finds one: `IDENTITY` when the two are the same
schema (nothing is translated, and the request stream skips every translation call),
None when the gateway cannot serve that client from that provider (400 `wrong_api`).
Register a pair with `register_translator`; the Anthropic <-> OpenAI pairs
(`extproc.translate.registry.PAIRS`) are registered here.

`Transcoder` runs a streamed answer through a translator: the provider's framing
parses the bytes, the translator maps events, the client's framing encodes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from extproc.apis.framing import EventParser, Framing
from extproc.apis.kind import ApiKind
from extproc.apis.sse import SseEvent
from extproc.translate.registry import PAIRS

__all__ = [
    "IDENTITY",
    "EventTranslator",
    "HeaderTranslator",
    "Transcoder",
    "Translator",
    "register_translator",
    "translator_for",
]


class EventTranslator(Protocol):
    """One streamed answer: provider events in, client events out (state between)."""

    def feed(self, event: SseEvent) -> list[SseEvent]: ...

    def close(self) -> list[SseEvent]: ...


class Translator(Protocol):
    def request(self, body: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
        """The provider's body and path for a client's request (body after policies)."""
        ...

    def answer(self, body: Mapping[str, Any], status: int) -> dict[str, Any]:
        """A provider's JSON answer (or error body) in the client's schema."""
        ...

    def stream(self) -> EventTranslator: ...


class _Identity:
    """Same schema on both sides: nothing to translate."""

    def request(self, body: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
        return body, path

    def answer(self, body: Mapping[str, Any], status: int) -> dict[str, Any]:
        return dict(body)

    def stream(self) -> EventTranslator:
        return _PassEvents()


class _PassEvents:
    def feed(self, event: SseEvent) -> list[SseEvent]:
        return [event]

    def close(self) -> list[SseEvent]:
        return []


IDENTITY: Translator = _Identity()

_TRANSLATORS: dict[tuple[str, str], Translator] = {**PAIRS}


def register_translator(client: ApiKind, upstream: ApiKind, translator: Translator) -> None:
    _TRANSLATORS[(client, upstream)] = translator


def translator_for(client: ApiKind, upstream: ApiKind) -> Translator | None:
    """How a provider speaking `upstream` serves a `client` request; None: it cannot.
    A registered pair wins over identity: a Bedrock client's canonical body is rendered
    back into Bedrock's shape even for a Bedrock provider."""
    found = _TRANSLATORS.get((client, upstream))
    if found is not None:
        return found
    return IDENTITY if client == upstream else None


@runtime_checkable
class HeaderTranslator(Protocol):
    """A translator that also sets request headers (a body's `anthropic_beta` list
    becomes the `anthropic-beta` header the Anthropic API reads)."""

    def request_headers(
        self, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> tuple[tuple[str, str], ...]:
        """Headers to set, from the client's body (before `request`) and headers."""
        ...


class Transcoder:
    """A streamed answer from the provider's framing and schema into the client's."""

    __slots__ = ("_encode", "_events", "_parser")

    def __init__(self, upstream: Framing, translator: Translator, client: Framing) -> None:
        self._parser: EventParser = upstream.parser()
        self._events = translator.stream()
        self._encode = client.encode

    def feed(self, chunk: bytes, end_of_stream: bool) -> bytes:
        events = self._parser.feed(chunk)
        if end_of_stream:
            events += self._parser.close()
        out = [self._encode(e) for event in events for e in self._events.feed(event)]
        if end_of_stream:
            out += [self._encode(e) for e in self._events.close()]
        return b"".join(out)
