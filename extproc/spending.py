"""Budgets and rate limits on the request path: admit, then settle.

Per request (`SpendRun`):

1. before the provider call, one store round trip decides the rate limits
   (requests/min, tokens/min per key and team, the tier's daily quota) and
   reserves the budget estimate on every scope (key, user, team, project,
   pipeline) all or nothing: `admit`. A cache hit only counts against the rate
   limits (`admit_hit`) unless `cache.charge_budget_on_hit` is set;
2. when the response ends, however it ends, the reservation is settled to the
   actual cost of the usage seen (a client gone mid-stream pays for what was
   streamed; a failed call pays nothing) and the token rate limit is corrected
   by the difference from the estimate: `settle`.

The estimate is an upper bound: input tokens from the body (a third of its
bytes, images and documents counted at a fixed size instead of their base64),
plus `max_tokens` capped by `limits.max_output_tokens`, priced at the dearest
input rate. Refusals are 429s that say which limit, what is left and when it
resets. A store outage fails closed for budgets (503) and open for rate limits
unless configured otherwise; a settle that cannot reach the store is logged
and counted, and its hold expires by itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from extproc.apis.usage import Usage
from extproc.config import Config
from extproc.errors import BadRequest, Forbidden, RateLimited, Unavailable
from extproc.policies.auth import Identity
from extproc.policies.budget import (
    Amount,
    BudgetCheck,
    BudgetLedger,
    BudgetStatus,
    Denied,
    Reservation,
    Scope,
)
from extproc.policies.pricing import (
    Price,
    PriceTable,
    UnknownModel,
    cost_micros,
    estimate_micros,
    micros_to_usd,
)
from extproc.policies.ratelimit import RateDecision, RateLimiter, RateSubject, UnknownTier
from extproc.store import Store, StoreError, StoreUnavailable
from extproc.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

IMAGE_TOKENS = 1600  # a full-size image; documents are charged like their text
_BYTES_PER_TOKEN = 3


def estimate_input_tokens(body: Mapping[str, Any], size: int) -> int:
    """An over-estimate of the input tokens of a request body of `size` bytes."""
    images, blob_bytes = 0, 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            source = block.get("source") if isinstance(block, dict) else None
            data = source.get("data") if isinstance(source, dict) else None
            if isinstance(data, str) and block.get("type") == "image":
                images, blob_bytes = images + 1, blob_bytes + len(data)
    return max(1, (size - blob_bytes) // _BYTES_PER_TOKEN + images * IMAGE_TOKENS)


def requested_output(body: Mapping[str, Any], cap: int) -> int:
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and value > 0:
            return min(value, cap)
    return cap


def scopes_of(identity: Identity, headers: Mapping[str, str], pipeline_header: str) -> list[Scope]:
    scopes = [Scope(kind, value) for kind, value in identity.scopes().items() if value]  # type: ignore[arg-type]
    pipeline = headers.get(pipeline_header, "").strip()
    if pipeline:
        scopes.append(Scope("pipeline", pipeline[:256]))
    return scopes


def subject_of(identity: Identity, presented: str | None) -> RateSubject | None:
    """Who the rate limits count: the key, else the SSO user, else an anonymous key's hash."""
    if identity.key_id:
        ident = identity.key_id
    elif identity.user:
        ident = f"user={identity.user}"
    elif presented:
        ident = "anon=" + hashlib.sha256(presented.encode()).hexdigest()[:16]
    else:
        return None
    return RateSubject(ident, identity.team, identity.tier)


def _reset_iso(seconds_from_now: float, now: float) -> str:
    moment = dt.datetime.fromtimestamp(now + seconds_from_now, dt.UTC)
    return moment.isoformat(timespec="seconds")


