"""Request and token rate limits per API key and team, and tiered daily quotas.

Per-minute limits use GCRA (the generic cell rate algorithm), not a sliding
window. GCRA keeps one number per limit (the "theoretical arrival time"), so a
check is a GET and a SET inside one script, with O(1) memory whatever the rate;
it is exact (no fixed-window edge where 2x the rate passes across a boundary,
no approximation as in the two-bucket sliding-window counter) and it yields
`retry_after` directly: the moment the next unit fits. `burst` sets how many
units may arrive at once (default: one minute's worth). A sliding log would be
exact too but stores one entry per request, which for tokens/min means
thousands of entries per key.

Tokens are known only after the response, so a token limit is checked before
the call with the caller's estimate (capped at the burst, so one large request
is never refused forever) and corrected afterwards with `record_tokens`, which
debits the difference unconditionally (or refunds it, never below empty). A
key that overshoots is then refused until its debt drains; a check with an
estimate of 0 asks only "is this key in debt?".

Daily request quotas come from the key's tier (defaults: free 10/day, pro
1000/day, enterprise unlimited) and are fixed UTC-calendar-day counters: they
reset at 00:00 UTC, which is what "N requests per day" means on a price list.

Every limit of one request (key and team, requests and tokens, quota) is
checked in one atomic store call, all-or-nothing: a refused request consumes
nothing anywhere. All keys share one Cluster hash tag (`{gateway}` by
default, the same as the budgets', so `check_and_reserve` can decide rate
limits and budget holds in one script and one round trip); see
`extproc.policies.budget` for the trade-off.

Key layout::

    {prefix}:rl:{<tag>}:<key|team>:<id>:req          GCRA TAT (ms, float) string
    {prefix}:rl:{<tag>}:<key|team>:<id>:tok          GCRA TAT for tokens
    {prefix}:rl:{<tag>}:key:<id>:day:<yyyymmdd>      quota counter, expires at midnight
"""

from __future__ import annotations

import calendar
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from extproc.policies.budget.ledger import (
    Amount,
    BudgetCheck,
    BudgetLedger,
    Denied,
    HoldPlan,
    Reservation,
)
from extproc.slots import slot_init
from extproc.store import Gcra, Quota, RateItem, RateState, Store, StoreUnavailable

__all__ = [
    "LimitItem",
    "LimitState",
    "RateDecision",
    "RateLimit",
    "RateLimitConfig",
    "RateLimiter",
    "RateSubject",
    "Tier",
    "UnknownTier",
]

MINUTE = 60.0


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RateLimit(_Frozen):
    """Per-minute limits for one key or team; None means no such limit."""

    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    request_burst: int | None = Field(default=None, gt=0)  # default: requests_per_minute
    token_burst: int | None = Field(default=None, gt=0)  # default: tokens_per_minute


class Tier(_Frozen):
    """A plan's daily request quota; None is unlimited."""

    requests_per_day: int | None = Field(default=None, ge=0)


def _default_tiers() -> dict[str, Tier]:
    return {
        "free": Tier(requests_per_day=10),
        "pro": Tier(requests_per_day=1000),
        "enterprise": Tier(requests_per_day=None),
    }


