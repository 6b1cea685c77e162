"""A dialect per client wire schema: everything the gateway knows about one request shape.

The request stream holds one `Dialect` (chosen once per request from the path, a
module-level singleton) and every policy reads a request or an answer through it:

- where the model is: in the body (`model`) or in the URL (`ModelIn.URL`: a Bedrock
  `/model/{id}/invoke` or a Vertex `.../models/{id}:rawPredict` dialect overrides
  `request_model` and `with_model`);
- the texts a guard sees (`texts`, one walker in `extproc.apis.walk`), the answer's
  texts (`answer_texts` for unmasking, `screened_parts` for output screening,
  `answer_text` for a structured-output schema);
- what a cache key drops (`cache_view`), the input token estimate, the output cap;
- usage, finish reasons and served model of a JSON answer; a stream accumulator;
- error bodies (JSON and the in-stream error event), and a cached answer unfolded
  into the stream the streaming endpoint would have sent;
- the framing its streams use (`framing`: SSE for both today).

Register a new one with `register_dialect`; `dialect_of(name)` finds it by its
`ApiKind` name (what the config, the audit record and the worker process carry).
Nothing outside `extproc/apis/` and `extproc/upstream/` compares wire-format names.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Protocol

import extproc.apis.anthropic as anthropic
import extproc.apis.openai as openai
from extproc.apis.framing import SSE, Framing
from extproc.apis.kind import ApiKind
from extproc.apis.rewrite import SseTextRewriter, TextTransform
from extproc.apis.sse import SseEvent
from extproc.apis.tokens import estimate_input_tokens
from extproc.apis.usage import Usage
from extproc.apis.walk import Path, Text, WalkLimits, model_texts

__all__ = [
    "ANTHROPIC",
    "OPENAI",
    "Accumulator",
    "AnthropicMessages",
    "Dialect",
    "ModelIn",
    "OpenAIChat",
    "dialect_of",
    "register_dialect",
]


class ModelIn(enum.Enum):
    BODY = "body"  # `model` in the JSON body
    URL = "url"  # a path segment (Bedrock, Vertex)


class Accumulator(Protocol):
    """Folds a streamed answer's events (see `anthropic.StreamAccumulator`)."""

    usage: Usage
    model: str | None
    complete: bool
    error: dict[str, Any] | None
    first_content_seen: bool
    final_usage_seen: bool
    content_bytes: int

    def feed(self, event: SseEvent) -> None: ...

    def folded_message(self) -> dict[str, Any]: ...

    def finish_reasons(self) -> list[str]: ...


class StreamFilter(Protocol):
    """Bytes of the client's stream in, the bytes to send on out (see `prepare_stream`)."""

    def feed(self, chunk: bytes) -> bytes: ...

    def close(self) -> bytes: ...


_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens")


def _lower_output_limits(body: dict[str, Any], cap: int) -> bool:
    changed = False
    for name in _OUTPUT_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[name] = cap
            changed = True
    return changed


def _fit_thinking(body: dict[str, Any], cap: int) -> None:
    thinking = body.get("thinking")
    if isinstance(thinking, dict):
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int) and budget >= cap:
            # Anthropic requires budget_tokens < max_tokens.
            body["thinking"] = {**thinking, "budget_tokens": max(1, cap - 1)}


