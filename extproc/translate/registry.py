"""The Anthropic ⇄ OpenAI pairs for the upstream adapter's translator slot.

`PAIRS` is what `extproc.upstream.translate` registers: (client, provider) -> a
`Pair`. A `Pair` satisfies the slot's `Translator` protocol on its own (default
settings, a throwaway `Notes`), but a request binds its own instance with `bind`:
that instance holds the route's `TranslationConfig`, the request's `Notes` (for the
audit record) and per-request state (tool-name stand-ins), and knows the endpoint, so a
`/v1/models` list is translated as a list, not as a completion.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal, Protocol

import orjson

from extproc.apis.sse import SseEvent
from extproc.translate.common import anthropic_error, openai_error
from extproc.translate.config import TranslationConfig
from extproc.translate.models import (
    anthropic_model,
    openai_model,
    to_anthropic_list,
    to_openai_list,
)
from extproc.translate.notes import Notes
from extproc.translate.slot import AnthropicClientOnOpenAI, OpenAIClientOnAnthropic

__all__ = [
    "PAIRS",
    "BoundTranslator",
    "Pair",
    "bind",
    "note_beta_headers",
    "upstream_header_changes",
]

Kind = Literal["anthropic", "openai"]
_DEFAULT: Final = TranslationConfig()
_OPENAI_LIMITS: Final = ("max_completion_tokens", "max_tokens")
# The API version the Messages translation is written for; Anthropic requires the header.
ANTHROPIC_VERSION: Final = "2023-06-01"
# Headers of one vendor's API that mean nothing to (or mislead) the other's servers.
_VENDOR_HEADERS: Final[Mapping[str, tuple[str, ...]]] = {
    "anthropic": (
        "anthropic-version",
        "anthropic-beta",
        "anthropic-dangerous-direct-browser-access",
    ),
    "openai": ("openai-organization", "openai-project", "openai-beta"),
}


def upstream_header_changes(
    client: str, upstream: str
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """(headers to set, headers to remove) on a request translated from `client`'s shape
    to `upstream`'s: the caller's vendor headers go, the provider's required ones come."""
    if client == upstream:
        return (), ()
    required = (("anthropic-version", ANTHROPIC_VERSION),) if upstream == "anthropic" else ()
    return required, _VENDOR_HEADERS.get(client, ())


class EventTranslator(Protocol):
    def feed(self, event: SseEvent) -> list[SseEvent]: ...

    def close(self) -> list[SseEvent]: ...


class BoundTranslator(Protocol):
    notes: Notes

    def request(self, body: dict[str, Any], path: str) -> tuple[dict[str, Any], str]: ...

    def answer(self, body: Mapping[str, Any], status: int) -> dict[str, Any]: ...

    def stream(self) -> EventTranslator: ...


class _ModelList:
    """`GET /v1/models`: the provider's list in the caller's shape."""

    def __init__(self, client: Kind, notes: Notes) -> None:
        self._client = client
        self.notes = notes

    def request(self, body: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
        return body, path

    def answer(self, body: Mapping[str, Any], status: int) -> dict[str, Any]:
        if status >= 400:
            return _error(self._client, body, status)
        if "data" not in body and isinstance(body.get("id"), str):  # GET /v1/models/{id}
            return anthropic_model(body) if self._client == "anthropic" else openai_model(body)
        return to_anthropic_list(body) if self._client == "anthropic" else to_openai_list(body)

    def stream(self) -> EventTranslator:
        raise NotImplementedError("a model list is never streamed")


def _error(client: Kind, body: Mapping[str, Any], status: int) -> dict[str, Any]:
    raw = anthropic_error(status, body) if client == "anthropic" else openai_error(status, body)
    error: dict[str, Any] = orjson.loads(raw)
    return error


class Pair:
    """One (client, provider) pair; `bind` makes the per-request translator."""

    __slots__ = ("client", "upstream")

    def __init__(self, client: Kind, upstream: Kind) -> None:
        self.client = client
        self.upstream = upstream

    def bind(
        self,
        settings: TranslationConfig,
        notes: Notes,
        *,
        models: bool,
        created: int,
        caller_body: Mapping[str, Any] | None = None,
    ) -> BoundTranslator:
        """`caller_body`: the request as the caller sent it (before the gateway's bounds)."""
        if models:
            return _ModelList(self.client, notes)
        if self.client == "anthropic":
            return AnthropicClientOnOpenAI(settings, notes, None)
        limit = caller_body is None or any(k in caller_body for k in _OPENAI_LIMITS)
        return OpenAIClientOnAnthropic(
            settings, notes, None, include_usage=True, created=created, caller_limit=limit
        )

    # The unbound protocol: what a caller that never binds (a unit test) gets.
    def request(self, body: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
        return self._default().request(body, path)

    def answer(self, body: Mapping[str, Any], status: int) -> dict[str, Any]:
        return self._default().answer(body, status)

    def stream(self) -> EventTranslator:
        return self._default().stream()

    def _default(self) -> BoundTranslator:
        return self.bind(_DEFAULT, Notes(), models=False, created=0)


PAIRS: Final[Mapping[tuple[str, str], Pair]] = {
    ("anthropic", "openai"): Pair("anthropic", "openai"),
    ("openai", "anthropic"): Pair("openai", "anthropic"),
}


def bind(
    translator: object,
    settings: TranslationConfig,
    notes: Notes,
    *,
    models: bool,
    created: int,
    caller_body: Mapping[str, Any] | None = None,
) -> BoundTranslator | None:
    """The per-request translator of a registered `Pair`; None for any other translator
    (which is then used as it is)."""
    if isinstance(translator, Pair):
        return translator.bind(
            settings, notes, models=models, created=created, caller_body=caller_body
        )
    return None


def note_beta_headers(client: str, headers: Mapping[str, str], notes: Notes) -> None:
    """A caller's beta features (`anthropic-beta`, `openai-beta`) have no meaning at the
    other vendor: noted as `beta` (or refused, if the route refuses `beta`)."""
    name = f"{client}-beta"
    value = headers.get(name)
    if value:
        notes.drop("beta", f"the {name} header ({value[:120]})")
