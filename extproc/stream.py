"""One object per HTTP request: a method per ext_proc phase, typed state between them.

Envoy opens one gRPC stream per HTTP request and sends its phases in order.
`RequestStream` checks that order against a transition table (h11 style) and
orchestrates: the client's dialect, the policy steps in their fixed order (auth ▸ model
policy ▸ guard ▸ cache ▸ spend: `extproc.policies.steps.STEPS`, through the hooks of
`extproc.policies.step`), the upstream adapter, and the one error boundary
(`_refuse`); each phase returns a `Decision`. `close()` settles whatever is left when
the stream ends, normally or not (client gone, upstream reset), so every request
yields exactly one audit record. No policy's own logic lives here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from extproc import fallback
from extproc.apis import (
    Endpoint,
    Route,
    api_of_path,
    classify,
    cloud_kind_of,
    encoding,
    model_list,
)
from extproc.apis import error_response as render_error
from extproc.apis.clouds import inference_profiles_body
from extproc.apis.dialect import (
    ANTHROPIC,
    Accumulator,
    Dialect,
    ModelIn,
    StreamFilter,
    dialect_of,
)
from extproc.apis.framing import EventParser, Framing, framing_for
from extproc.apis.kind import ApiKind
from extproc.apis.rewrite import SseTextRewriter
from extproc.apis.sse import SseEvent
from extproc.apis.usage import Usage
from extproc.config import FallbackStep, ProfileConfig, ProviderConfig
from extproc.credentials import CredentialMissing
from extproc.decisions import CONTINUE, BodyMode, Continue, Decision, HeaderChanges, Respond
from extproc.errors import (
    AnswerWithheld,
    BadRequest,
    Forbidden,
    GatewayError,
    GatewayTimeout,
    HeadersTooLarge,
    InternalError,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)
from extproc.gateway import Gateway
from extproc.offload import (
    INLINE_VALUES,
    OFFLOAD_BYTES,
    OFFLOAD_SECONDS,
    Job,
    check_values,
    value_bound,
)
from extproc.phases import (
    Event,
    Phase,
    RequestBody,
    RequestHeaders,
    ResponseBody,
    ResponseHeaders,
)
from extproc.policies import routing
from extproc.policies.auth import ANONYMOUS, AuthRun, Identity
from extproc.policies.budget.spending import SpendRun, cut_short_usage
from extproc.policies.guard import Inspection
from extproc.policies.models import ModelRun, target_for
from extproc.policies.request import ParsedRequest, parse_cloud_request, parse_request
from extproc.policies.step import Done, Ending, Policy, Reply, Run, Step
from extproc.policies.steps import STEPS, at_headers
from extproc.signin import managed, otlp
from extproc.signin.policy import policy_named
from extproc.signin.service import SignIn
from extproc.store import StoreError
from extproc.telemetry.otel import RequestTrace
from extproc.telemetry.record import account
from extproc.translate import Notes
from extproc.translate.models import listed_entry
from extproc.translate.registry import (
    bind,
    note_beta_headers,
    upstream_header_changes,
)
from extproc.upstream import (
    IDENTITY,
    HeaderTranslator,
    Transcoder,
    Translator,
    UpstreamRequest,
)
from extproc.upstream.adapter import CALLER_AUTH

log = logging.getLogger(__name__)

SESSION_HEADER = "x-claude-code-session-id"
AGENT_HEADER = "x-claude-code-agent-id"  # subagents
PARENT_AGENT_HEADER = "x-claude-code-parent-agent-id"
# A header value copied into a record is cut to this many characters: callers choose them.
MAX_RECORDED_HEADER = 128
# Request headers the gateway accepts (431 past them, in the caller's shape). Envoy's own
# limits (max_request_headers_kb / _count in the shipped configs) sit above these, so
# the caller gets an answer rather than a reset connection.
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_COUNT = 150


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def record_time(timestamp: float) -> str:
    """`datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")`, the
    audit record's `time`, at a fraction of its cost: the date and time of day are
    formatted once per second, the milliseconds per request. The microseconds are
    rounded as `fromtimestamp` rounds them (half to even, carried into the seconds)."""
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        micros, whole = micros - 1_000_000, whole + 1
    elif micros < 0:
        micros, whole = micros + 1_000_000, whole - 1
    return f"{_second_prefix(int(whole))}.{micros // 1000:03d}+00:00"


@functools.lru_cache(maxsize=1)  # requests finishing within one second share it
def _second_prefix(second: int) -> str:
    return dt.datetime.fromtimestamp(second, dt.UTC).isoformat(timespec="seconds")[:-6]


def recorded_header(headers: Mapping[str, str], name: str) -> str | None:
    """A caller's header value as the audit record keeps it: bounded, None when absent."""
    value = headers.get(name, "").strip()
    return value[:MAX_RECORDED_HEADER] or None


# Envoy's response code details when the provider sent no response headers in time
# (the dispatch route's retry_policy.per_try_timeout; see limits.first_byte_timeout_seconds).
FIRST_BYTE_TIMEOUTS = frozenset({"upstream_per_try_timeout", "response_timeout"})

# Outcomes of a request whose stream ended before the answer did.
CUT_SHORT = frozenset({"client_abort", "provider_reset"})


def _cut_short_outcome(status: int, cancelled: bool) -> str:
    """Who ended a stream that stopped without its end, as far as the server can tell.

    Before any answer a provider failure would come back as a response, so it is the
    client. Mid-answer the server cannot tell: Envoy closes ext_proc's gRPC stream the
    same way whichever side cut the request (its filter's onDestroy: a half-close, then a
    reset unless ext_proc_graceful_grpc_close is on), so whether the RPC looked ended or
    cancelled was scheduling, not cause (a loaded machine recorded hang-ups as resets).
    It says `client_abort`, the common case; Envoy's response flags (DC vs UR/UC/UPE)
    are the authority, and `extproc reconcile` corrects a provider reset from them."""
    return "client_abort"


# Allowed phase order (h11-style table): the phases that may follow each one.
_NEXT: dict[Phase | None, frozenset[Phase]] = {
    None: frozenset({Phase.REQUEST_HEADERS, Phase.LOCAL_REPLY}),
    Phase.LOCAL_REPLY: frozenset({Phase.RESPONSE_BODY}),
    Phase.REQUEST_HEADERS: frozenset({Phase.REQUEST_BODY, Phase.RESPONSE_HEADERS}),
    Phase.REQUEST_BODY: frozenset({Phase.REQUEST_BODY, Phase.RESPONSE_HEADERS}),
    Phase.RESPONSE_HEADERS: frozenset({Phase.RESPONSE_BODY}),
    Phase.RESPONSE_BODY: frozenset({Phase.RESPONSE_BODY}),
}
_RESPONSE_PHASES = frozenset({Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY})
# Before a request of ours started (nothing to account).
_NOT_STARTED = frozenset({None, Phase.LOCAL_REPLY})


_AUTHORITIES: dict[str, str] = {}  # base URL -> host[:port], parsed once per provider


def _authority(provider: ProviderConfig) -> str:
    found = _AUTHORITIES.get(provider.base_url)
    if found is None:
        found = _AUTHORITIES[provider.base_url] = provider.authority
    return found


# STEPS split into the policies opened at the request headers and the rest, made once
# per STEPS value (a test may replace STEPS).
_SPLIT: list[tuple[tuple[Policy, ...], tuple[Policy, ...], tuple[Policy, ...]]] = []


