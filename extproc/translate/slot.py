"""The translators as the upstream adapter's translator slot sees them: SSE events in and
out, one object per request (it holds that request's `Notes` and options).

* `AnthropicClientOnOpenAI`: `/v1/messages` served by `/v1/chat/completions`;
* `OpenAIClientOnAnthropic`: `/v1/chat/completions` served by `/v1/messages`.

Each has `request(body, path)`, `answer(body, status)` (a JSON answer or an error body,
in the client's shape) and `stream()` (an `EventTranslator`: provider `SseEvent`s in,
client `SseEvent`s out, `close()` at the end of the stream). A provider event whose data
is not JSON is skipped and counted (`malformed_events`), as the accumulators do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from extproc.apis.sse import SseEvent
from extproc.translate import anthropic_on_openai as a2o
from extproc.translate import openai_on_anthropic as o2a
from extproc.translate.common import anthropic_error, openai_error
from extproc.translate.config import TranslationConfig
from extproc.translate.notes import Notes

__all__ = ["AnthropicClientOnOpenAI", "OpenAIClientOnAnthropic"]

_CHAT_PATH = "/v1/chat/completions"
_MESSAGES_PATH = "/v1/messages"


def _rebased(path: str, old: str, new: str) -> str:
    """`path` with its endpoint swapped; the query string is kept."""
    base, sep, query = path.partition("?")
    return new + sep + query if base.rstrip("/") == old else path


class AnthropicClientOnOpenAI:
    """An Anthropic Messages caller served by an OpenAI-compatible provider."""

    __slots__ = ("_model", "_names", "_settings", "notes")

    def __init__(self, settings: TranslationConfig, notes: Notes, model: str | None) -> None:
        self._settings = settings
        self.notes = notes
        self._model = model  # what the caller asked for: the name its answers carry
        self._names: dict[str, str] = {}  # tool names OpenAI would refuse -> the caller's

    def request(self, body: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
        self._names = a2o.restored_names(body)
        out = a2o.to_openai_request(body, self.notes, self._settings.max_tokens_field)
        return out, _rebased(path, _MESSAGES_PATH, _CHAT_PATH)

    def answer(self, body: Mapping[str, Any], status: int) -> dict[str, Any]:
        if status >= 400:
            error: dict[str, Any] = orjson.loads(anthropic_error(status, body))
            return error
        return a2o.to_anthropic_message(body, self.notes, self._model, self._names)

    def stream(self) -> _AnthropicEvents:
        return _AnthropicEvents(a2o.StreamTranslator(self.notes, self._model, self._names))


class _AnthropicEvents:
    __slots__ = ("_stream", "malformed_events")

    def __init__(self, stream: a2o.StreamTranslator) -> None:
        self._stream = stream
        self.malformed_events = 0

    def feed(self, event: SseEvent) -> list[SseEvent]:
        if event.data.startswith("[DONE]"):
            return _anthropic_sse(self._stream.finish())
        try:
            chunk = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            self.malformed_events += 1
            return []
        if not isinstance(chunk, dict):
            self.malformed_events += 1
            return []
        return _anthropic_sse(self._stream.feed(chunk))

    def close(self) -> list[SseEvent]:
        """The end of the provider's stream: a finished message is closed; one cut before
        its finish reason stays cut (no invented message_stop), as a native stream would."""
        if not self._stream.finish_seen:
            return []
        return _anthropic_sse(self._stream.finish())


def _anthropic_sse(events: list[dict[str, Any]]) -> list[SseEvent]:
    return [SseEvent(e["type"], orjson.dumps(e).decode()) for e in events]


class OpenAIClientOnAnthropic:
    """An OpenAI Chat Completions caller served by an Anthropic provider."""

    __slots__ = ("_caller_limit", "_created", "_include_usage", "_model", "_options", "notes")

    def __init__(
        self,
        settings: TranslationConfig,
        notes: Notes,
        model: str | None,
        *,
        include_usage: bool,
        created: int,
        caller_limit: bool = True,
    ) -> None:
        self._options = o2a.RequestOptions(settings.default_max_tokens, settings.cache_prefix)
        self.notes = notes
        self._model = model
        self._include_usage = include_usage  # whether the caller asked for the usage chunk
        self._created = created
        # Whether the caller set an output limit itself. The gateway writes its own bound
        # (limits.max_output_tokens) into a request without one; toward Anthropic, which
        # requires a limit, such a request gets the route's default_max_tokens instead
        # (never above the bound, so the budget reservation still covers it).
        self._caller_limit = caller_limit

    def request(self, body: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
        out = o2a.to_anthropic_request(body, self.notes, self._options)
        if not self._caller_limit:
            out["max_tokens"] = min(out["max_tokens"], self._options.default_max_tokens)
        return out, _rebased(path, _CHAT_PATH, _MESSAGES_PATH)

    def answer(self, body: Mapping[str, Any], status: int) -> dict[str, Any]:
        if status >= 400:
            error: dict[str, Any] = orjson.loads(openai_error(status, body))
            return error
        return o2a.to_openai_completion(body, self.notes, self._model, self._created)

    def stream(self) -> _OpenAIEvents:
        translator = o2a.StreamTranslator(
            self.notes, self._include_usage, self._model, self._created
        )
        return _OpenAIEvents(translator)


class _OpenAIEvents:
    __slots__ = ("_stream", "malformed_events")

    def __init__(self, stream: o2a.StreamTranslator) -> None:
        self._stream = stream
        self.malformed_events = 0

    def feed(self, event: SseEvent) -> list[SseEvent]:
        try:
            payload = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            self.malformed_events += 1
            return []
        if not isinstance(payload, dict):
            self.malformed_events += 1
            return []
        return _openai_sse(self._stream.feed(payload))

    def close(self) -> list[SseEvent]:
        """A stream that ended without message_stop was cut: it stays cut (no `[DONE]`)."""
        return []


def _openai_sse(chunks: list[o2a.Chunk]) -> list[SseEvent]:
    return [SseEvent(None, c if isinstance(c, str) else orjson.dumps(c).decode()) for c in chunks]
