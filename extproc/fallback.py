"""Fallback across providers: one attempt per provider of a route's chain, tried by Envoy.

The mechanism (README "Fallback across providers" says why):

- Envoy routes a request of a profile with a `fallback` chain to a *composite cluster*
  (`envoy.clusters.composite`), whose sub-clusters are the chain's providers in order:
  attempt 1 goes to the first, the first retry to the second, and so on. The route's
  retry policy retries on connect failure, reset, 5xx, 429 and 529, at most once per
  provider, and Envoy retries only before response headers went downstream: never
  mid-stream. A sub-cluster whose host outlier detection ejected is skipped within
  the same attempt.
- The composite cluster carries an ext_proc *upstream* HTTP filter: Envoy runs it once
  per attempt, after the attempt's host was chosen, and sends the host's metadata
  (`xds.upstream_host_metadata`: the provider, its model, its position). `AttemptStream`
  adapts the request for that provider through its upstream adapter (translator, model,
  path, credential) and, on the answer's headers, reports every attempt so far to the
  gateway's own filter downstream in the `x-gateway-attempts` response header.
- Downstream, `RequestStream` reserved the budget once, at the dearest price of the
  chain; it reads that header, takes the provider that answered as the served one,
  settles at its price, audits every attempt and counts the fallbacks.

Everything here is plain values; `extproc.server` feeds an attempt's ext_proc messages
to `AttemptStream`, as it feeds the request's to `RequestStream`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.config import Config, FallbackStep
from extproc.credentials import CredentialMissing
from extproc.decisions import CONTINUE, Continue, Decision, HeaderChanges
from extproc.phases import Event, RequestBody, RequestHeaders, ResponseHeaders
from extproc.policies import routing
from extproc.upstream.adapter import CALLER_AUTH, ROUTING_HEADER
from extproc.upstream.credentials import CredentialProvider, UpstreamRequest
from extproc.upstream.translate import IDENTITY, Translator

log = logging.getLogger(__name__)

# gRPC initial metadata the per-attempt (upstream) ext_proc filter sends: marks its streams.
ATTEMPT_METADATA = "x-gateway-attempt"
# Response header the attempt filter sets for the gateway's downstream filter (removed
# before the client sees the answer): every attempt so far, as JSON.
ATTEMPTS_HEADER = "x-gateway-attempts"
# Request header the gateway's downstream filter sets on a chain's request: the client's
# API shape, so an attempt at a provider of another shape can pick its translator. The
# attempt filter removes it before the request leaves.
CLIENT_API_HEADER = "x-gateway-client-api"
# The host metadata namespace of a chain's sub-cluster endpoints (rendered by envoy_config).
HOST_NAMESPACE = "extproc"
CHAIN_PREFIX = "fallback_"
# Statuses after which the next provider is tried (Envoy's retry_on: 5xx covers 529).
RETRIABLE_STATUSES = (429, 529)
# Attempts the per-process log keeps for requests whose final attempt never came.
_LOG_SIZE = 4096


def chain_cluster(chain: Sequence[FallbackStep]) -> str:
    """The composite cluster's name: from the chain's content, so equal chains share it."""
    text = orjson.dumps([[s.provider, s.model] for s in chain])
    return CHAIN_PREFIX + hashlib.sha256(text).hexdigest()[:12]


def fallback_reason(status: int) -> str:
    """Why an attempt made Envoy try the next provider (a metrics label)."""
    if status == 0:
        return "unavailable"  # refused, reset, timed out, or ejected by outlier detection
    if status == 429:
        return "rate_limited"
    if status == 529:
        return "overloaded"
    return "server_error"


@dataclass(frozen=True, slots=True)
class Attempt:
    position: int  # in the chain, from 0
    provider: str
    model: str | None
    status: int  # 0: no response (connection refused or reset, timeout, skipped)
    latency_ms: float | None

    def as_record(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "status": self.status,
            "latency_ms": self.latency_ms,
        }


def encode_attempts(attempts: Sequence[Attempt]) -> str:
    rows = [[a.position, a.provider, a.model, a.status, a.latency_ms] for a in attempts]
    return orjson.dumps(rows).decode()


def decode_attempts(value: str, chain: Sequence[FallbackStep]) -> list[Attempt]:
    """The attempts the last attempt's filter reported, with the chain positions it never
    saw (a refused connection never reaches an upstream filter) filled in as status 0.
    Anything malformed yields no attempts: the header is ours, but bound the trust."""
    try:
        rows = orjson.loads(value)
        seen = {int(r[0]): Attempt(int(r[0]), str(r[1]), r[2], int(r[3]), r[4]) for r in rows}
    except (orjson.JSONDecodeError, TypeError, ValueError, IndexError, KeyError):
        return []
    if not seen or max(seen) >= len(chain):
        return []
    last = max(seen)
    return [
        seen.get(i) or Attempt(i, chain[i].provider, chain[i].model, 0, None)
        for i in range(last + 1)
    ]


class AttemptLog:
    """The attempts of requests in flight in this process, by request id (bounded).

    An attempt's filter stream ends before the next attempt's starts; this carries the
    earlier attempts to the one whose answer reaches the client. Envoy sends all of a
    request's ext_proc streams over the same connection in practice; in a process that
    did not see the earlier attempts they are reported as unseen (status 0)."""

    def __init__(self, size: int = _LOG_SIZE) -> None:
        self._size = size
        self._attempts: OrderedDict[str, list[Attempt]] = OrderedDict()

    def add(self, request_id: str, attempt: Attempt) -> list[Attempt]:
        attempts = self._attempts.pop(request_id, [])
        attempts = [a for a in attempts if a.position != attempt.position] + [attempt]
        self._attempts[request_id] = attempts
        while len(self._attempts) > self._size:
            self._attempts.popitem(last=False)
        return sorted(attempts, key=lambda a: a.position)

    def drop(self, request_id: str) -> None:
        self._attempts.pop(request_id, None)


def host_step(metadata: Mapping[str, Any]) -> tuple[int, FallbackStep] | None:
    """The chain position and step of the host an attempt goes to (its endpoint metadata)."""
    provider, position = metadata.get("provider"), metadata.get("position")
    if not isinstance(provider, str) or not isinstance(position, int | float):
        return None
    model = metadata.get("model")
    return int(position), FallbackStep(provider=provider, model=model or None)


Clock = Callable[[], float]


class AttemptStream:
    """One attempt of a fallback chain, as its upstream ext_proc filter sees it.

    The request is adapted for the attempt's provider by that provider's upstream
    adapter, as `RequestStream._forward` does for a single provider: the translator
    between the caller's dialect and the provider's (`extproc.upstream.translate`; none
    for the same shape), the served model in the provider's dialect, the path, and the
    credential, which signs the body as it leaves (so it is applied to the body phase)."""

    def __init__(
        self,
        config: Config,
        credentials: Mapping[str, CredentialProvider],
        attempts: AttemptLog,
        clock: Clock = time.monotonic,
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.attempts = attempts
        self.clock = clock
        self.started = clock()
        self.request_id = ""
        self.headers: Mapping[str, str] = {}
        self.position = -1
        self.step: FallbackStep | None = None
        self.target: routing.Target | None = None
        self.translator: Translator | None = None
        self.answered = False

    async def handle(self, event: Event, host: Mapping[str, Any]) -> Decision:
        """One ext_proc message of the attempt (`host`: its upstream host's metadata)."""
        if isinstance(event, RequestHeaders):
            return self.request_headers(event.headers, host)
        if isinstance(event, RequestBody):
            return await self.request_body(event.body)
        if isinstance(event, ResponseHeaders):
            return self.response_headers(event.headers)
        return CONTINUE

    def request_headers(self, headers: Mapping[str, str], host: Mapping[str, Any]) -> Decision:
        """Which provider this attempt goes to; its changes come with the body."""
        self.request_id = headers.get("x-request-id", "")
        self.headers = headers
        found = host_step(host)
        if found is None or found[1].provider not in self.config.providers:
            log.error("fallback attempt without chain metadata on its host: %r", dict(host))
            return CONTINUE
        self.position, self.step = found
        self.target = routing.Target(self.step.provider, self.config.providers[self.step.provider])
        client = headers.get(CLIENT_API_HEADER, self.target.provider.api)
        translator = self.target.adapter.translator(client)  # type: ignore[arg-type]
        self.translator = None if translator is IDENTITY else translator
        return CONTINUE

    async def request_body(self, body: bytes) -> Decision:
        """The request as this provider takes it: body, path and credential."""
        if self.target is None or self.step is None:
            return CONTINUE
        path = self.headers.get(":path", "/")
        sent, path = self._adapt(body, path)
        adapter, provider = self.target.adapter, self.target.provider
        route = [kv for kv in adapter.route("", provider, path) if kv[0] != ROUTING_HEADER]
        if path != self.headers.get(":path") and not provider.path_prefix:
            route.insert(0, (":path", path))
        auth = await self._authorize(route, sent if sent is not None else body)
        changes = adapter.headers(route, auth)
        remove = (*changes.remove, CLIENT_API_HEADER)
        if sent is not None:
            remove += ("content-length",)
        if auth is None and self.position > 0:
            # A caller's own key was meant for the first provider, not this one.
            remove += ("x-api-key", "authorization")
        return Continue(headers=HeaderChanges(set=changes.set, remove=remove), body=sent)

    def _adapt(self, body: bytes, path: str) -> tuple[bytes | None, str]:
        """The translated body with the step's model (None: unchanged), and the path."""
        assert self.target is not None
        assert self.step is not None
        if self.step.model is None and self.translator is None:
            return None, path
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None, path  # the gateway's own filter parsed it; nothing to adapt
        if not isinstance(parsed, dict):
            return None, path
        if self.translator is not None:
            parsed, path = self.translator.request(parsed, path)
        if self.step.model is not None:
            path = self.target.adapter.dialect.with_model(path, parsed, self.step.model)
        return orjson.dumps(parsed), path

    async def _authorize(
        self, route: list[tuple[str, str]], body: bytes
    ) -> tuple[tuple[str, str], ...] | None:
        assert self.target is not None
        credential = self.credentials.get(self.target.name)
        if credential is None:
            return None  # the caller's own key goes through, to the first provider only
        paths = [value for name, value in route if name == ":path"]
        request = UpstreamRequest(
            provider=self.target.name,
            method=self.headers.get(":method", "POST"),
            authority=self.target.provider.authority,
            path=paths[-1] if paths else self.headers.get(":path", "/"),
            headers=self.headers,
            changes=tuple(route),
            removed=CALLER_AUTH,
            body=body,
        )
        try:
            return tuple(await credential.authorize(request))
        except CredentialMissing as exc:
            # The provider refuses the attempt (401): not retried, the caller sees it.
            log.error("provider %s has no credential: %s", self.target.name, exc)
            return None

    def response_headers(self, headers: Mapping[str, str]) -> Decision:
        """Log this attempt; report all of them to the gateway's downstream filter."""
        status = headers.get(":status", "0")
        attempts = self._record(int(status) if status.isdigit() else 0)
        if not attempts:
            return CONTINUE
        return Continue(headers=HeaderChanges(set=((ATTEMPTS_HEADER, encode_attempts(attempts)),)))

    def close(self) -> None:
        """The attempt's stream ended: one that got no answer was reset or timed out."""
        if not self.answered:
            self._record(0)

    def _record(self, status: int) -> list[Attempt]:
        self.answered = True
        if self.step is None or not self.request_id:
            return []
        latency = round((self.clock() - self.started) * 1000, 3)
        attempt = Attempt(self.position, self.step.provider, self.step.model, status, latency)
        return self.attempts.add(self.request_id, attempt)