def _split_steps(steps: tuple[Policy, ...]) -> tuple[tuple[Policy, ...], tuple[Policy, ...]]:
    if not _SPLIT or _SPLIT[0][0] is not steps:
        early = tuple(policy for policy in steps if at_headers(policy))
        late = tuple(policy for policy in steps if not at_headers(policy))
        _SPLIT[:] = [(steps, early, late)]
    return _SPLIT[0][1], _SPLIT[0][2]


def _check_header_size(headers: Mapping[str, str]) -> None:
    # `map` keeps the sum in C (no generator frame per header).
    size = sum(map(len, headers)) + sum(map(len, headers.values()))
    if size > MAX_HEADER_BYTES or len(headers) > MAX_HEADER_COUNT:
        raise HeadersTooLarge(
            f"the request headers are {size} bytes in {len(headers)} headers; the gateway "
            f"accepts at most {MAX_HEADER_BYTES} bytes and {MAX_HEADER_COUNT} headers "
            "(check ANTHROPIC_CUSTOM_HEADERS and cookies)"
        )


def _stream_content_type(framing: Framing) -> str:
    """A stream's content type for the client: text framings say their charset, a binary
    one (AWS event-stream) has none."""
    kind = framing.content_type
    return kind + "; charset=utf-8" if kind.startswith("text/") else kind


def _undecodable(why: str) -> AnswerWithheld:
    """The 502 sent in place of an answer no policy could read."""
    return AnswerWithheld(f"{why}; the answer was withheld", reason="undecodable_answer")


def _as_gateway_error(failure: Exception) -> GatewayError:
    """Any failure as the gateway error the caller gets: a store outage is `store_down`
    (one reason per cause), anything unexpected a 500 `internal` (logged with its trace)."""
    if isinstance(failure, GatewayError):
        return failure
    if isinstance(failure, StoreError):
        log.warning("store unreachable: %s", failure)
        return Unavailable("the gateway's store is unreachable", reason="store_down")
    log.exception("unexpected failure", exc_info=failure)
    return InternalError("the gateway failed to process the request; it was logged")


class ProtocolError(Exception):
    """Envoy sent phases out of order; the server fails the RPC (see `protocol_failed`)."""


@dataclass
class _Answer:
    """What came back from the provider."""

    status: int = 0
    streamed: bool = False
    usage: Usage = field(default_factory=Usage)
    served_model: str | None = None
    first_token_at: float | None = None
    completion: Any = None
    error_type: str | None = None
    json: dict[str, Any] | None = None
    usage_estimated: bool = False  # the final usage never came: billed from what was seen
    finish_reasons: list[str] = field(default_factory=list)


Extend = Callable[[float], Awaitable[None]]
R = TypeVar("R", bound=Run)
# A compressed answer may decode to this many times the request body limit.
_ANSWER_DECODE_FACTOR = 4


async def _no_extension(seconds: float) -> None:
    return None


