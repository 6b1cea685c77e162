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
bytes, rounded up, images counted at a fixed size instead of their base64) at the
dearest input rate, plus the output the request may generate: `cap_output` first
rewrites a larger (or, on OpenAI, a missing) output limit down to
`limits.max_output_tokens`, so the provider cannot bill more than was reserved.
When the final usage never arrives (a stream cut short), `cut_short_usage` bills the
output streamed so far with the same token estimate. Refusals are 429s that say
which limit, what is left and when it resets. A store outage fails closed for
budgets (503) and open for rate limits unless configured otherwise; a settle that
cannot reach the store is logged and counted, and its hold expires by itself into
spend at its estimate.

Who the rate limits count (`subject_of`): the key, else the SSO user, else for an
anonymous caller the provider key it passes through, else its client address (or one
shared anonymous subject): never a key it could rotate on the gateway's credential.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import logging
import os
import time
import types
from collections.abc import Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar

from prometheus_client import Gauge

from extproc.apis import Endpoint
from extproc.apis.dialect import dialect_of
from extproc.apis.kind import ApiKind
from extproc.apis.tokens import tokens_for_bytes as tokens_for_bytes  # re-exported
from extproc.apis.usage import Usage
from extproc.config import Config
from extproc.errors import BadRequest, Forbidden, RateLimited, Unavailable
from extproc.policies.auth import Identity
from extproc.policies.budget.ledger import (
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
from extproc.policies.ratelimit import (
    RateDecision,
    RateLimitConfig,
    RateLimiter,
    RateSubject,
    UnknownTier,
)
from extproc.policies.step import Done, Ending, Exchange, Reply, Run
from extproc.store import RateItem, Store, StoreError, StoreUnavailable
from extproc.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


MEMO_LIMIT = 65_536  # memoized gauge children; cleared when full
RETRY_GRACE = 600.0  # a settle is retried this long past the hold's expiry (records last 1 h)

_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens")


def _choices(body: Mapping[str, Any]) -> int:
    """OpenAI's `n`: every choice is generated (and billed) up to the output limit."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


def requested_output(body: Mapping[str, Any], cap: int) -> int:
    """The output tokens to reserve: the request's limit (at most `cap`) times its choices.

    After the dialect's `cap_output` the request cannot produce more than this, so the
    reservation is an upper bound on what the provider bills."""
    output = cap  # the least of `cap` and the positive integer limits the body sets
    for name in _OUTPUT_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < output:
            output = value
    return output * _choices(body)


def cap_output(body: dict[str, Any], cap: int, api: ApiKind) -> bool:
    """Make `cap` the most the request may generate; True if the body was changed (the
    dialect's `cap_output`)."""
    return dialect_of(api).cap_output(body, cap)


def cut_short_usage(seen: Usage, input_estimate: int, content_bytes: int) -> Usage:
    """What a call whose final usage never arrived is billed: the input the provider
    reported (else the request's estimate) and the output that was streamed, counted from
    its content and rounded up (never less than a count the provider already sent)."""
    reported_input = seen.input_tokens + seen.cache_read_input_tokens
    reported_input += seen.cache_creation_input_tokens
    input_tokens = seen.input_tokens if reported_input else input_estimate
    output = max(seen.output_tokens, tokens_for_bytes(content_bytes))
    return Usage(
        input_tokens, output, seen.cache_creation_input_tokens, seen.cache_read_input_tokens
    )


def pipeline_namespace(identity: Identity) -> str | None:
    """Whose pipelines a caller's header names: its team, else project, else key or user.

    A pipeline id is only a label the caller chooses, so it is bound to the caller: the
    same `x-ci-pipeline-id` from two teams is two budgets, and no header can charge (or
    exhaust) another team's pipeline. Anonymous callers have no pipeline scope."""
    for kind, value in (
        ("team", identity.team),
        ("project", identity.project),
        ("key", identity.key_id),
        ("user", identity.user),
    ):
        if value:
            return value if kind == "team" else f"{kind}:{value}"
    return None


def scopes_of(identity: Identity, headers: Mapping[str, str], pipeline_header: str) -> list[Scope]:
    """The caller's own scopes (always: no header removes one), plus its pipeline's."""
    scopes = [Scope(kind, value) for kind, value in identity.scopes().items() if value]  # type: ignore[arg-type]
    pipeline = headers.get(pipeline_header, "").strip()
    namespace = pipeline_namespace(identity)
    if pipeline and namespace is not None:
        scopes.append(Scope("pipeline", f"{namespace}/{pipeline[:256]}"))
    return scopes


def client_address(headers: Mapping[str, str], trusted_hops: int) -> str | None:
    """The caller's address: the x-forwarded-for entry Envoy appended (it is the edge:
    use_remote_address), or the one `trusted_hops` proxies before it."""
    hops = [hop.strip() for hop in headers.get("x-forwarded-for", "").split(",")]
    hops = [hop for hop in hops if hop]
    index = len(hops) - 1 - trusted_hops
    return hops[index][:64] if 0 <= index < len(hops) else None


def subject_of(
    identity: Identity,
    presented: str | None,
    headers: Mapping[str, str],
    limits: RateLimitConfig,
) -> RateSubject:
    """Who the rate limits count: the key, else the SSO user, else for an anonymous caller
    the provider key it pays with (`presented`), else its address or the one shared
    anonymous subject (`rate_limits.anonymous`): a rotated or missing `x-api-key` never
    escapes the limits on the gateway's own credential."""
    if identity.key_id:
        ident = identity.key_id
    elif identity.user:
        ident = f"user={identity.user}"
    elif presented:
        ident = "anon=" + hashlib.sha256(presented.encode()).hexdigest()[:16]
    else:
        address = client_address(headers, limits.xff_trusted_hops)
        shared = limits.anonymous == "shared" or address is None
        ident = "anon=shared" if shared else f"anon=ip:{address}"
    return RateSubject(ident, identity.team, identity.tier)


def anonymous_unlimited(config: Config) -> bool:
    """Anonymous callers may use a gateway-held credential and nothing limits them."""
    if config.auth.required or not any(p.credential for p in config.providers.values()):
        return False
    limits = config.rate_limit_config()
    return (
        limits.key.requests_per_minute is None
        and limits.key.tokens_per_minute is None
        and (
            limits.default_tier is None
            or config.tiers[limits.default_tier].requests_per_day is None
        )
    )


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


def _started(coro: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
    """`coro` run at once up to its first wait, then as a task (what Python 3.12's eager
    tasks do): a call that never waits (the memory store) is done without a task and a
    trip through the event loop, ~2% of a request's CPU. Its outcome is in the future."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    try:
        waiting = coro.send(None)
    except StopIteration:
        future.set_result(None)
        return future
    except Exception as exc:
        future.set_exception(exc)
        return future
    return asyncio.ensure_future(_resumed(coro, waiting))


async def _resumed(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    await _go_on(coro, waiting)


@types.coroutine
def _go_on(coro: Coroutine[Any, Any, None], waiting: Any) -> Generator[Any, Any, None]:
    """Go on with `coro`, suspended on `waiting`, as `await coro` would: what the task
    sends or throws in goes to `coro`, what `coro` waits on goes to the task."""
    while True:
        try:
            sent = yield waiting
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # a cancellation goes to coro too
            try:
                waiting = coro.throw(exc)
            except StopIteration:
                return
            continue
        try:
            waiting = coro.send(sent)
        except StopIteration:
            return


class _HoldIds:
    """Unique ids for budget holds, cheaper than `uuid4` per request: a random
    per-process prefix (128 bits, so replicas sharing a store never collide) and a
    counter. A forked child draws its own prefix."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix = os.urandom(16).hex()
        self._count = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._count):x}"


hold_id = _HoldIds()


class SpendStep:
    """The spend step's place in the order: a generating request is admitted (rate
    limits and budget reservation) and settled; a count_tokens call counts as a request
    against the request limits and the daily quota; anything else is not charged."""

    def open(self, exchange: Exchange) -> Run | None:
        route, spending = exchange.route, exchange.gw.spending
        if route is None:
            return None
        if route.endpoint.generates:
            assert exchange.served_model is not None
            return spending.start(
                hold_id(),
                exchange.served_model,
                exchange.identity,
                exchange.headers,
                exchange.payer(),
            )
        if route.endpoint is Endpoint.COUNT_TOKENS:
            # Free at the provider, but a call on its credential (README).
            subject = spending.subject(exchange.identity, exchange.payer(), exchange.headers)
            return RequestCount(spending, subject)
        return None


SPEND = SpendStep()


@dataclass(slots=True)
class RequestCount(Run):
    """A count_tokens call: one request against the limits, no tokens, no budget."""

    waits: ClassVar[bool] = True
    spending: Spending
    subject: RateSubject

    async def request(self, exchange: Exchange, reply: Reply | None) -> Reply | None:
        await self.spending.count_request(self.subject)
        return reply


@dataclass
class SpendRun(Run):
    """One request's budget and rate-limit state, from admission to settlement."""

    waits: ClassVar[bool] = True
    closes: ClassVar[bool] = True

    request_id: str
    model: str
    subject: RateSubject
    checks: Sequence[BudgetCheck]
    price: Price | None
    scopes: list[Scope]
    estimate_tokens: int = 0
    reservation: Reservation | None = None
    admitted_tokens: int = 0
    cost_usd: Decimal | None = None
    statuses: tuple[BudgetStatus, ...] = field(default_factory=tuple)
    # The admission's store call, shielded: a request cancelled while it runs must not
    # leave a hold nobody settles (settle waits for it).
    admission: asyncio.Future[None] | None = None
    # The holds an admission that timed out may have made after all (released by id).
    uncertain: Reservation | None = None
    # Other prices the answer may be charged at (a fallback chain): the reservation
    # covers the dearest; settlement uses `price`, set to the one that answered.
    alternatives: tuple[Price, ...] = ()

    spending: Spending | None = field(default=None, repr=False)  # settles it at close

    def start(self, exchange: Exchange) -> None:
        """A fallback chain may serve other models: the reservation covers the dearest."""
        if exchange.alternatives and self.spending is not None:
            self.spending.may_serve(self, exchange.alternatives)

    async def request(self, exchange: Exchange, reply: Reply | None) -> Reply | None:
        """Admit the request from its dialect's token estimate; a reply from the cache is
        admitted as a hit (or charged like a call, per `cache.charge_budget_on_hit`)."""
        assert self.spending is not None
        assert exchange.request is not None
        body, dialect = exchange.request.body, exchange.dialect
        worker = exchange.request.worker  # a heavy body: the worker's estimate, made on all of it
        if reply is None:
            estimate = (
                worker.input_tokens
                if worker is not None
                else dialect.estimate_input_tokens(body, exchange.body_size)
            )
            await self.spending.admit(self, body, input_tokens=estimate)
        elif exchange.gw.config.cache.charge_budget_on_hit:
            estimate = dialect.estimate_input_tokens(body, 0)
            await self.spending.admit(self, body, input_tokens=estimate)
        else:
            await self.spending.admit_hit(self)
        return reply

    async def close(self, ending: Ending) -> None:
        """Settle the reservation to what the request is billed for."""
        if self.spending is not None:
            await self.spending.settle(self, ending.billable)

    def audit_fields(self, done: Done) -> dict[str, Any]:
        """The spend step's part of the audit record: scopes charged, the cost of what
        was served, and what a cache hit saved."""
        fields: dict[str, Any] = {
            "scopes": {scope.kind: scope.id for scope in self.scopes},
            "cost_usd": float(self.cost_usd) if self.cost_usd is not None else None,
        }
        if done.outcome == "cache_hit" and self.price is not None:
            fields["cost_saved_usd"] = cost_micros(done.usage, self.price) / 1e6
        return fields


class Spending:
    """Process-wide: the price table, the ledger and the rate limiter over the store."""

    def __init__(self, config: Config, store: Store, metrics: Metrics) -> None:
        self.config = config
        self.prices = PriceTable.from_config(config.pricing)
        self.ledger = BudgetLedger(config.budgets, store)
        self.limiter_config = config.rate_limit_config()
        self.limiter = RateLimiter(self.limiter_config, store)
        self.metrics = metrics
        self.clock = store.clock
        self._retries: set[asyncio.Task[None]] = set()
        self._gauges: dict[tuple[str, str, str, str], Gauge] = {}
        self._scopes: dict[tuple[str | None, ...], tuple[list[Scope], list[BudgetCheck]]] = {}
        self._pipeline_header = config.budgets.pipeline_header  # (read per request)

    def start(
        self,
        request_id: str,
        model: str,
        identity: Identity,
        headers: Mapping[str, str],
        presented: str | None,
    ) -> SpendRun:
        scopes, checks = self._scopes_and_checks(identity, headers)
        price = self._price(model, checks)
        subject = subject_of(identity, presented, headers, self.limiter_config)
        return SpendRun(request_id, model, subject, checks, price, scopes, spending=self)

    def _scopes_and_checks(
        self, identity: Identity, headers: Mapping[str, str]
    ) -> tuple[list[Scope], list[BudgetCheck]]:
        """`scopes_of` and the budgets that apply to them, memoized by what decides them
        (the identity's four scopes and the pipeline header): the same callers come again
        and again, and building and hashing Scope objects cost microseconds per request."""
        pipeline = headers.get(self._pipeline_header)
        memo = (identity.key_id, identity.user, identity.team, identity.project, pipeline)
        found = self._scopes.get(memo)
        if found is None:
            if len(self._scopes) >= MEMO_LIMIT:
                self._scopes.clear()
            scopes = scopes_of(identity, headers, self._pipeline_header)
            found = self._scopes[memo] = (scopes, self.ledger.checks_for(scopes))
        return list(found[0]), list(found[1])

    def price_of(self, model: str, run: SpendRun) -> Price | None:
        """A model's price for `run`; an unpriced one is refused when a USD budget applies."""
        return self._price(model, run.checks)

    def _price(self, model: str, checks: Sequence[BudgetCheck]) -> Price | None:
        price = self.prices.find(model)
        if price is None and any(c.rule.usd is not None for c in checks):
            try:
                price = self.prices.lookup(model)
            except UnknownModel as exc:
                raise BadRequest(
                    f"{exc}: a USD budget applies to this request and the model is unpriced",
                    reason="unpriced_model",
                ) from exc
        return price

    def may_serve(self, run: SpendRun, models: Sequence[str]) -> None:
        """The request may be answered by any of `models` (a fallback chain): reserve for
        the dearest of them, once."""
        prices = (self.price_of(m, run) for m in models if m != run.model)
        run.alternatives = tuple(p for p in prices if p is not None)

    def serve(self, run: SpendRun, model: str) -> None:
        """Another model answers than the one admitted (a fallback): settlement prices
        what was served. An unpriced model keeps the admitted price (the reservation's
        basis) rather than going uncharged."""
        run.model = model
        run.price = self.prices.find(model) or run.price

    async def admit_hit(self, run: SpendRun) -> None:
        """A cache hit: counts as a request for the rate limits and quota, spends nothing."""
        await self.count_request(run.subject)

    async def count_request(self, subject: RateSubject) -> None:
        """One request against the request limits and the daily quota, no tokens, no budget
        (a cache hit, a count_tokens call); raises `RateLimited`."""
        decision = await self._rate(subject)
        if not decision.allowed:
            raise rate_refusal(decision, self.clock.time())

    def subject(
        self, identity: Identity, presented: str | None, headers: Mapping[str, str]
    ) -> RateSubject:
        return subject_of(identity, presented, headers, self.limiter_config)

    async def _rate(self, subject: RateSubject, tokens: int = 0) -> RateDecision:
        try:
            return await self.limiter.check(subject, tokens)
        except UnknownTier as exc:
            raise Forbidden(str(exc), reason="unknown_tier") from exc
        except StoreUnavailable as exc:
            raise Unavailable("the rate-limit store is unreachable", reason="store_down") from exc

    async def admit(self, run: SpendRun, body: Mapping[str, Any], *, input_tokens: int) -> None:
        """Rate limits and budget reservation in one round trip; raises `RateLimited`.
        `input_tokens`: the request's input estimate (its dialect's `estimate_input_tokens`).

        The store call runs to its end even if the request is cancelled meanwhile (the
        client hung up): the hold it makes is then settled by `settle`, not leaked."""
        run.admission = _started(self._admit_run(run, body, input_tokens))
        if run.admission.done():  # the memory store's never waits: no task, no trip
            run.admission.result()
            return
        await asyncio.shield(run.admission)

    async def _admit_run(self, run: SpendRun, body: Mapping[str, Any], input_tokens: int) -> None:
        run.estimate_tokens = input_tokens
        output = requested_output(body, self.config.limits.max_output_tokens)
        tokens = run.estimate_tokens + output
        usd = 0  # the dearest of the prices the answer may be charged at
        for price in (run.price, *run.alternatives):
            if price is not None:
                estimate = estimate_micros(
                    price, input_tokens=input_tokens, max_output_tokens=output
                )
                usd = max(usd, estimate)
        try:
            decision, held = await self._admit(run, Amount(usd, tokens), tokens)
        except StoreUnavailable as exc:
            # A timed-out call may still have applied in the store: release by id in settle.
            plan = self.ledger.plan(run.request_id, run.checks, Amount(usd, tokens))
            run.uncertain = Reservation(plan.request_id, plan.lines, plan.amount, plan.until)
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
        try:
            return await self.limiter.check_and_reserve(
                run.subject, self.ledger, run.request_id, run.checks, amount, tokens=tokens
            )
        except UnknownTier as exc:
            raise Forbidden(str(exc), reason="unknown_tier") from exc

    async def settle(self, run: SpendRun, usage: Usage) -> None:
        """Charge what the call actually used (nothing if it failed before spending)."""
        if run.admission is not None:
            if not run.admission.done():  # (a finished one needs no trip through the loop)
                await asyncio.wait([run.admission])  # its hold, if any, is settled below
            if not run.admission.cancelled():
                run.admission.exception()  # a refusal was already answered
        cost = 0
        if run.price is not None:
            cost = cost_micros(usage, run.price)
            run.cost_usd = micros_to_usd(cost)
        actual = Amount(cost, usage.total_tokens)  # (= Amount.of_usage, priced once)
        held = run.reservation or run.uncertain
        tokens = usage.total_tokens - run.admitted_tokens if run.admitted_tokens else 0
        debit = self._carried_debit(run, tokens)
        try:
            if held is not None:
                await self._finish_hold(held, actual, release=run.reservation is None, debit=debit)
        except StoreError as exc:
            self.metrics.store_errors.labels("settle").inc()
            log.warning("settle of %s failed (retried in the background): %s", run.request_id, exc)
            assert held is not None
            self._retry_later(held, actual, release=run.reservation is None, debit=debit)
        try:
            if tokens and not debit:
                await self.limiter.record_tokens(run.subject, tokens)
        except StoreError as exc:
            log.warning("token count of %s not recorded: %s", run.request_id, exc)
        self._count_spend(run)

    def _carried_debit(self, run: SpendRun, tokens: int) -> list[RateItem]:
        """The token limits' correction, when it can ride in the settle's own store call
        (one round trip; a retried settle never debits twice): a settled reservation with
        lines, on the rate limiter's hash tag. Otherwise [] and `record_tokens` does it."""
        held = run.reservation
        if not tokens or held is None or not held.lines:
            return []
        if self.ledger.hash_tag != self.limiter.hash_tag:
            return []
        return self.limiter.token_debit(run.subject, tokens)

    async def _finish_hold(
        self, held: Reservation, actual: Amount, *, release: bool, debit: list[RateItem]
    ) -> None:
        if release:  # an admission that timed out: its hold, if it was made after all
            await self.ledger.release(held)
        else:
            await self.ledger.settle(held, actual, debit)

    def _retry_later(
        self, held: Reservation, actual: Amount, *, release: bool, debit: list[RateItem]
    ) -> None:
        """Settle (or release) again once the store is back: otherwise the hold would
        expire into spend at its estimate. Settling is idempotent (its debit too), and a
        settle after the hold expired corrects the charge, so retrying is always safe."""
        task = asyncio.ensure_future(self._retry(held, actual, release, debit))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry(
        self, held: Reservation, actual: Amount, release: bool, debit: list[RateItem]
    ) -> None:
        deadline = time.monotonic() + self.config.budgets.reservation_ttl_seconds + RETRY_GRACE
        delay = 0.25
        while True:
            await asyncio.sleep(delay)
            try:
                await self._finish_hold(held, actual, release=release, debit=debit)
                return
            except StoreError as exc:
                if time.monotonic() + delay > deadline:
                    log.error("gave up settling %s: %s", held.request_id, exc)
                    return
            delay = min(delay * 2, 10.0)

    def _count_spend(self, run: SpendRun) -> None:
        if run.cost_usd is None:
            return
        labels = {s.kind: s.id for s in run.scopes}
        model = self.metrics.bounds.model(run.model)
        team, project = labels.get("team", ""), labels.get("project", "")
        self.metrics.child(self.metrics.spend, model, team, project).inc(float(run.cost_usd))

    def _gauge(self, statuses: Sequence[BudgetStatus]) -> None:
        for status in statuses:
            value = status.remaining / 1e6 if status.metric == "usd" else status.remaining
            self._gauge_of(status).set(value)

    def _gauge_of(self, status: BudgetStatus) -> Gauge:
        """The budget's `extproc_budget_remaining` child, memoized: `labels()` costs
        several µs per call, four times per admitted request (a scope's bounded label
        never changes once given)."""
        scope = status.scope  # (its fields in the key: a Scope hashes in Python, per request)
        memo = (status.budget, scope.kind, scope.id, status.metric)
        child = self._gauges.get(memo)
        if child is None:
            if len(self._gauges) >= MEMO_LIMIT:
                self._gauges.clear()
            label = self.metrics.bounds.scope(scope.kind, scope.id)
            child = self.metrics.budget_remaining.labels(status.budget, label, status.metric)
            self._gauges[memo] = child
        return child

    async def quota(
        self, identity: Identity, headers: Mapping[str, str], presented: str | None
    ) -> dict[str, Any]:
        """What the caller has left: budgets, rate limits and the daily quota."""
        scopes = scopes_of(identity, headers, self.config.budgets.pipeline_header)
        budgets = await self.ledger.status(scopes)
        limits = await self.limiter.peek(
            subject_of(identity, presented, headers, self.limiter_config)
        )
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