def rate_refusal(decision: RateDecision, now: float) -> RateLimited:
    binding = decision.binding
    assert binding is not None
    quota = binding.name.endswith("per_day")
    what = "daily request quota" if quota else f"rate limit {binding.name}"
    headers = (
        ("retry-after", decision.retry_after_header),
        ("x-gateway-limit", binding.name),
        ("x-gateway-limit-limit", str(binding.limit)),
        ("x-gateway-limit-remaining", str(binding.remaining)),
        ("x-gateway-limit-reset", _reset_iso(binding.reset_after, now)),
    )
    return RateLimited(
        f"{what} exhausted ({binding.limit}); retry after {decision.retry_after_header} s",
        reason="quota_exhausted" if quota else "rate_limited",
        headers=headers,
        # A daily quota comes back tomorrow, not within an SDK's backoff.
        retryable=not quota,
    )


def budget_refusal(denied: Denied) -> RateLimited:
    headers: tuple[tuple[str, str], ...] = (
        ("x-gateway-budget", denied.budget),
        ("x-gateway-budget-remaining", _amount(denied.metric, denied.remaining)),
    )
    if denied.retry_after is not None:
        headers += (
            ("retry-after", str(denied.retry_after)),
            ("x-gateway-budget-reset", _reset_iso(denied.resets_at or 0, 0)),
        )
    return RateLimited(
        denied.message(), reason="budget_exhausted", headers=headers, retryable=False
    )


def _amount(metric: str, value: int) -> str:
    return f"{micros_to_usd(value):.6f}" if metric == "usd" else str(value)


@dataclass
class SpendRun:
    """One request's budget and rate-limit state, from admission to settlement."""

    request_id: str
    model: str
    subject: RateSubject | None
    checks: Sequence[BudgetCheck]
    price: Price | None
    scopes: list[Scope]
    estimate_tokens: int = 0
    reservation: Reservation | None = None
    admitted_tokens: int = 0
    cost_usd: Decimal | None = None
    statuses: tuple[BudgetStatus, ...] = field(default_factory=tuple)