class RequestStream:
    def __init__(
        self,
        gateway: Gateway,
        extend: Extend = _no_extension,
        trace_context: Mapping[str, str] | None = None,
    ) -> None:
        self.gw = gateway
        self.extend = extend
        # Envoy's span context from the gRPC call (Envoy tracing on), else the HTTP headers'.
        self.trace_context = trace_context
        self.started = gateway.clock()
        self.phase: Phase | None = None
        self.request_id = ""
        self.route_name = ""
        self.session_id: str | None = None
        self.agent_id: str | None = None
        self.parent_agent_id: str | None = None
        self.dialect: Dialect = ANTHROPIC  # the caller's wire schema (set from the path)
        self.translator: Translator | None = None  # None: the provider speaks the caller's
        self.transcoder: Transcoder | None = None  # a streamed answer being translated
        self.translation: Notes | None = None  # what translation dropped (audit record)
        self.route: Route | None = None
        self.path = ""
        self.target: routing.Target | None = None
        self.profile: ProfileConfig = gateway.config.profiles["default"]
        self.request: ParsedRequest | None = None
        self.served_model: str | None = None
        self.headers: Mapping[str, str] = {}
        self.jwt_metadata: Mapping[str, Any] = {}
        self.runs: list[Run] = []  # the policy steps that opened, in step order (STEPS)
        self._auth: AuthRun | None = None  # two of them, at hand (who calls, its lists)
        self._models: ModelRun | None = None
        self.body_changed = False  # the body to forward differs from the caller's
        self.inspection: Inspection | None = None  # the guard's findings, if made off-loop
        self.body_size = 0
        self.rewriter: SseTextRewriter | None = None
        self.rewritten_events = 0
        self.answer = _Answer()
        self.sse: EventParser | None = None
        self.accumulator: Accumulator | None = None
        self.outcome: str | None = None
        self.finished_at = self.started
        self.settled = False
        self.forwarded = False  # the request body went on to the provider
        self.usage_dropper: StreamFilter | None = None
        self.json_chunks: list[bytes] = []
        self.signing_in = False  # a sign-in endpoint, answered by extproc.signin
        self.decoded_request = False  # the client's body arrived compressed and was decoded
        self.raw_body = b""
        self.model_page: model_list.PageRequest | None = None  # /v1/models paged here
        self.upstream_path: str | None = None  # when it differs from the caller's path
        self.answer_decoder: encoding.StreamDecoder | None = None
        self.withheld: bytes | None = None  # the error sent in place of an unreadable answer
        self.trace: RequestTrace | None = None
        self.chain: tuple[FallbackStep, ...] = ()  # the providers Envoy tries, in order
        self.alternatives: tuple[str, ...] = ()  # the chain's models, priced at admission
        self.attempts: list[fallback.Attempt] = []  # as the last attempt reported them
        self.chain_notes: dict[str, Notes] = {}  # per chain provider: what its translation dropped

    @property
    def api(self) -> ApiKind:
        """The caller's wire schema by name (audit record, metric labels)."""
        return self.dialect.name

    @property
    def identity(self) -> Identity:
        """Who calls, as the auth step found it (anonymous before it ran)."""
        return self._auth.identity if self._auth is not None else ANONYMOUS

    @property
    def key(self) -> str | None:
        """The credential the caller presented (the auth step read it)."""
        return self._auth.key if self._auth is not None else None

    def _model_policy(self) -> ModelRun:
        assert self._models is not None  # opened with the request headers
        return self._models

    # -- phase order -------------------------------------------------------------------

    async def handle(self, event: Event) -> Decision:
        """One ext_proc message, as the frozen event `envoy_api` made of it."""
        match event:
            case ResponseBody():
                return await self.response_body(event.body, event.end_of_stream)
            case RequestBody():
                return await self.request_body(event.body, event.end_of_stream)
            case RequestHeaders():
                return await self.request_headers(
                    event.headers,
                    event.end_of_stream,
                    route_name=event.route_name,
                    route_policy=event.route_policy,
                    jwt_metadata=event.jwt_metadata,
                )
            case ResponseHeaders():
                return await self.response_headers(
                    event.headers, event.end_of_stream, details=event.details
                )
        return CONTINUE  # trailers pass unchanged

    def _enter(self, phase: Phase) -> None:
        if self.outcome is not None and phase in _RESPONSE_PHASES:
            # An immediate response we sent comes back through the response phases.
            self.phase = phase
            return
        if phase not in _NEXT.get(self.phase, frozenset()):
            raise ProtocolError(f"{phase} after {self.phase}")
        self.phase = phase

    def protocol_failed(self) -> None:
        """Envoy sent a phase out of order; the server fails the RPC. Audited as such."""
        self.gw.metrics.gateway_errors.labels("protocol_error").inc()
        if self.phase is not None:  # a request had started (no record for one that had not)
            self._finish("rejected_protocol_error")

    # -- the error boundary --------------------------------------------------------------

    def _refuse(self, failure: Exception) -> Decision:
        """The one error boundary: every refusal and failure inside the gateway becomes
        the caller's answer here, in its wire shape (`error_response`: status, `error.type`,
        `x-gateway-error`, `x-gateway-request-id`, `x-should-retry`), counted once and
        audited with the status the caller got.

        Before the provider's status has gone to the client this is an immediate
        response (a held JSON answer has its status and body replaced); once a stream's
        status has left, an error event ends it and the rest of the answer is dropped.
        An answer the gateway withheld is outcome `error` with its reason as the record's
        `error_type`; anything else is `rejected_<reason>`."""
        error = _as_gateway_error(failure)
        self.gw.metrics.gateway_errors.labels(error.reason).inc()
        rendered = render_error(self.dialect.name, error, self.request_id)
        headers = rendered.headers + self._trace_header()
        withheld = isinstance(error, AnswerWithheld)
        if withheld or self.phase is Phase.RESPONSE_BODY:
            self.answer.error_type, self.answer.json = error.reason, None
        if self.phase is Phase.RESPONSE_BODY and self.answer.streamed:
            self.withheld = b""  # the status has left: the rest of the stream is dropped
            return Continue(body=self.dialect.stream_error(rendered.body))
        self.answer.status = error.status
        if self.phase is Phase.RESPONSE_BODY:  # a buffered answer: still ours to replace
            status = ((":status", str(error.status)),)
            changes = HeaderChanges(set=status + headers, remove=("content-length",))
            return Continue(body=rendered.body, headers=changes)
        self._finish("error" if withheld else f"rejected_{error.reason}")
        return dataclasses.replace(rendered, headers=headers)

    # -- request -----------------------------------------------------------------------

    async def request_headers(
        self,
        headers: dict[str, str],
        end_of_stream: bool,
        *,
        route_name: str = "",
        route_policy: Mapping[str, Any] | None = None,
        jwt_metadata: Mapping[str, Any] | None = None,
    ) -> Decision:
        self._enter(Phase.REQUEST_HEADERS)
        self.gw.metrics.active_streams.inc()
        self.request_id = headers.get("x-request-id") or uuid.uuid4().hex
        self.route_name = route_name
        self.session_id = recorded_header(headers, SESSION_HEADER)
        self.agent_id = recorded_header(headers, AGENT_HEADER)
        self.parent_agent_id = recorded_header(headers, PARENT_AGENT_HEADER)
        self.headers = headers
        self.trace = self.gw.otel.start(self.trace_context or headers)
        self.path = headers.get(":path", "/")
        self.jwt_metadata = jwt_metadata or {}
        self.dialect = dialect_of(api_of_path(self.path, headers))
        try:
            self._open_steps(early=True)
            if self.gw.signin is not None and SignIn.serves(self.path):
                return await self._sign_in(headers, end_of_stream)
            self._classify(headers)
            if self.route is not None and self.route.endpoint is Endpoint.PROBE:
                return await self._probe()
            if self.route is not None and self.route.endpoint is Endpoint.INFERENCE_PROFILES:
                return self._inference_profiles()
            self.profile = self.gw.profiles.resolve(route_policy, route_name)
            if self.profile.refuse is not None:
                raise Forbidden(self.profile.refuse, reason="route_refused")
            for run in self.runs:  # auth, then the model policy's lists for the caller
                await run.headers(self)
            return await self._after_request_headers(end_of_stream)
        except Exception as failure:  # every failure is answered at the boundary
            return self._refuse(failure)

    async def _sign_in(self, headers: Mapping[str, str], end_of_stream: bool) -> Decision:
        """The unauthenticated sign-in endpoints: answered by `extproc.signin`."""
        assert self.gw.signin is not None
        self.signing_in = True
        method = headers.get(":method", "GET")
        length = headers.get("content-length", "0")
        limit = self.gw.signin.config.max_form_bytes
        if length.isdigit() and int(length) > limit:
            return self._answer(self.gw.signin.too_large(), "signin")
        if end_of_stream or not SignIn.needs_body(method, self.path):
            return await self._signed_in(b"")
        return CONTINUE

    async def _signed_in(self, body: bytes) -> Respond:
        assert self.gw.signin is not None
        method = self.headers.get(":method", "GET")
        answer = await self.gw.signin.handle(method, self.path, self.headers, body)
        return self._answer(answer, "signin")

    def _answer(self, answer: Respond, outcome: str) -> Respond:
        self.answer.status = answer.status
        self._finish(outcome)
        return answer

    def _classify(self, headers: Mapping[str, str]) -> None:
        clouds = self.gw.cloud_prefixes
        cloud = cloud_kind_of(self.path, clouds)
        if cloud is not None:  # refusals under a cloud prefix come in that cloud's shape
            self.dialect = dialect_of(cloud)
        self.route = classify(headers.get(":method", "GET"), self.path, headers, clouds)
        self.dialect = dialect_of(self.route.api)
        _check_header_size(headers)
        encoding.check_request_encoding(headers.get("content-encoding", ""))
        limit = self.gw.max_body_bytes
        length = headers.get("content-length", "0")
        if length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(
                f"request body is {length} bytes; the gateway accepts at most {limit} "
                "(limits.max_body_bytes)"
            )

    async def _after_request_headers(self, end_of_stream: bool) -> Decision:
        assert self.route is not None
        if self.route.endpoint is Endpoint.QUOTA:
            return await self._quota()
        if self.route.endpoint is Endpoint.MANAGED_SETTINGS:
            return self._managed_settings()
        if self.route.endpoint is Endpoint.OTLP and end_of_stream:
            return self._relay(b"")
        model_id = ""
        if self.route.endpoint is Endpoint.MODELS:
            # Before the body check: a GET with a body must not skip it.
            model_id = self.path.split("?", 1)[0].removeprefix("/v1/models").strip("/")
            if model_id and not self._model_policy().visible(model_id):
                raise NotFound(f"model {model_id!r} is not available to this caller")
        if not end_of_stream:
            return CONTINUE
        if self.route.method == "POST":
            raise BadRequest("request body is empty; send a JSON object", reason="invalid_json")
        listing = self.route.endpoint is Endpoint.MODELS and not model_id
        if listing and self.dialect.pages_model_list:
            query = self.path.partition("?")[2]
            self.model_page = model_list.PageRequest.parse(query)
            self.upstream_path = f"/v1/models?{model_list.UPSTREAM_QUERY}"
        self._serve(self._choose_target(None))
        return await self._forward()

    async def _probe(self) -> Respond:
        """`/` and `/health` (liveness; `?deep=1` also pings the store): no provider call."""
        status, body = 200, {"status": "ok"}
        if "deep=1" in self.path.partition("?")[2].split("&"):
            try:
                await self.gw.store.ping()
                body["store"] = "ok"
            except StoreError as exc:
                log.warning("health: store unreachable: %s", exc)
                status, body = 503, {"status": "degraded", "store": "unreachable"}
        self.answer.status = status
        self._finish("probe")
        headers: tuple[tuple[str, str], ...] = (
            ("content-type", "application/json"),
            ("x-gateway-request-id", self.request_id),
        )
        if status != 200:
            headers += (("x-should-retry", "true"),)
        payload = b"" if self.headers.get(":method") == "HEAD" else orjson.dumps(body)
        return Respond(status, payload, headers, details="extproc_probe")

    def _inference_profiles(self) -> Respond:
        """Bedrock's ListInferenceProfiles, which Claude Code asks at start without any
        credential: the ids in `cloud_paths.inference_profiles` (config, not a secret)."""
        profiles = list(self.gw.config.cloud_paths.inference_profiles)
        headers = (("content-type", "application/json"), ("x-gateway-request-id", self.request_id))
        answer = Respond(200, inference_profiles_body(profiles), headers, "extproc_profiles")
        return self._answer(answer, "inference_profiles")

    async def _quota(self) -> Respond:
        try:
            report = await self.gw.spending.quota(self.identity, self.headers, self._payer())
        except StoreError as exc:
            raise Unavailable("the quota store is unreachable", reason="store_down") from exc
        self.answer.status = 200
        self._finish("quota")
        headers = (("content-type", "application/json"), ("x-gateway-request-id", self.request_id))
        return Respond(200, orjson.dumps(report), headers, details="extproc_quota")

    def _managed_settings(self) -> Respond:
        """Claude Code's managed settings for the caller's group (404: no policy)."""
        group = self.identity.labels.get("sso_group") if self.identity.source == "sso" else None
        policy = policy_named(self.gw.config.sso, group)
        settings = policy.settings if policy is not None else None
        answer = managed.answer(group or "", settings, self.headers.get("if-none-match"))
        return self._answer(answer, "managed_settings")

    def _relay(self, body: bytes) -> Respond:
        """Accept an OTLP export from Claude Code; stamp and forward it (or drop it)."""
        caller = self.identity.user or self.identity.caller
        relay = self.gw.otlp
        if relay is not None and caller is not None:
            attributes = {"enduser.id": caller}
            if "sso_group" in self.identity.labels:
                attributes["extproc.sso_group"] = self.identity.labels["sso_group"]
            try:
                path = self.path.split("?", 1)[0]
                relay.submit(path, self.headers.get("content-type", ""), body, attributes)
            except otlp.OtlpFormatError as exc:
                raise BadRequest(f"not an OTLP export: {exc}", reason="invalid_otlp") from exc
        headers = (("content-type", "application/json"), ("x-gateway-request-id", self.request_id))
        return self._answer(Respond(200, b"{}", headers, "extproc_otlp"), "otlp")

    def _choose_target(self, model: str | None) -> routing.Target:
        return target_for(self.gw.config, self.profile, model, self.dialect.name)

    def _serve(self, target: routing.Target, model: str | None = None) -> None:
        """The provider (and model) that serves the request: the first choice, or another
        one later (a fallback). Spend is settled at the price of what was served."""
        self.target = target
        translator = target.adapter.translator(self.dialect.name)
        self.translation = None  # a later choice (a fallback) may need none
        self.translator = None if translator is IDENTITY else self._bound(translator, target)
        if model is not None:
            spend = self.run_of(SpendRun) if self.served_model is not None else None
            if spend is not None:  # a later choice: settled at the served model's price
                self.gw.spending.serve(spend, model)
            self.served_model = model

    def _bound(self, translator: Translator | None, target: routing.Target) -> Translator | None:
        """This request's own translator (the route's settings, a fresh `Notes`)."""
        settings = self.profile.translation
        notes = self.chain_notes.get(target.name) or Notes(
            settings.lossy(), f"provider {target.name!r} ({target.provider.api} API)"
        )
        models_list = self.route is not None and self.route.endpoint is Endpoint.MODELS
        created = int(self.gw.wall_clock())
        caller_body = self.request.body if self.request is not None else None
        bound = bind(
            translator,
            settings,
            notes,
            models=models_list,
            created=created,
            caller_body=caller_body,
        )
        if bound is None:
            return translator
        self.translation = notes
        return bound

    async def _forward(self, body: bytes | None = None) -> Continue:
        """Send the request on to the chosen provider with its credential."""
        target = self.target
        assert target is not None
        if self.chain:
            return self._forward_chain(
                self.raw_body if self.decoded_request and body is None else body
            )
        adapter = target.adapter
        path = self.upstream_path or self.path
        if self.decoded_request and body is None:
            body = self.raw_body
        extra: tuple[tuple[str, str], ...] = ()
        if self.translator is not None and self.request is not None:
            whole = self.request.full_body()  # a heavy body's big values parsed now
            if self.translation is not None:
                note_beta_headers(self.dialect.name, self.headers, self.translation)
            if isinstance(self.translator, HeaderTranslator):
                extra = self.translator.request_headers(whole, self.headers)
            translated, path = self.translator.request(whole, path)
            translated, path = adapter.prepare(target.provider, translated, path, self.headers)
            body = orjson.dumps(translated)
        route = adapter.route(target.cluster, target.provider, path) + list(extra)
        if path != self.path and not target.provider.path_prefix:
            route.insert(0, (":path", path))
        auth = await self._authorize(target, route, body)
        changes = adapter.headers(route, auth)
        remove = list(changes.remove)
        if auth is None and self.identity.source != "anonymous":
            # A gateway key or an SSO token is ours, never the provider's.
            remove += ["x-api-key", "authorization"]
        if body is not None:
            remove.append("content-length")
        if self.decoded_request:
            remove.append("content-encoding")
        extra = self._trace_header()
        if self.translator is not None:
            add, drop = upstream_header_changes(self.dialect.name, target.provider.api)
            extra, remove = extra + add, [*remove, *drop]
        changes = HeaderChanges(set=changes.set + extra, remove=tuple(remove))
        self.forwarded = True
        return Continue(headers=changes, body=body, clear_route_cache=True)

    async def _authorize(
        self, target: routing.Target, route: list[tuple[str, str]], body: bytes | None
    ) -> tuple[tuple[str, str], ...] | None:
        """The held credential's headers for the request as it leaves (None: no held
        credential; the caller's own passes through)."""
        credential = self.gw.credentials.get(target.name)
        if credential is None:
            return None
        paths = [value for name, value in route if name == ":path"]
        request = UpstreamRequest(
            provider=target.name,
            method=self.headers.get(":method", "POST"),
            authority=_authority(target.provider),
            path=paths[-1] if paths else self.path,
            headers=self.headers,
            changes=tuple(route),
            removed=CALLER_AUTH,
            body=body if body is not None else self.raw_body,
        )
        try:
            return tuple(await credential.authorize(request))
        except CredentialMissing as exc:
            log.error("provider %s has no credential: %s", target.name, exc)
            raise Unavailable(
                f"provider {target.name!r} has no credential configured",
                reason="no_credential",
                retryable=False,
            ) from exc

    async def request_body(self, body: bytes, end_of_stream: bool) -> Decision:
        self._enter(Phase.REQUEST_BODY)
        try:
            if self.signing_in and self.outcome is None:
                return await self._signed_in(body)
            if self.outcome is not None or self.route is None:
                return CONTINUE
            return await self._on_request_body(body)
        except Exception as failure:  # every failure is answered at the boundary
            return self._refuse(failure)

    async def _on_request_body(self, body: bytes) -> Decision:
        assert self.route is not None
        limit = self.gw.max_body_bytes
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is over {limit} bytes (limits.max_body_bytes)")
        if self.route.endpoint is Endpoint.OTLP:
            return self._relay(body)
        if encoding.encodings(self.headers.get("content-encoding", "")):
            body = encoding.decode_body(body, self.headers["content-encoding"], limit)
            self.decoded_request = True
        self.raw_body = body
        if not body:
            raise BadRequest("request body is empty; send a JSON object", reason="invalid_json")
        self.request = request = self._as_dialect_reads(await self._parse(body))
        if request.model is None:  # no model to police: forwarded as it is
            self._serve(self._choose_target(None))
            return await self._forward()
        reply = await self._run_steps()
        if reply is not None:
            return self._send_reply(reply)
        if self.route.endpoint is Endpoint.COUNT_TOKENS and self.translation is not None:
            # An OpenAI provider has no count_tokens (counted as a request by spend).
            return self._count_locally(self.request, self.body_size)
        body_out = orjson.dumps(self.request.body) if self.body_changed else None
        return await self._forward(body=body_out)

    def _open_steps(self, *, early: bool, start: bool = False) -> None:
        """Open the policies of `STEPS` that act at the request headers (or the rest), in
        step order; each run is registered before it starts: a refusal is audited with it."""
        for policy in _split_steps(STEPS)[0 if early else 1]:
            run = policy.open(self)
            if run is None:
                continue
            self.runs.append(run)
            if early:  # auth and model policy, kept at hand
                if isinstance(run, AuthRun):
                    self._auth = run
                elif isinstance(run, ModelRun):
                    self._models = run
            if start:
                run.start(self)

    async def _run_steps(self) -> Reply | None:
        """The policy steps in their fixed order (`STEPS`) once the body is parsed: those
        opened at the headers start (the model policy chooses what is served), then each
        other that applies opens and starts (it may refuse or rewrite the body); then
        those with store I/O run it in the same order. A step may answer the request
        itself (a cache hit)."""
        for run in list(self.runs):
            run.start(self)
        self._open_steps(early=False, start=True)
        reply = None
        for run in self.runs:
            if run.waits:
                reply = await run.request(self, reply)
        return reply

    def run_of(self, kind: type[R]) -> R | None:
        """This request's run of a step, if that step opened."""
        for run in self.runs:
            if isinstance(run, kind):
                return run
        return None

    def serve_model(self, model: str) -> None:
        """The model policy serves the request with `model`: the route's fallback chain
        (a generating request) or its provider, and the request names the model; a
        generating request's output is capped and a stream asks for its usage (the
        provider's translator, bound here, reads the caller's own body first)."""
        assert self.route is not None
        assert self.request is not None
        if self.profile.fallback and self.route.endpoint.generates:
            self._plan_fallback(self.profile.fallback, model)
        else:
            self._serve(self._choose_target(model), model)
        if model != self.request.model:
            path = self.dialect.with_model(self.path, self.request.body, model)
            self.upstream_path = path if path != self.path else self.upstream_path
            self.body_changed = True
        if self.route.endpoint.generates and self._bound_spend(self.request):
            self.body_changed = True  # its cost made knowable before the other steps

    def replace_body(self, body: dict[str, Any]) -> None:
        """A step forwards `body` instead of the caller's."""
        assert self.request is not None
        self.request = dataclasses.replace(self.request, body=body)
        self.body_changed = True

    def _count_locally(self, request: ParsedRequest, size: int) -> Respond:
        """count_tokens for a provider of the other shape (which has no such endpoint):
        the gateway's own estimate, the one its budgets reserve with (the worker's, for a
        heavy body)."""
        worker = request.worker
        estimate = (
            worker.input_tokens
            if worker is not None
            else self.dialect.estimate_input_tokens(request.body, size)
        )
        headers = (
            ("content-type", "application/json"),
            ("x-gateway-request-id", self.request_id),
            ("x-gateway-estimate", "true"),
        )
        answer = Respond(200, orjson.dumps({"input_tokens": estimate}), headers, "extproc_count")
        return self._answer(answer, "ok")

    def _plan_fallback(self, chain: tuple[FallbackStep, ...], served: str) -> None:
        """Envoy tries the chain's providers in order (extproc.fallback); the first is the
        one served unless it fails. Each attempt translates the caller's body for its own
        provider, so every provider must have a translator from the caller's shape."""
        providers = self.gw.config.providers
        apis = [providers[s.provider].api for s in chain]
        missing = fallback.unreachable(self.dialect.name, apis)
        if missing:
            first = routing.Target(chain[0].provider, providers[chain[0].provider])
            raise BadRequest(
                f"this route falls back to {' and '.join(missing)} providers, which cannot "
                f"serve a {self.dialect.name} request; call " + first.adapter.dialect.generate_path,
                reason="wrong_api",
            )
        self.chain = chain
        self.alternatives = tuple(step.model or served for step in chain)
        first = routing.Target(chain[0].provider, providers[chain[0].provider])
        self._serve(first, chain[0].model or served)

    def _check_translations(self, body: Mapping[str, Any]) -> None:
        """The route's translation refusals, raised here in the caller's shape: each
        attempt at a provider of another shape translates the same body with them."""
        assert self.route is not None
        settings = self.profile.translation
        for step in self.chain:
            provider = self.gw.config.providers[step.provider]
            translator = routing.Target(step.provider, provider).adapter.translator(
                self.dialect.name
            )
            notes = Notes(settings.lossy(), f"provider {step.provider!r} ({provider.api} API)")
            bound = bind(translator, settings, notes, models=False, created=0)
            if bound is not None:
                bound.request(orjson.loads(orjson.dumps(body)), self.path)
                # What the answerer's attempt dropped goes in the audit record.
                self.chain_notes[step.provider] = notes

    def _forward_chain(self, body: bytes | None) -> Continue:
        """To the chain's composite cluster: each attempt's filter sets path and credential."""
        remove = ["x-api-key", "authorization"] if self.identity.source != "anonymous" else []
        if body is not None:
            remove.append("content-length")
        if self.decoded_request:
            remove.append("content-encoding")
        if self.request is not None:
            self._check_translations(self.request.body)
        changes = HeaderChanges(
            set=(
                (routing.ROUTING_HEADER, fallback.chain_cluster(self.chain)),
                (fallback.CLIENT_API_HEADER, self.dialect.name),
                (fallback.TRANSLATION_HEADER, self.profile.translation.model_dump_json()),
                ("accept-encoding", "identity"),
                *self._trace_header(),
            ),
            remove=tuple(remove),
        )
        self.forwarded = True
        return Continue(headers=changes, body=body, clear_route_cache=True)

    def _read_attempts(self, headers: Mapping[str, str]) -> None:
        """Which provider of the chain answered, after which failures (extproc.fallback)."""
        attempts = fallback.decode_attempts(headers.get(fallback.ATTEMPTS_HEADER, ""), self.chain)
        if not attempts:
            return
        self.attempts = attempts
        last = attempts[-1]
        for failed in attempts[:-1]:
            reason = fallback.fallback_reason(failed.status)
            self.gw.metrics.fallbacks.labels(self.route_name, failed.provider, reason).inc()
        # The answer is read (and translated, across shapes) as the answerer's.
        answerer = routing.Target(last.provider, self.gw.config.providers[last.provider])
        self._serve(answerer, last.model or self.served_model)

    def _as_dialect_reads(self, request: ParsedRequest) -> ParsedRequest:
        """The model and streaming as the dialect finds them (a URL-model dialect reads
        them from the path; for body dialects this changes nothing)."""
        assert self.route is not None
        model = self.dialect.request_model(self.path, request.model)
        stream = self.dialect.request_stream(self.path, request.stream)
        stream = stream and self.route.endpoint.generates
        if model == request.model and stream == request.stream:
            return request
        return dataclasses.replace(request, model=model, stream=stream)

    def _bound_spend(self, request: ParsedRequest) -> bool:
        """Make the request's cost knowable: its output capped at what the reservation
        covers, and a streamed answer carrying its usage. True if changed."""
        changed = self.dialect.cap_output(request.body, self.gw.config.limits.max_output_tokens)
        if request.stream:
            asked, self.usage_dropper = self.dialect.prepare_stream(request.body)
            changed = asked or changed
        return changed

    async def _parse(self, raw: bytes) -> ParsedRequest:
        """Parse the body; a heavy one is bounded and screened in the worker process first,
        so the event loop's share of any request stays small (extproc/offload.py)."""
        assert self.route is not None
        self.body_size = len(raw)
        limits = self.gw.config.limits
        bound = min(INLINE_VALUES, limits.max_json_values)
        if len(raw) <= OFFLOAD_BYTES and value_bound(raw, bound) <= bound:
            return self._parse_body(raw)
        if self.gw.offload is None:
            request = self._parse_body(raw)
            check_values(request.body, limits.max_json_values)
            return request
        guarded = self.gw.guard is not None and self.route.endpoint is not Endpoint.MODELS
        await self.extend(OFFLOAD_SECONDS)  # a queue of huge bodies may outlast message_timeout
        endpoint = self.route.endpoint
        in_body = self.dialect.model_in is ModelIn.BODY
        rules = tuple(self.profile.cache.normalize)
        job = Job(self.dialect.name, endpoint, in_body, self.profile.guard, guarded, limits, rules)
        job = dataclasses.replace(job, cloud=self.route.cloud)
        checked = await self.gw.offload.check(raw, job)
        self.inspection = checked.inspection
        assert checked.summary is not None
        return checked.summary.parsed()  # its big values stay serialized: never walked here

    def _parse_body(self, raw: bytes, *, check_keys: bool = True) -> ParsedRequest:
        """The body as a `ParsedRequest`; a cloud client's made canonical Messages (the
        URL's model and streaming in the body, so every step reads it unchanged)."""
        assert self.route is not None
        if self.route.cloud is not None:
            return parse_cloud_request(
                raw, self.route.endpoint, self.route.cloud, check_keys=check_keys
            )
        in_body = self.dialect.model_in is ModelIn.BODY
        return parse_request(raw, self.route.endpoint, check_keys=check_keys, model_in_body=in_body)

    def _payer(self) -> str | None:
        """The provider key an anonymous caller pays with: its own, passed through when
        the provider has no gateway-held credential. On the gateway's credential the key
        a caller sends means nothing, so it cannot name (or rotate) its rate-limit subject."""
        presented = self._presented()
        if presented is None:  # an identified caller: no provider to look up (a gateway
            return None  # serving only Bedrock has none for `/v1/gateway/quota`)
        target = self.target or self._choose_target(None)
        if target.name in self.gw.credentials:
            return None
        return presented

    def _presented(self) -> str | None:
        """The caller's own provider key, for anonymous pass-through callers."""
        return self.key if self.identity.source == "anonymous" else None

    # What a policy step asks of the request (`extproc.policies.step.Exchange`).

    def payer(self) -> str | None:
        return self._payer()

    def presented(self) -> str | None:
        return self._presented()

    # -- a step's reply -----------------------------------------------------------------

    def _send_reply(self, reply: Reply) -> Respond:
        """A step answered the request itself (a cache hit): the answer is screened like
        a fresh one, and sent in the caller's framing."""
        assert self.request is not None
        screened = self._screened(reply.answer)
        answer = screened if screened is not None else reply.answer
        if self.request.stream:
            content_type = _stream_content_type(self.dialect.framing)
            body = self.dialect.unfold(answer)
            if self.usage_dropper is not None:
                body = self.usage_dropper.feed(body) + self.usage_dropper.close()
        else:
            body, content_type = orjson.dumps(answer), "application/json"
        self._read_answer(answer)
        self.answer.status = 200
        self.answer.streamed = self.request.stream
        self._finish(reply.outcome)
        headers = (
            ("content-type", content_type),
            *reply.headers,
            ("x-gateway-request-id", self.request_id),
            *self._trace_header(),
        )
        return Respond(status=200, body=body, headers=headers, details=reply.details)

    def _screened(self, answer: dict[str, Any]) -> dict[str, Any] | None:
        """A complete JSON answer through every step's answer hook, in step order: the
        answer to send instead (None: unchanged); `AnswerWithheld` if a step withholds it."""
        changed = None
        for run in self.runs:
            replaced = run.answer(answer if changed is None else changed)
            if replaced is not None:
                changed = replaced
        return changed

    def _cacheable_answer(self) -> dict[str, Any] | None:
        """The answer to store: complete and successful, in its JSON form."""
        if self.answer.status != 200 or self.answer.error_type or self.outcome != "ok":
            return None
        if self.accumulator is not None:
            if not self.accumulator.complete:
                return None
            return self.accumulator.folded_message()
        return self.answer.json

    # -- response ----------------------------------------------------------------------

    async def response_headers(
        self, headers: dict[str, str], end_of_stream: bool, *, details: str = ""
    ) -> Decision:
        if self.phase is None:
            # Envoy answered before the request reached the gateway (`OPTIONS *` is
            # absolute_path_rejected): nothing of ours to check or account; pass it quietly.
            self._enter(Phase.LOCAL_REPLY)
            return CONTINUE
        self._enter(Phase.RESPONSE_HEADERS)
        if self.outcome is not None or self.route is None:
            return CONTINUE
        try:
            return self._on_response_headers(headers, end_of_stream, details)
        except Exception as failure:  # every failure is answered at the boundary
            return self._refuse(failure)

    def _on_response_headers(
        self, headers: dict[str, str], end_of_stream: bool, details: str
    ) -> Decision:
        status = headers.get(":status", "0")
        self.answer.status = int(status) if status.isdigit() else 0
        if self.chain:
            self._read_attempts(headers)
        if details in FIRST_BYTE_TIMEOUTS:
            seconds = self.gw.config.limits.first_byte_timeout_seconds
            raise GatewayTimeout(
                f"the provider sent nothing for {seconds:g} s "
                "(limits.first_byte_timeout_seconds); nothing was charged"
            )
        content_type = headers.get("content-type", "")
        label = headers.get("content-encoding", "")
        if not self._decode_answer(label):
            # An answer no policy could read never reaches the client.
            log.warning("provider answered with Content-Encoding %r; withheld", label[:64])
            raise _undecodable(
                f"the provider answered with Content-Encoding {label[:64]!r}, which the "
                "gateway cannot read, although it asked for identity"
            )
        drop: tuple[str, ...] = (fallback.ATTEMPTS_HEADER,) if self.chain else ()
        drop += ("content-encoding", "content-length") if self.answer_decoder else ()
        extra = HeaderChanges(set=self._response_headers(), remove=drop)
        if end_of_stream:
            self._finish(self._status_outcome())
            return Continue(headers=extra)
        framing = self._answer_framing(content_type)
        if framing is not None:
            self._start_stream()
            if self.translator is not None:  # the provider's stream, in the caller's shape
                self.transcoder = Transcoder(framing, self.translator, self.dialect.framing)
                extra = self._translated_headers(extra)
            if self.usage_dropper is not None:  # the body changes length
                extra = HeaderChanges(set=extra.set, remove=(*extra.remove, "content-length"))
            return Continue(headers=extra, response_body_mode=BodyMode.STREAMED)
        if content_type.startswith("application/json") and self._reads_json_answer():
            return Continue(headers=extra, response_body_mode=BodyMode.BUFFERED)
        self._finish(self._status_outcome())
        return Continue(headers=extra, response_body_mode=BodyMode.NONE)

    def _answer_framing(self, content_type: str) -> Framing | None:
        """The framing of a streamed answer (None: not a stream the gateway reads)."""
        if self.target is None:
            return framing_for(content_type)
        return self.target.adapter.answer_framing(content_type)

    def _translated_headers(self, extra: HeaderChanges) -> HeaderChanges:
        content_type = _stream_content_type(self.dialect.framing)
        return HeaderChanges(
            set=(*extra.set, ("content-type", content_type)),
            remove=(*extra.remove, "content-length"),
        )

    def _decode_answer(self, label: str) -> bool:
        """An answer compressed despite `accept-encoding: identity` is decoded before any
        policy reads it; False when the gateway cannot decode it."""
        codings = encoding.encodings(label)
        if not codings:
            return True
        if len(codings) != 1 or not encoding.is_decodable(label):
            return False
        limit = _ANSWER_DECODE_FACTOR * self.gw.config.limits.max_body_bytes
        self.answer_decoder = encoding.StreamDecoder(codings[0], limit)
        return True

    def _trace_header(self) -> tuple[tuple[str, str], ...]:
        """Our span as the `traceparent`: the provider's call and the client's view are its
        children."""
        return (("traceparent", self.trace.traceparent),) if self.trace is not None else ()

    def _response_headers(self) -> tuple[tuple[str, str], ...]:
        headers = (("x-gateway-request-id", self.request_id), *self._trace_header())
        for run in self.runs:
            headers += run.answer_headers()
        return headers

    def _reads_json_answer(self) -> bool:
        assert self.route is not None
        if self.route.endpoint.generates:
            return True
        # A model list is filtered down to what this caller may use (plus the names a
        # mapping serves), translated to the caller's shape, and paged here.
        return self.route.endpoint is Endpoint.MODELS

    def _start_stream(self) -> None:
        self.answer.streamed = True
        for run in self.runs:  # a step that rewrites the answer's texts (the guard)
            self.rewriter = run.rewriter()
            if self.rewriter is not None:
                break  # it parses the events itself
        if self.rewriter is None:
            self.sse = self.dialect.framing.parser()
        self.accumulator = self.dialect.accumulator()

    async def response_body(self, chunk: bytes, end_of_stream: bool) -> Decision:
        self._enter(Phase.RESPONSE_BODY)
        if self.withheld is not None:  # nothing of a refused answer passes
            if end_of_stream:
                self._finish("error")
            return Continue(body=self.withheld)
        if self.outcome is not None or self.route is None:
            return CONTINUE
        try:
            if self.answer_decoder is not None or self.transcoder is not None:
                return self._decoded_body(chunk, end_of_stream)
            return self._on_response_body(chunk, end_of_stream)
        except Exception as failure:  # every failure is answered at the boundary
            decision = self._refuse(failure)
            if end_of_stream:
                self._finish("error")
            return decision

    def _decoded_body(self, chunk: bytes, end_of_stream: bool) -> Decision:
        """Policy on the decoded (and translated) answer; the client gets those bytes."""
        plain = chunk
        try:
            if self.answer_decoder is not None:
                plain = self.answer_decoder.feed(chunk)
                plain += self.answer_decoder.close() if end_of_stream else b""
            if self.transcoder is not None:  # a broken event stream is undecodable too
                plain = self.transcoder.feed(plain, end_of_stream)
        except GatewayError as error:
            log.warning("provider answer could not be decoded: %s", error.message)
            self.withheld = b""  # and the rest of it is dropped too
            raise _undecodable(f"the provider's answer {error.message}") from error
        decision = self._on_response_body(plain, end_of_stream)
        if isinstance(decision, Continue) and decision.body is None:
            return dataclasses.replace(decision, body=plain)
        return decision

    def _on_response_body(self, chunk: bytes, end_of_stream: bool) -> Decision:
        decision: Decision = CONTINUE
        if self.rewriter is not None:
            decision = self._rewrite_stream(chunk, end_of_stream)
        elif self.sse is not None:
            self._feed_stream(chunk, end_of_stream)
            if self.usage_dropper is not None:
                decision = Continue(body=chunk)
        else:
            self.json_chunks.append(chunk)
            if end_of_stream:
                decision = self._read_json(b"".join(self.json_chunks))
        if self.usage_dropper is not None and self.answer.streamed:
            decision = self._drop_usage_chunk(decision, end_of_stream)
        if end_of_stream:
            if self.answer.streamed:
                for run in self.runs:
                    run.stream_end(self.accumulator)
            self._finish(self._status_outcome())
        return decision

    def _drop_usage_chunk(self, decision: Decision, end_of_stream: bool) -> Decision:
        """The gateway asked for usage; a client that did not gets no usage-only chunk."""
        assert self.usage_dropper is not None
        if not isinstance(decision, Continue) or decision.body is None:
            return decision
        out = self.usage_dropper.feed(decision.body)
        if end_of_stream:
            out += self.usage_dropper.close()
        return dataclasses.replace(decision, body=out)

    def _rewrite_stream(self, chunk: bytes, end_of_stream: bool) -> Continue:
        """Screen (and unmask) the answer's text; account for what the client receives."""
        assert self.rewriter is not None
        out = self.rewriter.feed(chunk)
        if end_of_stream:
            out += self.rewriter.close()
        sent = self.rewriter.sent
        self._account_events(sent[self.rewritten_events :])
        self.rewritten_events = len(sent)
        if self.rewriter.stopped is not None:
            self.answer.error_type = "output_blocked"
        return Continue(body=out)

    def _feed_stream(self, chunk: bytes, end_of_stream: bool) -> None:
        assert self.sse is not None
        events = self.sse.feed(chunk)
        if end_of_stream:
            events += self.sse.close()
        self._account_events(events)

    def _account_events(self, events: list[SseEvent]) -> None:
        assert self.accumulator is not None
        accumulator = self.accumulator
        for event in events:
            accumulator.feed(event)
        if self.answer.first_token_at is None and accumulator.first_content_seen:
            self.answer.first_token_at = self.gw.clock()
        self.answer.usage = accumulator.usage
        self.answer.served_model = accumulator.model
        if accumulator.error is not None:
            self.answer.error_type = str(accumulator.error.get("type", "error"))

    def _read_json(self, raw: bytes) -> Continue:
        if self.translator is None:
            return self._read_json_body(raw)
        raw = self._translate_json(raw)
        decision = self._read_json_body(raw)
        if decision.body is not None:
            return decision
        return Continue(body=raw, headers=HeaderChanges(remove=("content-length",)))

    def _translate_json(self, raw: bytes) -> bytes:
        """The provider's JSON answer (or error) in the caller's shape."""
        assert self.translator is not None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return raw
        if not isinstance(body, dict):
            return raw
        return orjson.dumps(self.translator.answer(body, self.answer.status))

    def _read_json_body(self, raw: bytes) -> Continue:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("provider answered with invalid JSON (%d bytes)", len(raw))
            return CONTINUE
        if not isinstance(body, dict):
            return CONTINUE
        assert self.route is not None
        if self.route.endpoint is Endpoint.MODELS:
            return self._filter_models(body)
        if self.runs and self.answer.status == 200:
            return self._answer_json(body)
        self._read_answer(body)
        return CONTINUE

    def _answer_json(self, body: dict[str, Any]) -> Continue:
        """A complete fresh answer through the steps' answer hooks (output screening)."""
        try:
            replaced = self._screened(body)
        except AnswerWithheld:
            self._read_answer(body)  # a withheld answer is still accounted (and billed)
            raise
        self._read_answer(replaced or body)
        if replaced is None:
            return CONTINUE
        return Continue(
            body=orjson.dumps(replaced), headers=HeaderChanges(remove=("content-length",))
        )

    def _filter_models(self, body: dict[str, Any]) -> Continue:
        listed = body.get("data")
        if self.answer.status != 200 or not isinstance(listed, list):
            return CONTINUE
        policy = self._model_policy()
        mapped = policy.mapped_names(self)
        ids = {m.get("id") for m in listed if isinstance(m, dict)}
        listed += [listed_entry(self.dialect.name, name) for name in mapped if name not in ids]

        def shown(model_id: str) -> bool:
            return model_id in mapped or policy.visible(model_id)

        if self.model_page is not None:
            paged = model_list.page(listed, self.model_page, shown)
            return Continue(
                body=orjson.dumps(paged), headers=HeaderChanges(remove=("content-length",))
            )
        body["data"] = [m for m in listed if isinstance(m, dict) and shown(str(m.get("id")))]
        if "first_id" in body:
            body["first_id"] = body["data"][0]["id"] if body["data"] else None
            body["last_id"] = body["data"][-1]["id"] if body["data"] else None
        return Continue(body=orjson.dumps(body), headers=HeaderChanges(remove=("content-length",)))

    def _read_answer(self, body: dict[str, Any]) -> None:
        self.answer.usage = self.dialect.usage(body)
        self.answer.finish_reasons = self.dialect.finish_reasons(body)
        model = body.get("model")
        self.answer.served_model = model if isinstance(model, str) else None
        error = body.get("error")
        if isinstance(error, dict):
            self.answer.error_type = str(error.get("type") or error.get("code") or "error")
        if self.gw.records_text(self.profile):
            self.answer.completion = self.dialect.completion(body)
        self.answer.json = body  # the answer a step may keep (the cache stores it)

    def _status_outcome(self) -> str:
        status = self.answer.status
        if not 200 <= status < 400:
            return "provider_error"
        if self.answer.error_type:
            return "error"
        if self.accumulator is not None and not self.accumulator.complete:
            return "truncated"  # the provider ended the body without its final event
        return "ok"

    # -- end ---------------------------------------------------------------------------

    async def close(self, *, cancelled: bool = False) -> None:
        """The gRPC stream ended: settle and account for the request, however it ended.

        `cancelled`: Envoy reset the gRPC stream rather than ending it.

        This runs after the last reply was written, so storing the answer, settling the
        budget and writing the audit record never delay the response."""
        first = "none" if self.phase in _NOT_STARTED else "request_headers"
        if not self.settled:
            self.gw.metrics.child(self.gw.metrics.streams, first).inc()
        if self.outcome is None and self.phase not in _NOT_STARTED:
            self._finish(_cut_short_outcome(self.answer.status, cancelled))
        if self.chain:
            self.gw.attempts.drop(self.request_id)
        if self.outcome is None or self.settled:
            return
        self.settled = True
        ending = self._ending(self.outcome)
        for run in self.runs:  # in step order: the cache stores, spend settles
            if run.closes:
                await run.close(ending)
        account(self, self.finished_at)

    def _ending(self, outcome: str) -> Ending:
        """How the request ended, for the steps that close: the answer to store (made
        when a step asks for it) and what is billed (an estimate, recorded as such, when
        the final usage never came)."""
        billable = self.answer.usage
        spend = self.run_of(SpendRun)
        if spend is not None:
            billable = self._billable_usage(outcome, spend.estimate_tokens)
            # `is` first: usually the very same value, and Usage's __eq__ builds tuples.
            changed = billable is not self.answer.usage and billable != self.answer.usage
            if changed and outcome != "cache_hit":
                self.answer.usage, self.answer.usage_estimated = billable, True
        return Ending(outcome, self.dialect.name, self._cacheable_answer, billable)

    # -- audit -------------------------------------------------------------------------

    def _steps(self) -> list[Step]:
        """The policy steps that opened, in their fixed order (auth first)."""
        return list(self.runs)

    def audit_values(self, now: float) -> tuple[dict[str, Any], list[Step], Done, dict[str, Any]]:
        """What the audit record is built from: the request's own facts, the steps that
        ran, how it ended, and the recorded text (empty unless the profile records it)."""
        answer, request = self.answer, self.request
        usage = answer.usage
        started_wall = self.gw.wall_clock() - (now - self.started)
        facts: dict[str, Any] = {
            "time": record_time(started_wall),
            "request_id": self.request_id,
            "route": self.route_name,
            "api": self.dialect.name,
            "endpoint": self.route.endpoint.value if self.route else None,
            "path": self.path.split("?", 1)[0],
            "session_id": self.session_id,
            "agent_id": self.agent_id,
            "parent_agent_id": self.parent_agent_id,
            "provider": self.target.name if self.target else None,
            "requested_model": None,  # the model policy's field (its place in the record)
            "served_model": answer.served_model or self.served_model,
            "status": answer.status,
            "streamed": answer.streamed,
            "outcome": self.outcome,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cache_creation_input_tokens": usage.cache_creation_input_tokens,
            "cache_read_input_tokens": usage.cache_read_input_tokens,
            "cache_creation_1h_input_tokens": usage.cache_creation_1h_input_tokens,
            "web_search_requests": usage.web_search_requests,
            "latency_ms": _ms(now - self.started),
            "ttft_ms": _ms(answer.first_token_at - self.started) if answer.first_token_at else None,
            "finish_reasons": self._finish_reasons(),
        }
        if answer.error_type:
            facts["error_type"] = answer.error_type
        if self.attempts:  # every provider Envoy tried, in order (extproc.fallback)
            facts["attempts"] = [a.as_record() for a in self.attempts]
        if answer.usage_estimated:
            facts["usage_estimated"] = True
        if self.translation is not None and self.target is not None:
            facts["translation"] = {  # the provider spoke the other shape
                "provider_api": self.target.provider.api,
                "dropped": dict(self.translation.dropped),
            }
        text: dict[str, Any] = {}
        if request is not None and self.gw.records_text(self.profile):
            text["prompt"] = {
                k: request.body[k] for k in ("system", "messages") if k in request.body
            }
            text["completion"] = self._completion()
        return facts, self._steps(), Done(self.outcome or "", usage), text

    def _completion(self) -> Any:
        """The answer's content: the JSON body's, or the folded stream's when it completed."""
        if self.answer.completion is not None:
            return self.answer.completion
        accumulator = self.accumulator
        if accumulator is None or not accumulator.complete:
            return None
        return self.dialect.completion(accumulator.folded_message())

    def _finish_reasons(self) -> list[str]:
        """Why the model stopped: from the folded stream, or the JSON answer."""
        if self.accumulator is not None:
            return self.accumulator.finish_reasons()
        return self.answer.finish_reasons

    def _finish(self, outcome: str) -> None:
        """The request's outcome is known; the rest happens in `close`."""
        if self.outcome is not None:
            return
        self.outcome = outcome
        self.finished_at = self.gw.clock()
        self.gw.metrics.active_streams.dec()

    def _billable_usage(self, outcome: str, estimate: int) -> Usage:
        """What the request spent: nothing for a refusal or an uncharged cache hit."""
        if outcome.startswith("rejected_"):
            return Usage()
        if outcome == "cache_hit":
            return self.answer.usage if self.gw.config.cache.charge_budget_on_hit else Usage()
        if not self.forwarded:
            return self.answer.usage
        if self.answer.status == 0:
            # Gone before the provider answered: it may have read the prompt.
            return Usage(input_tokens=estimate)
        folder = self.accumulator
        if folder is not None and 200 <= self.answer.status < 300 and not folder.final_usage_seen:
            # A client gone mid-stream pays for what was streamed.
            return cut_short_usage(self.answer.usage, estimate, folder.content_bytes)
        if outcome in CUT_SHORT and not self.answer.usage.total_tokens:
            return Usage(input_tokens=estimate)  # a JSON answer cut before its body
        return self.answer.usage
