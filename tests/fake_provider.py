"""A fake model provider speaking the Anthropic and OpenAI HTTP APIs, for tests and demos.

End-to-end tests, benchmarks and the docker-compose demo put this server behind a real
Envoy in place of api.anthropic.com / api.openai.com. It answers like the real services,
closely enough that the official ``anthropic`` and ``openai`` SDKs accept every reply:

``POST /v1/messages``
    Anthropic Messages: a JSON ``message`` or, with ``"stream": true``, the SSE sequence
    ``message_start``, ``content_block_start``, ``ping``, one ``content_block_delta`` per
    word, ``content_block_stop``, ``message_delta``, ``message_stop``.
``POST /v1/messages/count_tokens``
    ``{"input_tokens": N}``.
``GET /v1/models`` and ``GET /v1/models/{id}``
    Anthropic's paginated list shape when the request carries ``anthropic-version``,
    otherwise OpenAI's ``{"object": "list", ...}``.
``POST /v1/chat/completions``
    OpenAI chat completions: JSON, or ``chat.completion.chunk`` SSE events ending in
    ``data: [DONE]``, with a final usage chunk when ``stream_options.include_usage``.
Anything else
    404, in Anthropic's error shape if the path is ``/v1/messages...`` or the request
    carries ``anthropic-version``, else in OpenAI's.

Requests are validated like the real APIs enough to produce their error bodies: a missing
``model`` / ``messages`` / ``max_tokens`` gives 400, missing credentials give 401
(Anthropic accepts ``x-api-key`` or ``Authorization``; OpenAI needs ``Authorization``).

Token counts are deterministic so tests can predict them: input tokens are
``max(1, len(body) // 4)`` of the raw request body; output tokens are the number of
words in the reply. When any block carries ``cache_control``, Anthropic usage also
reports ``cache_creation_input_tokens`` = ``max(1, offset // 4)`` where ``offset`` is
where the last ``"cache_control"`` key starts in the body (the cached prefix). Unlike the
real API, ``input_tokens`` is not reduced by the cached part. ``cache_read_input_tokens``
is always 0.

Test controls, read from request headers so tests can drive the fake *through* a gateway
that forwards headers:

``x-fake-status: N``
    Reply with an error of HTTP status N (400-599) in the endpoint's shape, e.g. 429
    ``rate_limit_error`` with ``retry-after``, 500 ``api_error``, 529 ``overloaded_error``.
``x-fake-delay-ms: N``
    SSE: the first event is flushed at once, then N ms pass before each further event
    (with split chunking an event's last bytes wait for the next write, by design).
    JSON and errors: N ms pass before the reply.
``x-fake-text: ...``
    The reply text (default ``"Hello from the fake provider."``).
``x-fake-piece-chars: N``
    SSE: stream the text in pieces of N characters instead of one per word.
``x-fake-echo: 1``
    The reply text is the last user message's text (to see what the provider received).
``x-fake-tool-input: {JSON object}``
    The answer is one call of a tool named ``Bash`` with this input instead of text
    (Anthropic ``tool_use``, streamed as ``input_json_delta``; OpenAI ``tool_calls``,
    streamed as argument pieces), cut like the text by ``x-fake-piece-chars``.
``x-fake-tool-name: NAME``
    The name of the tool ``x-fake-tool-input`` calls (default ``Bash``).
``x-fake-tool-once: 1``
    With ``x-fake-tool-input``: call the tool only when the conversation does not end in
    a tool result; once it does (Anthropic ``tool_result`` block, OpenAI ``tool``
    message), answer with text instead (one tool-using turn of an agent): the usual
    reply text, or with ``x-fake-echo: 1`` ``tool said: <the result's text>``.
``x-fake-tool-calls: N``
    OpenAI only: N parallel calls (indices 0..N-1, each its own id) of the tool, streamed
    one after the other.
``x-fake-chunking: split``
    Write SSE in awkward pieces: events cut mid-line and straddling writes, and every
    other event written as ``event:x`` / ``data:{...}`` without the space after the colon.
``x-fake-stall-ms: N``
    Send nothing at all (not even response headers) for N ms first: a provider that
    hangs before its first byte.
``x-fake-abort-after: N``
    SSE only: write N complete events, then close the connection without ending the
    chunked body, as an upstream reset would.
``x-fake-usage: {JSON object}``
    Merged over the final usage block (JSON answers, Anthropic's ``message_delta``,
    OpenAI's usage chunk), e.g. to report 1-hour cache writes, web searches or reasoning
    tokens the way the real APIs do.
``x-fake-compress: allowed | gzip | deflate | br | zstd | mislabelled``
    Compress the reply body (JSON and SSE, flushed per event): ``allowed`` picks the
    first coding the request's ``Accept-Encoding`` allows (none with ``identity``), as
    OpenAI and many proxies do; a coding name compresses with it whatever the request
    accepts (a misbehaving proxy). ``FakeProvider(compress=True)`` makes ``allowed`` the
    default for every request. br and zstd need the ``brotli`` / ``zstandard`` modules.
    ``mislabelled`` labels the plain body ``gzip`` (a broken proxy).

Checks run in the real APIs' order after the fake's own: unknown path (404), then
``x-fake-status``, then credentials (401), then the JSON body (400).

Every request is recorded in ``FakeProvider.received`` (a list of `ReceivedRequest`);
``clear()`` empties it. Use it in-process (``await FakeProvider().start()``), from sync
code (``with run_in_thread() as fake:``) or as a process::

    python tests/fake_provider.py --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import itertools
import random
import re
import signal
import string
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

DEFAULT_TEXT = "Hello from the fake provider."
DEFAULT_MODELS: tuple[str, ...] = (
    "claude-opus-4-8",
    "claude-sonnet-4-6",
    "claude-haiku-4-5",
    "gpt-5",
    "gpt-5-mini",
)
# Real Claude Code contexts with images pass aiohttp's 1 MB default; the real API takes 32 MB.
MAX_BODY_BYTES = 32 * 1024 * 1024
# A short pause between the pieces of a split event so they travel as separate TCP segments.
SPLIT_PAUSE_S = 0.001
MODEL_CREATED_AT = "2025-01-01T00:00:00Z"
MODEL_CREATED_UNIX = 1735689600
SYSTEM_FINGERPRINT = "fp_fake0001"

Shape = Literal["anthropic", "openai"]
Json = dict[str, Any]

_ID_ALPHABET = string.ascii_letters + string.digits
_WORD_RE = re.compile(r"\S+\s*")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the fake saw it; header names are lower-cased, repeats joined by ','."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


def _record_of(request: web.Request, body: bytes) -> ReceivedRequest:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    return ReceivedRequest(request.method, request.path, request.query_string, headers, body)


# --------------------------------------------------------------------------- controls


class ApiError(Exception):
    """An error reply; rendered in the shape of the endpoint that raised it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Controls:
    """The x-fake-* request headers, parsed."""

    status: int | None = None
    delay_s: float = 0.0
    text: str = DEFAULT_TEXT
    split: bool = False
    abort_after: int | None = None
    stall_s: float = 0.0


