"""Tables and small conversions both translation directions share.

Stop reasons, usage counts and error envelopes are the three things every answer
carries; each has one function per direction here, so a JSON answer and a streamed
one can never disagree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from extproc.apis import anthropic, openai
from extproc.apis.usage import as_count

# OpenAI finish_reason -> Anthropic stop_reason (docs: platform.openai.com chat object,
# docs.anthropic.com "Handling stop reasons").
STOP_REASON: Final[Mapping[str, str]] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# Anthropic stop_reason -> OpenAI finish_reason; a pause or a stop sequence is a stop.
FINISH_REASON: Final[Mapping[str, str]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_DATA_URL: Final = re.compile(r"data:([\w.+/-]+);base64,", re.ASCII)


def stop_reason(finish_reason: object) -> str:
    """The Anthropic stop reason for an OpenAI finish reason (None/unknown: end_turn)."""
    return (
        STOP_REASON.get(finish_reason, "end_turn") if isinstance(finish_reason, str) else "end_turn"
    )


def finish_reason(stop: object) -> str:
    """The OpenAI finish reason for an Anthropic stop reason (None/unknown: stop)."""
    return FINISH_REASON.get(stop, "stop") if isinstance(stop, str) else "stop"


def anthropic_usage(usage: object) -> dict[str, int]:
    """OpenAI `usage` as Anthropic's: prompt tokens split into uncached, cache read and
    cache write (the extension some providers send as `prompt_tokens_details`)."""
    parsed = openai.usage_from_mapping(usage)
    return {
        "input_tokens": parsed.input_tokens,
        "output_tokens": parsed.output_tokens,
        "cache_creation_input_tokens": parsed.cache_creation_input_tokens,
        "cache_read_input_tokens": parsed.cache_read_input_tokens,
    }


def openai_usage(usage: object) -> dict[str, Any]:
    """Anthropic usage as OpenAI's: prompt tokens include cached ones; cache writes ride
    in `prompt_tokens_details.cache_write_tokens` so pricing survives the round trip."""
    if not isinstance(usage, Mapping):
        usage = {}
    read = as_count(usage.get("cache_read_input_tokens"))
    write = as_count(usage.get("cache_creation_input_tokens"))
    prompt = as_count(usage.get("input_tokens")) + read + write
    completion = as_count(usage.get("output_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
    }


def split_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a `data:<type>;base64,<data>` URL, else None."""
    match = _DATA_URL.match(url)
    if match is None:
        return None
    return match.group(1), url[match.end() :]


def _error_fields(body: object) -> tuple[str | None, str]:
    """(type, message) of either vendor's error envelope, tolerating junk."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, Mapping):
        kind, message = error.get("type"), error.get("message")
        return (kind if isinstance(kind, str) else None), str(message or "")
    if isinstance(error, str):
        return None, error
    return None, ""


def anthropic_error(status: int, body: object) -> bytes:
    """An OpenAI-compatible provider's error answer as an Anthropic error body; the
    type follows the status (as the Anthropic SDK dispatches on it), the message is kept."""
    _, message = _error_fields(body)
    return anthropic.error_body(status, message or f"the provider answered HTTP {status}")


def openai_error(status: int, body: object) -> bytes:
    """An Anthropic provider's error answer as an OpenAI error body (code: its type)."""
    kind, message = _error_fields(body)
    return openai.error_body(status, message or f"the provider answered HTTP {status}", code=kind)


def stream_error_type(error: object) -> str:
    """The Anthropic `error.type` for an error event met in an OpenAI stream."""
    text = ""
    if isinstance(error, Mapping):
        text = f"{error.get('type') or ''} {error.get('code') or ''}".lower()
    if "rate_limit" in text:
        return "rate_limit_error"
    if "overload" in text or "unavailable" in text:
        return "overloaded_error"
    if "invalid_request" in text:
        return "invalid_request_error"
    return "api_error"
