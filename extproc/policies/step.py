"""Policy steps: one shape for every policy on the request path.

A request runs its steps in one fixed order (`extproc.policies.steps.STEPS`: auth ▸
model policy ▸ guard ▸ cache ▸ spend). Each policy owns its config section, its pure
core and its store I/O, and offers a `Policy`: `open(exchange)` returns the step's `Run`
for this request, or None when the policy is off for it (so a step with nothing to do
costs no object and no await). A run is registered as it opens (so a refusal is still
audited with the step's fields). The policies that act on the request headers
(`steps.AT_HEADERS`: auth, model policy) open as the headers arrive; the others open
once the request body is parsed.

A `Run` has the same small set of hooks, each a no-op unless the step overrides it:

- the request headers: `headers(exchange)`, awaited in step order for the runs opened
  at the headers, once the route and its profile are known: auth finds who calls
  (store I/O), the model policy the allow-lists for that caller. It may refuse.
- the request: `start(exchange)` (synchronous, in step order once the body is parsed:
  the runs opened at the headers first, then each other policy as it opens; it may
  refuse by raising a `GatewayError`, choose what is served (the model policy:
  `exchange.serve_model`) or rewrite the body with `exchange.replace_body`), then
  `request(exchange, reply)`: the step's store I/O before the request leaves, in step
  order (awaited only for runs whose `waits` is set). It may refuse, or answer the
  request itself with a `Reply` (a cache hit); the steps after it see that reply (spend
  admits a hit as a hit) and the answer hooks screen it like a fresh answer. A request
  that names no model is forwarded as it is: no step starts.
- the answer: `answer_headers()` (added to the response headers), `answer(body)` (a
  complete JSON answer, fresh or replayed: the body to send instead, or None; raise
  `AnswerWithheld` to withhold it), `rewriter()` (a rewriter over a streamed answer's
  events; at most one step may rewrite) and `stream_end(accumulator)` (the stream ended).
- `close(ending)`: work after the answer, in step order, once the RPC has ended (only
  for runs whose `closes` is set): the cache stores the answer, spend settles.
- `audit_fields(done)`: the step's part of the audit record. `extproc.telemetry.record`
  merges them over the request's own facts in step order (auth first: who calls; the
  model policy: what was asked for): the record never reaches into a step's state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from extproc.apis.kind import ApiKind
from extproc.apis.usage import Usage

if TYPE_CHECKING:
    from extproc.apis import Route
    from extproc.apis.dialect import Accumulator, Dialect
    from extproc.apis.rewrite import SseTextRewriter
    from extproc.config import ProfileConfig
    from extproc.gateway import Gateway
    from extproc.policies.auth import Identity
    from extproc.policies.guard import Inspection
    from extproc.policies.request import ParsedRequest

__all__ = ["Done", "Ending", "Exchange", "Policy", "Reply", "Run", "Step"]

Extend = Callable[[float], Awaitable[None]]
R = TypeVar("R", bound="Run")


@dataclass(frozen=True, slots=True)
class Done:
    """How the request ended, as every step sees it."""

    outcome: str
    usage: Usage  # what it is billed for (an estimate when the final usage never came)


class Step(Protocol):
    """Anything that adds fields to the audit record (every `Run`)."""

    def audit_fields(self, done: Done) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Ending:
    """What the steps that act after the answer (cache, spend) are given at close."""

    outcome: str
    api: ApiKind  # the wire schema the answer is in
    # The complete successful answer as JSON, else None; made only if a step asks (a
    # streamed answer is folded into one message for it).
    answer: Callable[[], dict[str, Any] | None]
    billable: Usage  # what the request is charged for


@dataclass(frozen=True, slots=True)
class Reply:
    """A step answers the request itself (a cache hit): a complete JSON answer, which the
    stream screens through the answer hooks and sends in the caller's framing."""

    answer: dict[str, Any]
    outcome: str  # the request's outcome ("cache_hit")
    headers: tuple[tuple[str, str], ...] = ()
    details: str = "extproc_reply"


class Exchange(Protocol):
    """What a step sees of the request it runs on (`extproc.stream.RequestStream`)."""

    @property
    def gw(self) -> Gateway: ...
    @property
    def request_id(self) -> str: ...
    @property
    def route(self) -> Route | None: ...
    @property
    def dialect(self) -> Dialect: ...
    @property
    def profile(self) -> ProfileConfig: ...
    @property
    def identity(self) -> Identity: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def jwt_metadata(self) -> Mapping[str, Any]: ...  # claims Envoy's jwt_authn validated
    @property
    def request(self) -> ParsedRequest | None: ...
    @property
    def served_model(self) -> str | None: ...
    @property
    def alternatives(self) -> tuple[str, ...]: ...  # models a fallback chain may serve
    @property
    def body_size(self) -> int: ...  # the request body's (decoded) size in bytes
    @property
    def inspection(self) -> Inspection | None: ...  # a worker's screening, if any
    @property
    def extend(self) -> Extend: ...  # ask Envoy for more time (a long wait ahead)

    def replace_body(self, body: dict[str, Any]) -> None:
        """Forward `body` instead of the caller's."""

    def serve_model(self, model: str) -> None:
        """Serve the request with `model`: its provider is chosen (or the route's fallback
        chain planned) and the request names it. A fallback may serve another later."""

    def payer(self) -> str | None:
        """The provider key an anonymous pass-through caller pays with."""

    def presented(self) -> str | None:
        """The caller's own provider key, for anonymous pass-through callers."""

    def run_of(self, kind: type[R]) -> R | None:
        """This request's run of an earlier step, if it has one."""


class Run:
    """One policy's run on one request. Every hook is a no-op until a step overrides it;
    `waits` and `closes` say which async hooks the stream awaits at all."""

    waits: ClassVar[bool] = False  # `request` has I/O to await
    closes: ClassVar[bool] = False  # `close` has work after the answer

    async def headers(self, exchange: Exchange) -> None:
        """The request headers, route and profile are known (runs opened at the headers)."""
        return None

    def start(self, exchange: Exchange) -> None:
        """The request is parsed and this run is registered: check it, refuse it (raise
        a `GatewayError`), or rewrite its body (`exchange.replace_body`)."""
        return None

    async def request(self, exchange: Exchange, reply: Reply | None) -> Reply | None:
        """The store I/O before the request leaves; `reply`: an earlier step's answer."""
        return reply

    def answer_headers(self) -> tuple[tuple[str, str], ...]:
        return ()

    def answer(self, body: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def rewriter(self) -> SseTextRewriter | None:
        return None

    def stream_end(self, accumulator: Accumulator | None) -> None:
        return None

    async def close(self, ending: Ending) -> None:
        return None

    def audit_fields(self, done: Done) -> Mapping[str, Any]:
        return {}


class Policy(Protocol):
    """A policy step, process-wide: its run for one request, or None when it is off."""

    def open(self, exchange: Exchange) -> Run | None: ...