def _int_header(headers: Mapping[str, str], name: str, low: int, high: int) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer in [{low}, {high}], got {raw!r}")
    return value


def _chunking(headers: Mapping[str, str]) -> bool:
    mode = headers.get("x-fake-chunking", "").strip().lower()
    if mode not in ("", "none", "split"):
        raise ApiError(400, f"x-fake-chunking must be 'split' or 'none', got {mode!r}")
    return mode == "split"


def parse_controls(headers: Mapping[str, str], default_text: str = DEFAULT_TEXT) -> Controls:
    """Read the x-fake-* headers; a malformed value raises a 400 `ApiError`."""
    delay_ms = _int_header(headers, "x-fake-delay-ms", 0, 600_000) or 0
    return Controls(
        status=_int_header(headers, "x-fake-status", 400, 599),
        delay_s=delay_ms / 1000,
        text=headers.get("x-fake-text", default_text),
        split=_chunking(headers),
        abort_after=_int_header(headers, "x-fake-abort-after", 0, 1_000_000),
        stall_s=(_int_header(headers, "x-fake-stall-ms", 0, 600_000) or 0) / 1000,
    )


# --------------------------------------------------------------------------- tokens and ids


def input_tokens(body: bytes) -> int:
    """Deterministic input-token count of a raw request body."""
    return max(1, len(body) // 4)


def output_tokens(text: str) -> int:
    """Deterministic output-token count of a reply text: its words, at least 1."""
    return max(1, len(text.split()))


def cache_creation_tokens(body: bytes) -> int:
    """Tokens of the prefix up to the last ``cache_control`` key, 0 when there is none."""
    offset = body.rfind(b'"cache_control"')
    return max(1, offset // 4) if offset >= 0 else 0


def text_pieces(text: str) -> list[str]:
    """The reply text as streamed: one piece per word, trailing spaces kept, so they join back."""
    pieces: list[str] = _WORD_RE.findall(text)
    lead = text[: len(text) - len(text.lstrip())]
    if not pieces:
        return [lead] if lead else []
    pieces[0] = lead + pieces[0]
    return pieces


def _pieces(call: Call, text: str) -> list[str]:
    """Stream pieces: words, or fixed-size pieces with `x-fake-piece-chars: N` (so a
    word, e.g. a secret, is split across deltas)."""
    size = _int_header(call.headers, "x-fake-piece-chars", 1, 10_000)
    if size is None:
        return text_pieces(text)
    return [text[i : i + size] for i in range(0, len(text), size)]


def _new_id(prefix: str, length: int) -> str:
    return prefix + "".join(random.choices(_ID_ALPHABET, k=length))


# --------------------------------------------------------------------------- SSE framing


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event; ``data`` is already serialized."""

    data: str
    event: str | None = None


def encode_event(event: SseEvent, *, compact: bool = False) -> bytes:
    """Serialize one event; ``compact`` drops the optional space after each field colon."""
    sep = ":" if compact else ": "
    head = f"event{sep}{event.event}\n" if event.event is not None else ""
    return f"{head}data{sep}{event.data}\n\n".encode()


def _sse(event: str | None, payload: Json | str) -> SseEvent:
    data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
    return SseEvent(data, event)


class ByteSink(Protocol):
    """Where an `SseWriter` writes; `aiohttp.web.StreamResponse` is one."""

    async def write(self, data: bytes) -> None: ...


class SseWriter:
    """Writes events to a response, optionally in deliberately awkward pieces.

    In split mode each event is cut inside its first field name and again mid-way, and its
    last three bytes are held back and sent at the head of the next write, so no write ends
    on an event boundary.
    """

    def __init__(self, response: ByteSink, *, split: bool) -> None:
        self._response = response
        self._split = split
        self._carry = b""
        self._count = 0

    async def send(self, event: SseEvent) -> None:
        frame = encode_event(event, compact=self._split and self._count % 2 == 1)
        self._count += 1
        if not self._split:
            await self._response.write(frame)
            return
        for piece in self._pieces(frame):
            await self._response.write(piece)
            await asyncio.sleep(SPLIT_PAUSE_S)

    def _pieces(self, frame: bytes) -> list[bytes]:
        data = self._carry + frame
        start = len(self._carry)
        hold = len(data) - 3
        cuts = [0, start + 4, start + len(frame) // 2, hold]
        self._carry = data[hold:]
        return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]

    async def flush(self) -> None:
        """Send any held-back bytes so every event sent so far is complete."""
        if self._carry:
            await self._response.write(self._carry)
            self._carry = b""


# --------------------------------------------------------------------------- error bodies

_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use this resource."),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out."),
    529: ("overloaded_error", "Overloaded"),
}

_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", None, "Not found."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


def _anthropic_error_type(status: int) -> tuple[str, str]:
    default = ("api_error", "Internal server error") if status >= 500 else _ANTHROPIC_ERRORS[400]
    return _ANTHROPIC_ERRORS.get(status, default)


def _openai_error_type(status: int) -> tuple[str, str | None, str]:
    default = _OPENAI_ERRORS[500] if status >= 500 else _OPENAI_ERRORS[400]
    return _OPENAI_ERRORS.get(status, default)


def fake_status_error(status: int) -> ApiError:
    """The error an x-fake-status header asks for, with the canonical message for its shape."""
    return ApiError(status, "", code=_openai_error_type(status)[1])


def error_body(shape: Shape, error: ApiError, request_id: str) -> Json:
    """The JSON error body the real API of ``shape`` would send."""
    if shape == "anthropic":
        kind, default = _anthropic_error_type(error.status)
        detail = {"type": kind, "message": error.message or default}
        return {"type": "error", "error": detail, "request_id": request_id}
    kind, _, default = _openai_error_type(error.status)
    message = error.message or default
    return {"error": {"message": message, "type": kind, "param": error.param, "code": error.code}}


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Call:
    """Everything a handler needs about one request."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes
    controls: Controls
    shape: Shape
    models: Sequence[str]
    payload: Json = field(default_factory=dict)

    def with_payload(self) -> Call:
        """This call with its body parsed as a JSON object, or a 400 `ApiError`."""
        try:
            payload = orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"Request body is not valid JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise ApiError(400, "Request body must be a JSON object.")
        return dataclasses.replace(self, payload=payload)


Reply = Json | list[SseEvent]
Handler = Callable[[Call], Reply]


def shape_of(path: str, headers: Mapping[str, str]) -> Shape:
    """Which provider's shapes a request gets, for errors and for /v1/models."""
    if path.startswith("/v1/messages") or "anthropic-version" in headers:
        return "anthropic"
    return "openai"


def check_auth(shape: Shape, headers: Mapping[str, str]) -> None:
    """Raise 401 when the request carries no credential the real API would look at."""
    bearer = headers.get("authorization", "").strip()
    if shape == "anthropic" and not (headers.get("x-api-key", "").strip() or bearer):
        raise ApiError(401, "x-api-key header is required")
    if shape == "openai" and bearer.lower() in ("", "bearer"):
        raise ApiError(
            401,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )


# --------------------------------------------------------------------------- Anthropic


def _require_anthropic(payload: Json, *, max_tokens: bool) -> None:
    if not isinstance(payload.get("model"), str):
        raise ApiError(400, "model: Field required")
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise ApiError(400, "messages: Field required")
    if not messages:
        raise ApiError(400, "messages: at least one message is required")
    if not max_tokens:
        return
    limit = payload.get("max_tokens")
    if limit is None:
        raise ApiError(400, "max_tokens: Field required")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ApiError(400, "max_tokens: Input should be a valid integer greater than 0")


def anthropic_usage(body: bytes, text: str | None) -> Json:
    """Usage block; ``text=None`` gives the message_start form (output_tokens 1)."""
    created = cache_creation_tokens(body)
    return {
        "input_tokens": input_tokens(body),
        "cache_creation_input_tokens": created,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": created, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 1 if text is None else output_tokens(text),
        "service_tier": "standard",
    }


def usage_override(call: Call) -> Json:
    """The ``x-fake-usage`` object to merge over the final usage block."""
    raw = call.headers.get("x-fake-usage")
    if raw is None:
        return {}
    try:
        extra = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"x-fake-usage is not JSON: {exc}") from exc
    if not isinstance(extra, dict):
        raise ApiError(400, "x-fake-usage must be a JSON object")
    return extra


def _anthropic_message(call: Call, content: list[Json], usage: Json, done: bool) -> Json:
    return {
        "id": _new_id("msg_01", 22),
        "type": "message",
        "role": "assistant",
        "model": call.payload["model"],
        "content": content,
        "stop_reason": "end_turn" if done else None,
        "stop_sequence": None,
        "usage": usage,
    }


def reply_text(call: Call) -> str:
    """The reply: `x-fake-echo: 1` repeats the last user message's text, else x-fake-text."""
    if call.headers.get("x-fake-echo") != "1":
        return call.controls.text
    messages = [m for m in call.payload.get("messages", []) if m.get("role") == "user"]
    content = messages[-1].get("content", "") if messages else ""
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content) or call.controls.text