class RateLimitConfig(_Frozen):
    """`rate_limits:` in the config file.

    `key` and `team` apply to every key / team; `keys` and `teams` replace them
    for named ids. A key's tier comes from its API-key record; keys without one
    get `default_tier` (None: no daily quota).
    """

    key: RateLimit = RateLimit()
    team: RateLimit = RateLimit()
    keys: dict[str, RateLimit] = Field(default_factory=dict)
    teams: dict[str, RateLimit] = Field(default_factory=dict)
    tiers: dict[str, Tier] = Field(default_factory=_default_tiers)
    default_tier: str | None = None
    hash_tag: str = Field(default="gateway", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key_prefix: str = Field(default="gw", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    fail_open: bool = True
    # Callers without a gateway key or JWT (auth.required: false) on a gateway-held provider
    # credential are limited like a key (`key` limits, `default_tier` quota) per client
    # address (`address`: the x-forwarded-for entry Envoy appended, skipping
    # `xff_trusted_hops` proxies in front of it) or all together (`shared`).
    anonymous: Literal["address", "shared"] = "address"
    xff_trusted_hops: int = Field(default=0, ge=0, le=10)

    @field_validator("tiers")
    @classmethod
    def _tier_names(cls, value: dict[str, Tier]) -> dict[str, Tier]:
        for name in value:
            if not name or len(name) > 64:
                raise ValueError(f"tier name {name!r} must be 1-64 characters")
        return value

    @model_validator(mode="after")
    def _default_known(self) -> RateLimitConfig:
        if self.default_tier is not None and self.default_tier not in self.tiers:
            raise ValueError(
                f"default_tier {self.default_tier!r} is not one of the tiers: {sorted(self.tiers)}"
            )
        return self


class UnknownTier(ValueError):
    """A key names a tier the config does not define (validate keys against `tiers`)."""


@slot_init
@dataclass(frozen=True, slots=True)
class RateSubject:
    """Who is calling: the API key's id, its team and its tier."""

    key_id: str
    team_id: str | None = None
    tier: str | None = None


@slot_init
@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit's verdict, named like `key.requests_per_minute` or `key.requests_per_day`."""

    name: str
    limit: int
    allowed: bool
    remaining: int
    retry_after: float
    reset_after: float


@slot_init
@dataclass(frozen=True, slots=True)
class RateDecision:
    """The verdict on one request: allowed, and every limit's state (for headers)."""

    allowed: bool
    limits: tuple[LimitState, ...] = ()
    degraded: bool = False  # the store was down and fail_open let the request through

    @property
    def retry_after(self) -> float:
        """Seconds until every refused limit would accept the request (0 if allowed)."""
        return max((s.retry_after for s in self.limits if not s.allowed), default=0.0)

    @property
    def retry_after_header(self) -> str:
        """`Retry-After` value: whole seconds, at least 1 when refused."""
        return str(max(1, math.ceil(self.retry_after))) if not self.allowed else "0"

    @property
    def binding(self) -> LimitState | None:
        """The limit to report: the refusal with the longest wait, else the least remaining."""
        refused = [s for s in self.limits if not s.allowed]
        if refused:
            return max(refused, key=lambda s: s.retry_after)
        return min(self.limits, key=lambda s: s.remaining / max(s.limit, 1), default=None)


@slot_init
@dataclass(frozen=True, slots=True)
class LimitItem:
    """One limit a request is checked against: its name, limit and store item."""

    name: str
    limit: int
    item: RateItem


@dataclass(frozen=True, slots=True)
class _Spec:
    """One per-minute GCRA limit of one scope, minus the per-call cost."""

    name: str
    key: str
    rate: int
    burst: int
    # The cost-1 item (a request counted), made once: every request checks it.
    unit: LimitItem = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "unit", LimitItem(self.name, self.rate, self.gcra(1)))

    def gcra(self, cost: int) -> Gcra:
        return Gcra(self.key, self.rate, MINUTE, self.burst, cost)

    def item(self, cost: int) -> LimitItem:
        if cost == 1:
            return self.unit
        return LimitItem(self.name, self.rate, self.gcra(cost))


@dataclass(frozen=True, slots=True)
class _Limits:
    """A subject's per-minute limits (key, then team), fixed for the subject: `parts` in
    check order, a request limit as its ready item, a token limit as its spec (the
    request's cost is only known per call); `tokens` the token specs alone."""

    parts: tuple[LimitItem | _Spec, ...]
    tokens: tuple[_Spec, ...]


Kind = Literal["key", "team"]
MEMO_LIMIT = 65_536  # memoized scope specs, subjects' limits and quota keys; cleared when full


def _day_and_midnight(now: float) -> tuple[str, float]:
    today = datetime.fromtimestamp(now, UTC).date()
    return f"{today:%Y%m%d}", float(calendar.timegm((today + timedelta(days=1)).timetuple()))


class RateLimiter:
    """Rate limits and quotas over a `Store`; time comes from the store's clock."""

    def __init__(self, config: RateLimitConfig, store: Store) -> None:
        self._config = config
        self._store = store
        self._base = f"{config.key_prefix}:rl:{{{config.hash_tag}}}"
        self._specs: dict[tuple[Kind, str], tuple[_Spec | None, _Spec | None]] = {}
        self._quotas: dict[tuple[str, str, int], LimitItem | None] = {}
        self._subjects: dict[tuple[str, str | None], _Limits] = {}

    def _limits(self, kind: Kind, ident: str) -> RateLimit:
        if kind == "key":
            return self._config.keys.get(ident, self._config.key)
        return self._config.teams.get(ident, self._config.team)

    def _key(self, kind: str, ident: str, what: str) -> str:
        return f"{self._base}:{kind}:{quote(ident, safe='-_.@~+=')}:{what}"

    def _scope_specs(self, kind: Kind, ident: str) -> tuple[_Spec | None, _Spec | None]:
        """(requests, tokens) per-minute specs of one scope; memoized."""
        found = self._specs.get((kind, ident))
        if found is None:
            limits = self._limits(kind, ident)
            rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
            req = tok = None
            if rpm is not None:
                key = self._key(kind, ident, "req")
                req = _Spec(f"{kind}.requests_per_minute", key, rpm, limits.request_burst or rpm)
            if tpm is not None:
                key = self._key(kind, ident, "tok")
                tok = _Spec(f"{kind}.tokens_per_minute", key, tpm, limits.token_burst or tpm)
            found = (req, tok)
            _remember(self._specs, (kind, ident), found)
        return found

    def _subject_limits(self, subject: RateSubject) -> _Limits:
        """The subject's per-minute limits, memoized by key and team: the same few subjects
        call again and again, and their limits are fixed by the config."""
        memo_key = (subject.key_id, subject.team_id)
        found = self._subjects.get(memo_key)
        if found is None:
            parts: list[LimitItem | _Spec] = []
            for kind, ident in self._scopes(subject):
                req, tok = self._scope_specs(kind, ident)
                if req is not None:
                    parts.append(req.unit)
                if tok is not None:
                    parts.append(tok)
            tokens = tuple(p for p in parts if isinstance(p, _Spec))
            found = _Limits(tuple(parts), tokens)
            _remember(self._subjects, memo_key, found)
        return found

    def _quota_item(self, subject: RateSubject) -> LimitItem | None:
        name = subject.tier or self._config.default_tier
        if name is None:
            return None
        now = self._store.clock.time()
        memo_key = (subject.key_id, name, int(now // 86_400))
        if memo_key not in self._quotas:
            _remember(self._quotas, memo_key, self._make_quota(subject.key_id, name, now))
        return self._quotas[memo_key]

    def _make_quota(self, key_id: str, tier_name: str, now: float) -> LimitItem | None:
        tier = self._config.tiers.get(tier_name)
        if tier is None:
            known = sorted(self._config.tiers)
            raise UnknownTier(f"tier {tier_name!r} is not configured; known: {known}")
        if tier.requests_per_day is None:
            return None
        day, resets = _day_and_midnight(now)
        limit = tier.requests_per_day
        quota = Quota(self._key("key", key_id, f"day:{day}"), limit, 1, resets)
        return LimitItem("key.requests_per_day", limit, quota)

    @staticmethod
    def _scopes(subject: RateSubject) -> list[tuple[Kind, str]]:
        scopes: list[tuple[Kind, str]] = [("key", subject.key_id)]
        if subject.team_id is not None:
            scopes.append(("team", subject.team_id))
        return scopes

    def items_for(self, subject: RateSubject, tokens: int = 0) -> list[LimitItem]:
        """Every item one request checks (pure; the store is not touched)."""
        if tokens < 0:
            raise ValueError("a token estimate is never negative")
        items = [
            part if isinstance(part, LimitItem) else part.item(min(tokens, part.burst))
            for part in self._subject_limits(subject).parts
        ]
        quota = self._quota_item(subject)
        return items if quota is None else [*items, quota]

    async def check(self, subject: RateSubject, tokens: int = 0) -> RateDecision:
        """Admit one request with an estimated `tokens`, or say which limit refuses and for
        how long. All limits are decided together: a refusal consumes nothing."""
        items = self.items_for(subject, tokens)
        if not items:
            return RateDecision(True)
        try:
            states = await self._store.rate([i.item for i in items])
        except StoreUnavailable:
            if not self._config.fail_open:
                raise
            return RateDecision(True, degraded=True)
        return _decision(items, states)

    async def check_and_reserve(
        self,
        subject: RateSubject,
        ledger: BudgetLedger,
        request_id: str,
        checks: Sequence[BudgetCheck],
        amount: Amount,
        *,
        tokens: int = 0,
    ) -> tuple[RateDecision, Reservation | Denied | None]:
        """`check` and `ledger.reserve` in one store round trip, all or nothing.

        The reservation is None when a rate limit refuses (no budget is held); a
        budget refusal consumes no rate allowance. Needs both policies on the same
        `hash_tag` (the default); otherwise it makes the two calls in turn (and a
        budget refusal then has consumed the rate allowance). When the store is
        down it admits (degraded) only if both policies are `fail_open`.
        """
        plan = ledger.plan(request_id, checks, amount)
        items = self.items_for(subject, tokens)
        if not plan.lines or not items or ledger.hash_tag != self._config.hash_tag:
            return await self._in_turn(subject, tokens, ledger, plan, checks)
        try:
            states, held = await self._store.admit(
                [i.item for i in items],
                request_id,
                plan.record_key,
                plan.holds,
                until=plan.until,
                record_ttl=plan.record_ttl,
            )
        except StoreUnavailable:
            if not (self._config.fail_open and ledger.fail_open):
                raise
            return RateDecision(True, degraded=True), ledger.empty(plan, degraded=True)
        return _decision(items, states), None if held is None else ledger.outcome(plan, held)

    async def _in_turn(
        self,
        subject: RateSubject,
        tokens: int,
        ledger: BudgetLedger,
        plan: HoldPlan,
        checks: Sequence[BudgetCheck],
    ) -> tuple[RateDecision, Reservation | Denied | None]:
        decision = await self.check(subject, tokens)
        if not decision.allowed:
            return decision, None
        return decision, await ledger.reserve(plan.request_id, checks, plan.amount)

    async def peek(self, subject: RateSubject) -> RateDecision:
        """Every limit's state without consuming anything (for the quota endpoint)."""
        items = [
            LimitItem(i.name, i.limit, dataclasses.replace(i.item, cost=0))
            for i in self.items_for(subject)
        ]
        if not items:
            return RateDecision(True)
        return _decision(items, await self._store.rate([i.item for i in items]))

    @property
    def hash_tag(self) -> str:
        return self._config.hash_tag

    def token_debit(self, subject: RateSubject, tokens: int) -> list[RateItem]:
        """The store items that debit (or, if negative, refund) `tokens` on the subject's
        token limits, for `record_tokens` or a settle that carries them (pure)."""
        if tokens == 0:
            return []
        return [spec.gcra(tokens) for spec in self._subject_limits(subject).tokens]

    async def record_tokens(self, subject: RateSubject, tokens: int) -> None:
        """Debit (or, if negative, refund) `tokens` on the token limits after a response:
        the actual count minus the estimate `check` was given. Never refuses."""
        items = self.token_debit(subject, tokens)
        if not items:
            return
        try:
            await self._store.rate(items, force=True)
        except StoreUnavailable:
            if not self._config.fail_open:
                raise


def _remember(memo: dict[Any, Any], key: Any, value: Any) -> None:
    if len(memo) >= MEMO_LIMIT:
        memo.clear()
    memo[key] = value


def _decision(items: Sequence[LimitItem], states: Sequence[RateState]) -> RateDecision:
    limits = tuple(
        [
            LimitState(i.name, i.limit, s.allowed, s.remaining, s.retry_after, s.reset_after)
            for i, s in zip(items, states, strict=True)
        ]
    )
    return RateDecision(all(s.allowed for s in states), limits)
