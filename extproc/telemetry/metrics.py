"""Prometheus metrics. One `Metrics` object per process, passed in (never a global).

Label values are bounded: model names and pipeline scopes pass through
`LabelBounds` (names the config declares, else `other`; telemetry/labels.py),
providers, teams and rules come from the config, reasons from `GatewayError.reason`.
With `--workers N` the supervisor serves every worker's metrics through
prometheus_client's multiprocess mode (see `extproc.server`).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from extproc.apis.usage import Usage
from extproc.telemetry.labels import LabelBounds

# Distinct ids a scope kind may label per process; further ids are counted as `other`, so
# a client-chosen value (a pipeline header) cannot grow the series without bound.
SCOPE_IDS_PER_KIND = 500

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60)


M = TypeVar("M", Counter, Gauge, Histogram)


class _Plain:
    """A metric value as a plain float, for metrics only the event loop thread updates.

    prometheus_client's in-process value (`MutexValue`) takes a lock on every update and
    read so that threads may share it; that lock and the two checks around it cost more
    than the update itself, about 18 times per request. A gateway process runs one event
    loop thread (`--workers` are separate processes), and the metrics built on this
    class (`_Counter`, `_Histogram`, `_Gauge` below) are updated only from it, on the
    request path; the scrape thread only reads, and reading a float attribute is atomic
    under the GIL. (A metric another thread updates, such as `otel_dropped`, stays a
    plain prometheus_client one.)
    """

    __slots__ = ("_exemplar", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self._exemplar: Any = None

    def inc(self, amount: float) -> None:
        self.value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.value = value

    def get(self) -> float:
        return self.value

    def set_exemplar(self, exemplar: Any) -> None:
        self._exemplar = exemplar

    def get_exemplar(self) -> Any:
        return self._exemplar


class LoopCounter(Counter):
    """A Counter whose children keep a `_Plain` value: the same samples on /metrics
    (prometheus_client's own collect), without a lock per update."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._value = _Plain()

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if amount < 0 or exemplar:  # prometheus_client's refusal, or its exemplar path
            super().inc(amount, exemplar)
            return
        self._value.value += amount


class LoopHistogram(Histogram):
    """A Histogram whose children keep `_Plain` values (see `LoopCounter`)."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._sum = _Plain()
        self._buckets = [_Plain() for _ in self._buckets]

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar:
            super().observe(amount, exemplar)
            return
        self._sum.value += amount
        # The first bucket whose bound is >= amount, as prometheus_client's linear scan
        # finds it; the last bound is +Inf, and a NaN (no bound holds it) counts in none.
        bucket = bisect_left(self._upper_bounds, amount)
        if amount <= self._upper_bounds[bucket]:
            self._buckets[bucket].value += 1


class LoopGauge(Gauge):
    """A Gauge whose children keep a `_Plain` value (see `LoopCounter`)."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._value = _Plain()

    def inc(self, amount: float = 1) -> None:
        if self._is_most_recent:  # prometheus_client's refusal
            super().inc(amount)
            return
        self._value.value += amount

    def dec(self, amount: float = 1) -> None:
        if self._is_most_recent:
            super().dec(amount)
            return
        self._value.value -= amount

    def set(self, value: float) -> None:
        # (A `mostrecent` gauge's timestamp only matters to the multiprocess files.)
        self._value.value = float(value)


# Plain values only where prometheus_client itself keeps values in this process's
# memory; in multiprocess mode (`--workers`) its values live in shared files.
_IN_PROCESS = values.ValueClass is values.MutexValue
_Counter = LoopCounter if _IN_PROCESS else Counter
_Histogram = LoopHistogram if _IN_PROCESS else Histogram
_Gauge = LoopGauge if _IN_PROCESS else Gauge


def _by_type(usage: Usage) -> tuple[tuple[str, int], ...]:
    return (
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_creation", usage.cache_creation_input_tokens),
        ("cache_read", usage.cache_read_input_tokens),
    )


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.bounds = LabelBounds()  # set from the config by Gateway.from_config
        r = self.registry
        self.requests = _Counter(
            "extproc_requests",
            "Requests handled, by API, endpoint, served model, provider, status and outcome.",
            ["api", "endpoint", "model", "provider", "status", "outcome"],
            registry=r,
        )
        self.tokens = _Counter(
            "extproc_tokens",
            "Tokens reported by providers, by served model and type.",
            ["model", "provider", "type"],
            registry=r,
        )
        self.latency = _Histogram(
            "extproc_request_duration_seconds",
            "Time from request headers to the end of the response.",
            ["api", "endpoint", "streamed"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = _Histogram(
            "extproc_time_to_first_token_seconds",
            "Time from request headers to the first content event of a streamed answer.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.active_streams = _Gauge(
            "extproc_active_streams",
            "ext_proc streams (HTTP requests) in progress.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.streams = _Counter(
            "extproc_streams",
            "ext_proc streams Envoy opened, by the first phase the server read: request_headers"
            " (audited), or none (cancelled before its first message: only Envoy's access log"
            " has it; see extproc reconcile).",
            ["first_phase"],
            registry=r,
        )
        self.gateway_errors = Counter(
            "extproc_gateway_errors",
            "Requests the gateway rejected or failed itself, by reason.",
            ["reason"],
            registry=r,
        )
        self.cache = _Counter(
            "extproc_cache_requests",
            "Cache-enabled requests by result: hit, miss, bypass, wait_timeout.",
            ["result"],
            registry=r,
        )
        self.cache_saved_tokens = _Counter(
            "extproc_cache_saved_tokens",
            "Tokens a cache hit did not spend, by model and type.",
            ["model", "type"],
            registry=r,
        )
        self.cache_volatile = Counter(
            "extproc_cache_volatile_misses",
            "Misses that differ from a recent request of the caller only in volatile values.",
            registry=r,
        )
        self.spend = _Counter(
            "extproc_spend_usd",
            "Settled spend in USD, by served model, team and project.",
            ["model", "team", "project"],
            registry=r,
        )
        self.budget_remaining = _Gauge(
            "extproc_budget_remaining",
            "What a budget had left at its last reservation (USD or tokens).",
            ["budget", "scope", "metric"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.store_errors = Counter(
            "extproc_store_errors",
            "Store failures on the request path, by operation (admit_fail_open: let through).",
            ["operation"],
            registry=r,
        )
        self.guard = Counter(
            "extproc_guard_findings",
            "Guard findings by direction (input, injection, output), rule and action.",
            ["direction", "rule", "action"],
            registry=r,
        )
        self.scope_spend = _Counter(
            "extproc_scope_spend_usd",
            "Settled spend in USD per budget scope (key, user, team, project, pipeline).",
            ["scope", "id"],
            registry=r,
        )
        self.scope_tokens = _Counter(
            "extproc_scope_tokens",
            "Tokens reported by providers per budget scope and type (input, output, cache_*).",
            ["scope", "id", "type"],
            registry=r,
        )
        self.cache_saved_usd = _Counter(
            "extproc_cache_saved_usd",
            "What cache hits did not spend, in USD, by served model.",
            ["model"],
            registry=r,
        )
        self._scope_ids: dict[str, set[str]] = {}
        # Label children already made: `labels()` takes a lock and checks its values on
        # every call; the children live as long as their metric does anyway.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self.otel_dropped = Counter(
            "extproc_otel_dropped",
            "Requests left out of OpenTelemetry because its recording queue was full.",
            registry=r,
        )
        self.fallbacks = Counter(
            "extproc_fallbacks",
            "Attempts after which Envoy tried the next provider of a fallback chain, by Envoy"
            " route, the provider that failed and why (unavailable, rate_limited, overloaded,"
            " server_error).",
            ["route", "provider", "reason"],
            registry=r,
        )
        self.model_mapping = _Counter(
            "extproc_model_routing",
            "Requested model to served model and provider.",
            ["requested", "served", "provider"],
            registry=r,
        )
        self.subagent_requests = _Counter(
            "extproc_subagent_requests",
            "Model calls made by Claude Code subagents (x-claude-code-agent-id present).",
            ["endpoint"],
            registry=r,
        )

    def child(self, metric: M, *labels: str) -> M:
        """`metric.labels(*labels)`, made once per distinct label values."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def count_tokens(self, model: str, provider: str, usage: Usage, *, saved: bool = False) -> None:
        for kind, value in _by_type(usage):
            if not value:
                continue
            if saved:
                self.child(self.cache_saved_tokens, model, kind).inc(value)
            else:
                self.child(self.tokens, model, provider, kind).inc(value)

    def scope_id(self, kind: str, value: str) -> str:
        """`value` as a label, or `other` once this kind has SCOPE_IDS_PER_KIND ids."""
        seen = self._scope_ids.setdefault(kind, set())
        if value in seen:
            return value
        if len(seen) >= SCOPE_IDS_PER_KIND:
            return "other"
        seen.add(value)
        return value

    def count_scopes(self, scopes: dict[str, str], usage: Usage, cost_usd: float | None) -> None:
        """Spend and tokens per scope of one settled request."""
        for kind, value in scopes.items():
            label = self.scope_id(kind, self.bounds.scope_id(kind, value))
            if cost_usd:
                self.child(self.scope_spend, kind, label).inc(cost_usd)
            for token_type, count in _by_type(usage):
                if count:
                    self.child(self.scope_tokens, kind, label, token_type).inc(count)