def tool_input(call: Call) -> str | None:
    """The `x-fake-tool-input` JSON object, compact; None without the header."""
    raw = call.headers.get("x-fake-tool-input")
    if raw is None:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ApiError(400, "x-fake-tool-input must be a JSON object")
    return orjson.dumps(value).decode()


def tool_name(call: Call) -> str:
    return call.headers.get("x-fake-tool-name", "Bash")


def tool_result_text(call: Call) -> str | None:
    """The text of the tool result the conversation ends with (either shape), else None."""
    messages = call.payload.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if last.get("role") == "tool":
        return _text_of(last.get("content"))
    content = last.get("content")
    results = [b for b in content or () if isinstance(b, dict) and b.get("type") == "tool_result"]
    if last.get("role") != "user" or not isinstance(content, list) or not results:
        return None
    return "\n".join(_text_of(b.get("content")) for b in results)


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content or "")


def tool_turn(call: Call) -> tuple[str | None, Call]:
    """(tool arguments, call) for a tool-call answer; (None, call with the reply text)
    for a text answer, which `x-fake-tool-once` gives once the tool has answered."""
    arguments = tool_input(call)
    if arguments is None or call.headers.get("x-fake-tool-once") != "1":
        return arguments, call
    result = tool_result_text(call)
    if result is None:
        return arguments, call
    if call.headers.get("x-fake-echo") != "1":
        return None, call
    controls = dataclasses.replace(call.controls, text=f"tool said: {result}")
    plain = {k: v for k, v in call.headers.items() if k != "x-fake-echo"}
    return None, dataclasses.replace(call, controls=controls, headers=plain)