class Spending:
    """Process-wide: the price table, the ledger and the rate limiter over the store."""

    def __init__(self, config: Config, store: Store, metrics: Metrics) -> None:
        self.config = config
        self.prices = PriceTable.from_config(config.pricing)
        self.ledger = BudgetLedger(config.budgets, store)
        self.limiter = RateLimiter(config.rate_limit_config(), store)
        self.metrics = metrics
        self.clock = store.clock

    def start(
        self,
        request_id: str,
        model: str,
        identity: Identity,
        headers: Mapping[str, str],
        presented: str | None,
    ) -> SpendRun:
        scopes = scopes_of(identity, headers, self.config.budgets.pipeline_header)
        checks = self.ledger.checks_for(scopes)
        price = self.prices.find(model)
        if price is None and any(c.rule.usd is not None for c in checks):
            try:
                price = self.prices.lookup(model)
            except UnknownModel as exc:
                raise BadRequest(
                    f"{exc}: a USD budget applies to this request and the model is unpriced",
                    reason="unpriced_model",
                ) from exc
        subject = subject_of(identity, presented)
        return SpendRun(request_id, model, subject, checks, price, scopes)

    async def admit_hit(self, run: SpendRun) -> None:
        """A cache hit: counts as a request for the rate limits and quota, spends nothing."""
        if run.subject is None:
            return
        decision = await self._rate(run.subject)
        if not decision.allowed:
            raise rate_refusal(decision, self.clock.time())

    async def _rate(self, subject: RateSubject, tokens: int = 0) -> RateDecision:
        try:
            return await self.limiter.check(subject, tokens)
        except UnknownTier as exc:
            raise Forbidden(str(exc), reason="unknown_tier") from exc
        except StoreUnavailable as exc:
            raise Unavailable("the rate-limit store is unreachable", reason="store_down") from exc

    async def admit(self, run: SpendRun, body: Mapping[str, Any], size: int) -> None:
        """Rate limits and budget reservation in one round trip; raises `RateLimited`."""
        run.estimate_tokens = estimate_input_tokens(body, size)
        output = requested_output(body, self.config.limits.max_output_tokens)
        tokens = run.estimate_tokens + output
        usd = 0
        if run.price is not None:
            usd = estimate_micros(
                run.price, input_tokens=run.estimate_tokens, max_output_tokens=output
            )
        try:
            decision, held = await self._admit(run, Amount(usd, tokens), tokens)
        except StoreUnavailable as exc:
            self.metrics.store_errors.labels("admit").inc()
            raise Unavailable(
                "the budget store is unreachable and budgets fail closed (budgets.fail_open)",
                reason="store_down",
            ) from exc
        if decision.degraded or (isinstance(held, Reservation) and held.degraded):
            self.metrics.store_errors.labels("admit_fail_open").inc()
            log.warning("store unreachable; %s admitted unchecked (fail_open)", run.request_id)
        if not decision.allowed:
            raise rate_refusal(decision, self.clock.time())
        if isinstance(held, Denied):
            raise budget_refusal(held)
        run.reservation, run.admitted_tokens = held, tokens
        if held is not None:
            run.statuses = held.statuses
            self._gauge(held.statuses)

    async def _admit(
        self, run: SpendRun, amount: Amount, tokens: int
    ) -> tuple[RateDecision, Reservation | Denied | None]:
        if run.subject is None:
            return RateDecision(True), await self.ledger.reserve(run.request_id, run.checks, amount)
        try:
            return await self.limiter.check_and_reserve(
                run.subject, self.ledger, run.request_id, run.checks, amount, tokens=tokens
            )
        except UnknownTier as exc:
            raise Forbidden(str(exc), reason="unknown_tier") from exc

    async def settle(self, run: SpendRun, usage: Usage) -> None:
        """Charge what the call actually used (nothing if it failed before spending)."""
        if run.price is not None:
            run.cost_usd = micros_to_usd(cost_micros(usage, run.price))
        actual = Amount.of_usage(usage, run.price) if run.price else Amount(0, usage.total_tokens)
        try:
            if run.reservation is not None:
                await self.ledger.settle(run.reservation, actual)
            if run.subject is not None and run.admitted_tokens:
                await self.limiter.record_tokens(
                    run.subject, usage.total_tokens - run.admitted_tokens
                )
        except StoreError as exc:
            self.metrics.store_errors.labels("settle").inc()
            log.warning("settle of %s failed (its hold expires by itself): %s", run.request_id, exc)
        self._count_spend(run)

    def _count_spend(self, run: SpendRun) -> None:
        if run.cost_usd is None:
            return
        labels = {s.kind: s.id for s in run.scopes}
        model = self.metrics.bounds.model(run.model)
        team, project = labels.get("team", ""), labels.get("project", "")
        self.metrics.spend.labels(model, team, project).inc(float(run.cost_usd))

    def _gauge(self, statuses: Sequence[BudgetStatus]) -> None:
        for status in statuses:
            value = status.remaining / 1e6 if status.metric == "usd" else status.remaining
            scope = self.metrics.bounds.scope(status.scope.kind, status.scope.id)
            self.metrics.budget_remaining.labels(status.budget, scope, status.metric).set(value)

    async def quota(
        self, identity: Identity, headers: Mapping[str, str], presented: str | None
    ) -> dict[str, Any]:
        """What the caller has left: budgets, rate limits and the daily quota."""
        scopes = scopes_of(identity, headers, self.config.budgets.pipeline_header)
        budgets = await self.ledger.status(scopes)
        subject = subject_of(identity, presented)
        limits = await self.limiter.peek(subject) if subject else RateDecision(True)
        now = self.clock.time()
        return {
            "caller": identity.caller,
            "budgets": [_budget_json(b) for b in budgets],
            "limits": [
                {
                    "name": s.name,
                    "limit": s.limit,
                    "remaining": s.remaining,
                    "resets_at": _reset_iso(s.reset_after, now),
                }
                for s in limits.limits
            ],
        }


def _budget_json(status: BudgetStatus) -> dict[str, Any]:
    usd = status.metric == "usd"
    return {
        "budget": status.budget,
        "scope": f"{status.scope.kind}={status.scope.id}",
        "metric": status.metric,
        "limit": float(micros_to_usd(status.limit)) if usd else status.limit,
        "used": float(micros_to_usd(status.used)) if usd else status.used,
        "remaining": float(micros_to_usd(status.remaining)) if usd else status.remaining,
        "resets_at": _reset_iso(status.resets_at, 0) if status.resets_at else None,
    }