class Dialect:
    """The shared behaviour; a subclass per wire schema fills in the rest."""

    name: ClassVar[ApiKind]
    model_in: ClassVar[ModelIn] = ModelIn.BODY
    framing: ClassVar[Framing] = SSE
    generate_path: ClassVar[str]  # the endpoint that runs a model (named in hints)
    pages_model_list: ClassVar[bool] = False  # `/v1/models` is paged by the gateway

    # -- the request ---------------------------------------------------------------

    def request_model(self, path: str, body_model: str | None) -> str | None:
        """The model a request names (`body_model`: the body's `model`, checked). A URL
        dialect returns the path's model, checked like a body's (it becomes a header)."""
        return body_model

    def request_stream(self, path: str, body_stream: bool) -> bool:
        """Whether the caller asked for a stream (`body_stream`: the body's `stream`)."""
        return body_stream

    def with_model(self, path: str, body: dict[str, Any], model: str) -> str:
        """Name `model` in the request; the path to send (changed for a URL model)."""
        body["model"] = model
        return path

    def texts(
        self, body: Mapping[str, Any], *, tools: bool = True, limits: WalkLimits | None = None
    ) -> list[Text]:
        """Every model-visible text, in prompt order (guard, injection scoring)."""
        return model_texts(body, self.name, tools=tools, limits=limits)

    def estimate_input_tokens(self, body: Mapping[str, Any], size: int) -> int:
        return estimate_input_tokens(body, size)

    def cap_output(self, body: dict[str, Any], cap: int) -> bool:
        """Make `cap` the most the request may generate; True if the body changed. A
        larger limit is lowered; an Anthropic request without `max_tokens` is refused by
        the provider before it generates anything."""
        changed = _lower_output_limits(body, cap)
        if changed:
            _fit_thinking(body, cap)
        return changed

    def prepare_stream(self, body: dict[str, Any]) -> tuple[bool, StreamFilter | None]:
        """Make a streamed answer carry its usage: (body changed, a filter that takes
        out what the client did not ask for)."""
        return False, None

    def cache_view(self, body: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def held_out(self, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The body without the parts no policy may change, and those parts (None:
        nothing is held out). A guard screens the first; `put_back` restores the rest."""
        return body, None

    def put_back(self, body: dict[str, Any], held: Any) -> None:
        """Return what `held_out` took to a rewritten body, where it was."""

    def cache_headers(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> dict[str, str]:
        """What of the request's headers a cache key holds: the API version and betas."""
        flags = (f.strip() for f in headers.get("anthropic-beta", "").split(","))
        beta = ",".join(sorted(f for f in flags if f))
        return {"version": headers.get("anthropic-version", ""), "beta": beta}

    def cache_schema(self) -> ApiKind:
        """The schema a cache key is made in: a dialect that shares another's answers
        (Bedrock and Vertex clients share Anthropic's) names that one."""
        return self.name

    # -- the answer ----------------------------------------------------------------

    def usage(self, answer: Mapping[str, Any]) -> Usage:
        raise NotImplementedError

    def finish_reasons(self, answer: Mapping[str, Any]) -> list[str]:
        raise NotImplementedError

    def completion(self, answer: Mapping[str, Any]) -> Any:
        """What the audit record keeps of an answer's content (when text is recorded)."""
        return answer.get("content", answer.get("choices"))

    def accumulator(self) -> Accumulator:
        raise NotImplementedError

    def unfold(self, answer: Mapping[str, Any]) -> bytes:
        """A JSON answer as the stream the streaming endpoint would have sent."""
        raise NotImplementedError

    def answer_text(self, answer: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def answer_texts(self, answer: Mapping[str, Any]) -> Iterator[tuple[Path, str, bool]]:
        raise NotImplementedError

    def screened_parts(self, answer: Mapping[str, Any]) -> Iterator[tuple[Path, Any, str]]:
        raise NotImplementedError

    def rewriter(self, make: Callable[[], TextTransform]) -> SseTextRewriter:
        """Rewrites the texts of a streamed answer on its way (output guard, unmasking)."""
        return SseTextRewriter(self.name, make, self.framing)

    # -- errors --------------------------------------------------------------------

    def error_body(self, status: int, message: str, reason: str) -> bytes:
        raise NotImplementedError

    def stream_error(self, error_body: bytes) -> bytes:
        """An error body as the event that ends a stream whose status has left."""
        raise NotImplementedError


class AnthropicMessages(Dialect):
    name: ClassVar[ApiKind] = "anthropic"  # widened: the cloud dialects subclass it
    generate_path = "/v1/messages"
    pages_model_list = True

    def cache_view(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return anthropic.cache_view(body)

    def held_out(self, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Claude Code's attribution block (`system[0]`), forwarded byte for byte."""
        screened, billing = anthropic.split_billing_block(body)
        return (screened, billing) if billing is not None else (body, None)

    def put_back(self, body: dict[str, Any], held: Any) -> None:
        body["system"] = [held, *body.get("system", [])]

    def usage(self, answer: Mapping[str, Any]) -> Usage:
        return anthropic.usage_from_message(answer)

    def finish_reasons(self, answer: Mapping[str, Any]) -> list[str]:
        return anthropic.finish_reasons(answer)

    def accumulator(self) -> Accumulator:
        return anthropic.StreamAccumulator()

    def unfold(self, answer: Mapping[str, Any]) -> bytes:
        return anthropic.unfold_message(answer)

    def answer_text(self, answer: Mapping[str, Any]) -> str:
        return anthropic.answer_text(answer)

    def answer_texts(self, answer: Mapping[str, Any]) -> Iterator[tuple[Path, str, bool]]:
        return anthropic.answer_texts(answer)

    def screened_parts(self, answer: Mapping[str, Any]) -> Iterator[tuple[Path, Any, str]]:
        return anthropic.screened_parts(answer)

    def error_body(self, status: int, message: str, reason: str) -> bytes:
        return anthropic.error_body(status, message)

    def stream_error(self, error_body: bytes) -> bytes:
        return self.framing.encode(anthropic.stream_error_event(error_body))


class OpenAIChat(Dialect):
    name = "openai"
    generate_path = "/v1/chat/completions"

    def cap_output(self, body: dict[str, Any], cap: int) -> bool:
        """As the base, and a request with no limit at all (the model's own maximum,
        possibly beyond `cap`) gets `max_completion_tokens: cap`."""
        changed = _lower_output_limits(body, cap)
        if not any(name in body for name in _OUTPUT_FIELDS):
            body["max_completion_tokens"] = cap
            changed = True
        if changed:
            _fit_thinking(body, cap)
        return changed

    def prepare_stream(self, body: dict[str, Any]) -> tuple[bool, StreamFilter | None]:
        """OpenAI streams carry no usage unless asked (`stream_options.include_usage`);
        a client that did not ask gets no usage-only chunk."""
        dropper = None if openai.asks_for_usage(body) else openai.UsageChunkDropper()
        return openai.request_usage(body), dropper

    def cache_view(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return openai.cache_view(body)

    def usage(self, answer: Mapping[str, Any]) -> Usage:
        return openai.usage_from_completion(answer)

    def finish_reasons(self, answer: Mapping[str, Any]) -> list[str]:
        return openai.finish_reasons(answer)

    def accumulator(self) -> Accumulator:
        return openai.StreamAccumulator()

    def unfold(self, answer: Mapping[str, Any]) -> bytes:
        return openai.unfold_completion(answer)

    def answer_text(self, answer: Mapping[str, Any]) -> str:
        return openai.answer_text(answer)

    def answer_texts(self, answer: Mapping[str, Any]) -> Iterator[tuple[Path, str, bool]]:
        return openai.answer_texts(answer)

    def screened_parts(self, answer: Mapping[str, Any]) -> Iterator[tuple[Path, Any, str]]:
        return openai.screened_parts(answer)

    def error_body(self, status: int, message: str, reason: str) -> bytes:
        return openai.error_body(status, message, code=reason)

    def stream_error(self, error_body: bytes) -> bytes:
        return self.framing.encode(openai.stream_error_event(error_body))


ANTHROPIC = AnthropicMessages()
OPENAI = OpenAIChat()

_DIALECTS: dict[str, Dialect] = {ANTHROPIC.name: ANTHROPIC, OPENAI.name: OPENAI}


def register_dialect(dialect: Dialect) -> None:
    _DIALECTS[dialect.name] = dialect


def dialect_of(name: str) -> Dialect:
    """The dialect registered under a wire-schema name; `KeyError` for an unknown one."""
    return _DIALECTS[name]