def _anthropic_tool_call(call: Call, arguments: str) -> Reply:
    block = {
        "type": "tool_use",
        "id": _new_id("toolu_01", 22),
        "name": tool_name(call),
        "input": {},
    }
    if call.payload.get("stream") is not True:
        usage = anthropic_usage(call.body, arguments)
        message = _anthropic_message(
            call, [{**block, "input": orjson.loads(arguments)}], usage, True
        )
        return {**message, "stop_reason": "tool_use"}
    start = _anthropic_message(call, [], anthropic_usage(call.body, None), done=False)
    deltas = [
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": piece},
        }
        for piece in _pieces(call, arguments)
    ]
    delta = {"stop_reason": "tool_use", "stop_sequence": None}
    return [
        _sse("message_start", {"type": "message_start", "message": start}),
        _sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        ),
        *(_sse("content_block_delta", d) for d in deltas),
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": delta,
                "usage": {"output_tokens": output_tokens(arguments)},
            },
        ),
        _sse("message_stop", {"type": "message_stop"}),
    ]


def anthropic_messages(call: Call) -> Reply:
    """POST /v1/messages."""
    _require_anthropic(call.payload, max_tokens=True)
    arguments, call = tool_turn(call)
    if arguments is not None:
        return _anthropic_tool_call(call, arguments)
    text = reply_text(call)
    if call.payload.get("stream") is True:
        return _anthropic_stream(call, text)
    content = [{"type": "text", "text": text}]
    usage = anthropic_usage(call.body, text) | usage_override(call)
    return _anthropic_message(call, content, usage, done=True)


def _anthropic_stream(call: Call, text: str) -> list[SseEvent]:
    start = _anthropic_message(call, [], anthropic_usage(call.body, None), done=False)
    events = [
        _sse("message_start", {"type": "message_start", "message": start}),
        _sse("content_block_start", _block_start()),
        _sse("ping", {"type": "ping"}),
    ]
    pieces = _pieces(call, text)
    events += [_sse("content_block_delta", _text_delta(piece)) for piece in pieces]
    delta = {"stop_reason": "end_turn", "stop_sequence": None}
    usage = {"output_tokens": output_tokens(text)} | usage_override(call)
    return [
        *events,
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}),
        _sse("message_stop", {"type": "message_stop"}),
    ]


def _block_start() -> Json:
    block = {"type": "text", "text": ""}
    return {"type": "content_block_start", "index": 0, "content_block": block}


def _text_delta(piece: str) -> Json:
    delta = {"type": "text_delta", "text": piece}
    return {"type": "content_block_delta", "index": 0, "delta": delta}


def anthropic_count_tokens(call: Call) -> Reply:
    """POST /v1/messages/count_tokens."""
    _require_anthropic(call.payload, max_tokens=False)
    return {"input_tokens": input_tokens(call.body)}


# --------------------------------------------------------------------------- models


def display_name(model_id: str) -> str:
    """'claude-opus-4-8' -> 'Claude Opus 4.8'; 'gpt-5-mini' -> 'GPT 5 Mini'."""
    words: list[str] = []
    for part in model_id.split("-"):
        if part.isdigit() and words and words[-1][-1].isdigit():
            words[-1] += f".{part}"
        else:
            words.append(part.upper() if part in ("gpt", "o") else part.capitalize())
    return " ".join(words)


def _anthropic_model(model_id: str) -> Json:
    return {
        "type": "model",
        "id": model_id,
        "display_name": display_name(model_id),
        "created_at": MODEL_CREATED_AT,
        "lifecycle": "active",
        "max_input_tokens": 200_000,
        "max_tokens": 64_000,
    }


def _openai_model(model_id: str) -> Json:
    owner = "anthropic" if model_id.startswith("claude") else "openai"
    return {"id": model_id, "object": "model", "created": MODEL_CREATED_UNIX, "owned_by": owner}


def _anthropic_page(models: Sequence[str], query: Mapping[str, str]) -> tuple[list[str], bool]:
    limit = _int_header(query, "limit", 1, 1000) or 20
    ids = list(models)
    if (before := query.get("before_id")) in ids:
        ids = ids[: ids.index(before)]
        return ids[-limit:], len(ids) > limit
    if (after := query.get("after_id")) in ids:
        ids = ids[ids.index(after) + 1 :]
    return ids[:limit], len(ids) > limit


def list_models(call: Call) -> Reply:
    """GET /v1/models, in the shape the request asks for."""
    if call.shape == "openai":
        return {"object": "list", "data": [_openai_model(m) for m in call.models]}
    page, has_more = _anthropic_page(call.models, call.query)
    return {
        "data": [_anthropic_model(m) for m in page],
        "has_more": has_more,
        "first_id": page[0] if page else None,
        "last_id": page[-1] if page else None,
    }


def get_model(call: Call) -> Reply:
    """GET /v1/models/{id}."""
    model_id = call.path.removeprefix("/v1/models/")
    if model_id not in call.models:
        message = f"The model '{model_id}' does not exist"
        raise ApiError(404, message, param="model", code="model_not_found")
    return _anthropic_model(model_id) if call.shape == "anthropic" else _openai_model(model_id)


# --------------------------------------------------------------------------- OpenAI


def _require_openai(payload: Json) -> None:
    if not isinstance(payload.get("model"), str):
        raise ApiError(400, "you must provide a model parameter")
    messages = payload.get("messages")
    if not isinstance(messages, list):
        message = "Missing required parameter: 'messages'."
        raise ApiError(400, message, param="messages", code="missing_required_parameter")
    if not messages:
        message = "Invalid 'messages': empty array. Expected an array with minimum length 1."
        raise ApiError(400, message, param="messages", code="empty_array")
    if payload.get("stream_options") is not None and payload.get("stream") is not True:
        message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        raise ApiError(400, message, param="stream_options")


def openai_usage(body: bytes, text: str) -> Json:
    """Chat-completions usage block."""
    prompt, completion = input_tokens(body), output_tokens(text)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _completion_base(call: Call, completion_id: str, obj: str) -> Json:
    return {
        "id": completion_id,
        "object": obj,
        "created": int(time.time()),
        "model": call.payload["model"],
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def _openai_tool_call(call: Call, completion_id: str, arguments: str) -> Reply:
    count = _int_header(call.headers, "x-fake-tool-calls", 1, 16) or 1
    function = {"name": tool_name(call), "arguments": arguments}
    calls = [
        {"id": _new_id("call_", 24), "type": "function", "function": function} for _ in range(count)
    ]
    usage = openai_usage(call.body, arguments * count) | usage_override(call)
    if call.payload.get("stream") is not True:
        message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
        base = _completion_base(call, completion_id, "chat.completion")
        return {**base, "choices": [choice], "usage": usage}
    base = _completion_base(call, completion_id, "chat.completion.chunk")
    options = call.payload.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True

    def chunk(delta: Json, finish: str | None = None) -> SseEvent:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse(None, {**base, "choices": [choice]})

    events = [chunk({"role": "assistant", "content": None})]
    for index, tool_call in enumerate(calls):
        opening = {**tool_call, "index": index, "function": {**function, "arguments": ""}}
        events.append(chunk({"tool_calls": [opening]}))
        for piece in _pieces(call, arguments):
            piece_call = {"index": index, "function": {"arguments": piece}}
            events.append(chunk({"tool_calls": [piece_call]}))
    events.append(chunk({}, "tool_calls"))
    if include_usage:
        events.append(_sse(None, {**base, "choices": [], "usage": usage}))
    return [*events, _sse(None, "[DONE]")]


def openai_chat(call: Call) -> Reply:
    """POST /v1/chat/completions."""
    _require_openai(call.payload)
    completion_id = _new_id("chatcmpl-", 29)
    arguments, call = tool_turn(call)
    if arguments is not None:
        return _openai_tool_call(call, completion_id, arguments)
    text = reply_text(call)
    if call.payload.get("stream") is True:
        return _openai_stream(call, completion_id, text)
    message: Json = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    base = _completion_base(call, completion_id, "chat.completion")
    usage = openai_usage(call.body, text) | usage_override(call)
    return {**base, "choices": [choice], "usage": usage}


def _openai_stream(call: Call, completion_id: str, text: str) -> list[SseEvent]:
    options = call.payload.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    base = _completion_base(call, completion_id, "chat.completion.chunk")
    if include_usage:
        base["usage"] = None  # the real API marks every non-final chunk this way

    def chunk(delta: Json, finish: str | None = None) -> SseEvent:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse(None, {**base, "choices": [choice]})

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": piece}) for piece in _pieces(call, text)]
    events.append(chunk({}, "stop"))
    if include_usage:
        usage = openai_usage(call.body, text) | usage_override(call)
        events.append(_sse(None, {**base, "choices": [], "usage": usage}))
    return [*events, _sse(None, "[DONE]")]


# --------------------------------------------------------------------------- routing

ROUTES: dict[tuple[str, str], Handler] = {
    ("POST", "/v1/messages"): anthropic_messages,
    ("POST", "/v1/messages/count_tokens"): anthropic_count_tokens,
    ("GET", "/v1/models"): list_models,
    ("POST", "/v1/chat/completions"): openai_chat,
}


def find_handler(method: str, path: str) -> Handler:
    """The handler for a request, or a 404 `ApiError`."""
    handler = ROUTES.get((method, path.rstrip("/") or "/"))
    if handler is not None:
        return handler
    if method == "GET" and path.startswith("/v1/models/"):
        return get_model
    raise ApiError(404, f"Invalid URL ({method} {path})" if path else "Not found.")


def handle(call: Call) -> Reply:
    """Apply the controls, authentication and routing for one request; pure, no I/O."""
    handler = find_handler(call.method, call.path)
    if call.controls.status is not None:
        raise fake_status_error(call.controls.status)
    check_auth(call.shape, call.headers)
    if call.method == "POST":  # every POST endpoint takes a JSON object
        call = call.with_payload()
    return handler(call)


# --------------------------------------------------------------------------- server


def _lower_headers(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _id_headers(shape: Shape) -> dict[str, str]:
    if shape == "anthropic":
        return {"request-id": _new_id("req_01", 22)}
    return {"x-request-id": _new_id("req_", 32)}


# --------------------------------------------------------------------------- compression

CODINGS: tuple[str, ...] = ("gzip", "br", "zstd", "deflate")
_FORCED = (*CODINGS, "mislabelled")


class Compressor:
    """Compresses a body written in pieces; each piece is flushed so a reader can decode
    every SSE event as it arrives."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._impl: Any = None
        if coding == "mislabelled":
            return
        if coding in ("gzip", "deflate"):
            self._impl = zlib.compressobj(wbits=31 if coding == "gzip" else 15)
        elif coding == "br":
            self._impl = importlib.import_module("brotli").Compressor()
        else:
            self._impl = importlib.import_module("zstandard").ZstdCompressor().compressobj()

    def piece(self, data: bytes) -> bytes:
        if self._impl is None:
            return data
        if self.coding in ("gzip", "deflate"):
            out: bytes = self._impl.compress(data) + self._impl.flush(zlib.Z_SYNC_FLUSH)
        elif self.coding == "br":
            out = self._impl.process(data) + self._impl.flush()
        else:
            out = self._impl.compress(data) + self._impl.flush(1)  # COMPRESSOBJ_FLUSH_BLOCK
        return out

    def finish(self) -> bytes:
        if self._impl is None:
            return b""
        if self.coding == "br":
            tail: bytes = self._impl.finish()
        else:
            tail = self._impl.flush()
        return tail


def choose_coding(headers: Mapping[str, str], default: str) -> str | None:
    """The coding to compress a reply with (see ``x-fake-compress``), or None."""
    mode = headers.get("x-fake-compress", default).strip().lower()
    if mode in _FORCED:
        return mode
    if mode != "allowed":
        return None
    accepted = [
        c.split(";")[0].strip().lower() for c in headers.get("accept-encoding", "").split(",")
    ]
    return next((c for c in accepted if c in CODINGS), None)


def _label(coding: str) -> str:
    return "gzip" if coding == "mislabelled" else coding


class _CompressingSink:
    """A `ByteSink` that compresses what it is given before writing it."""

    def __init__(self, response: web.StreamResponse, compressor: Compressor) -> None:
        self._response, self._compressor = response, compressor

    async def write(self, data: bytes) -> None:
        await self._response.write(self._compressor.piece(data))

    async def finish(self) -> None:
        await self._response.write(self._compressor.finish())


class FakeProvider:
    """The fake provider server; see the module docstring for what it answers."""

    def __init__(
        self,
        models: Sequence[str] | None = None,
        *,
        text: str = DEFAULT_TEXT,
        record: bool = True,
        compress: bool = False,
    ) -> None:
        self.models: tuple[str, ...] = tuple(models) if models is not None else DEFAULT_MODELS
        self.text = text
        self.record = record
        self.compress = "allowed" if compress else "none"
        self.received: list[ReceivedRequest] = []
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port = 0

    def clear(self) -> None:
        """Forget the recorded requests."""
        self.received.clear()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on host:port; port 0 picks a free port (see `port`)."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._serve)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runner = runner
        self._host, self._port = host, int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening and drop open connections (streams in progress are cut)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        """The port listened on (the real one when started with port 0)."""
        if self._runner is None:
            raise RuntimeError("FakeProvider is not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. 'http://127.0.0.1:8000' (a wildcard host becomes 127.0.0.1)."""
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        host = "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.record:
            self.received.append(_record_of(request, body))
        headers = _lower_headers(request.headers)
        shape = shape_of(request.path, headers)
        ids = _id_headers(shape)
        try:
            controls = parse_controls(headers, self.text)
            call = self._call(request, headers, body, controls, shape)
            reply = handle(call)
            await asyncio.sleep(controls.stall_s)
        except ApiError as error:
            await asyncio.sleep(_delay_of(headers))
            return _error_response(shape, error, ids)
        coding = choose_coding(headers, self.compress)
        if isinstance(reply, list):
            return await _stream(request, reply, controls, ids, coding)
        await asyncio.sleep(controls.delay_s)
        body = orjson.dumps(reply)
        if coding is not None:
            compressor = Compressor(coding)
            body = compressor.piece(body) + compressor.finish()
            ids = {**ids, "content-encoding": _label(coding)}
        return web.Response(body=body, content_type="application/json", headers=ids)

    def _call(
        self,
        request: web.Request,
        headers: dict[str, str],
        body: bytes,
        controls: Controls,
        shape: Shape,
    ) -> Call:
        method, path, query = request.method, request.path, dict(request.query)
        return Call(method, path, query, headers, body, controls, shape, self.models)


def _delay_of(headers: Mapping[str, str]) -> float:
    """The requested delay, or none when the header itself is malformed."""
    try:
        return (_int_header(headers, "x-fake-delay-ms", 0, 600_000) or 0) / 1000
    except ApiError:
        return 0.0


def _error_response(shape: Shape, error: ApiError, ids: dict[str, str]) -> web.Response:
    request_id = ids.get("request-id", ids.get("x-request-id", ""))
    headers = dict(ids)
    if error.status == 429:
        headers["retry-after"] = "1"
    body = orjson.dumps(error_body(shape, error, request_id))
    return web.Response(
        status=error.status, body=body, content_type="application/json", headers=headers
    )


async def _stream(
    request: web.Request,
    events: list[SseEvent],
    controls: Controls,
    ids: dict[str, str],
    coding: str | None = None,
) -> web.StreamResponse:
    headers = {**ids, "cache-control": "no-cache"}
    if coding is not None:
        headers["content-encoding"] = _label(coding)
    response = web.StreamResponse(headers=headers)
    response.content_type = "text/event-stream"
    response.charset = "utf-8"
    await response.prepare(request)
    sink = _CompressingSink(response, Compressor(coding)) if coding else None
    writer = SseWriter(sink or response, split=controls.split)
    for index, event in enumerate(events):
        if index == controls.abort_after:
            return await _abort(request, writer, response)
        if index:
            await asyncio.sleep(controls.delay_s)
        await writer.send(event)
    await writer.flush()
    if sink is not None:
        await sink.finish()
    await response.write_eof()
    return response


async def _abort(
    request: web.Request, writer: SseWriter, response: web.StreamResponse
) -> web.StreamResponse:
    """Close the connection mid-body: the client sees an incomplete chunked response."""
    await writer.flush()
    if request.transport is not None:
        request.transport.close()
    return response


# --------------------------------------------------------------------------- threads and CLI


class _ThreadRunner:
    """Runs a FakeProvider on its own event loop in a daemon thread."""

    def __init__(self, provider: FakeProvider, host: str, port: int) -> None:
        self._provider, self._host, self._port = provider, host, port
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fake-provider", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError("fake provider failed to start") from self._error

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # handed to the starting thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        await self._provider.start(self._host, self._port)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._provider.stop()


@contextlib.contextmanager
def run_in_thread(
    models: Sequence[str] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    text: str = DEFAULT_TEXT,
    compress: bool = False,
) -> Iterator[FakeProvider]:
    """Run a FakeProvider in a background thread for the ``with`` block (for sync clients)."""
    provider = FakeProvider(models, text=text, compress=compress)
    runner = _ThreadRunner(provider, host, port)
    runner.start()
    try:
        yield provider
    finally:
        runner.stop()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fake Anthropic/OpenAI provider.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated ids")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="default reply text")
    return parser.parse_args(argv)


async def _serve_forever(args: argparse.Namespace) -> None:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    # A long-running process cannot be inspected, so it does not keep request records.
    provider = FakeProvider(models, text=args.text, record=False)
    await provider.start(args.host, args.port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    print(provider.url, flush=True)  # the only stdout line, so callers can read the port
    await stopping.wait()
    await provider.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: serve until SIGINT or SIGTERM."""
    asyncio.run(_serve_forever(_parse_args(argv)))


if __name__ == "__main__":
    main()
