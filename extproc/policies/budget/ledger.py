"""Spend budgets per key, user, team, project and pipeline: reserve, then settle.

A request names its scopes (`Scope("team", "research")`, ...); `checks_for`
picks the configured rules that apply; `reserve` holds an estimated `Amount`
(micro-USD and tokens) on every counter of every rule at once, all-or-nothing,
in one store round trip; when the response ends, `settle` replaces the hold by
the actual amount, or `release` drops it (request failed before spending).

Windows (UTC): `daily` and `monthly` are calendar windows, `lifetime` never
resets, `rolling` sums the last N calendar days (today included) and frees a
day's spend when that day leaves the window (so `resets_at` is the next UTC
midnight: the earliest moment the window can shrink).

Rollover: a reservation remembers the exact counters it held, so a request
admitted at 23:59:59 and settled at 00:00:01 takes its hold back from, and
charges its spend to, the window it was admitted in (like an invoice dated by
request start). Yesterday stays consistent (no leaked hold) and today starts
clean.

No leaks: every hold carries an expiry (`reservation_ttl_seconds`, default
15 min, longer than the longest upstream call should be). Each hold is a member
of a sorted set scored by expiry, and every script that touches a counter first
purges expired members and subtracts them, so a crashed process's holds vanish
by themselves. A settle that arrives after its hold expired still records the
spend; settling twice, or settling a released reservation, changes nothing.

Overspend bound. A reservation is admitted only if `used + estimate <= limit`
on every counter, where `used` = settled spend + live holds. Settling may exceed
the estimate, so for each counter

    spend <= limit + sum(max(0, actual_i - estimate_i))   over requests i that
                                                          were in flight together
              + sum(actual_j)                             over requests j whose hold
                                                          expired before they settled

With estimates that are true upper bounds (`estimate_micros` prices every input
token at the dearest input rate and all of `max_tokens` as output) and holds
that outlive requests, both sums are zero and spend never passes the limit.

Key layout (one Redis Cluster hash tag, `{gateway}` by default, for all budget
and rate-limit state; `{prefix}` is `gw`)::

    {prefix}:b:{<tag>}:<kind>:<id>:<usd|tok>:<d20250131|m202501|life|r7d>   hash
        fields: held (sum of live holds), s (calendar/lifetime spend) or
        s:<yyyymmdd> (rolling: one per day, pruned as days leave the window),
        next (earliest hold expiry, ms), exp (the window expiry, ms, the TTLs of
        this hash and its holds were last set to; see extproc.store.redis)
    ...same...:holds     zset  member <request_id>:<amount>, score = hold expiry (ms)
    {prefix}:b:{<tag>}:res:<request_id>   string  held | settled | released

Scope ids and request ids are percent-encoded so `:`, `{` and `}` in them can
never collide with the layout or change the hash tag.

Why one global tag rather than one per scope: a request's checks span key,
user, team, project and pipeline, and the all-or-nothing reserve needs every
counter in one script, which Redis Cluster only allows within one slot (the
rate limiter shares the tag so that `RateLimiter.check_and_reserve` can decide
rate limits and budget in the same script). A global tag puts all of this
traffic on one shard; one shard runs on the order of 100k such scripts per
second, far above what a fleet of Python ext_proc workers (~1k requests/s
each) sends, and the rest of the cluster stays free for the response cache. A
per-tenant tag would spread the load but forbid a check that spans tenants; a
deployment that serves separate tenants can give each gateway its own
`hash_tag`.
"""

from __future__ import annotations

import calendar
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from extproc.apis.usage import Usage
from extproc.policies.pricing import Price, cost_micros, micros_to_usd, usd_to_micros
from extproc.slots import slot_init
from extproc.store import (
    Counter,
    Hold,
    HoldResult,
    RateItem,
    SettleOutcome,
    Store,
    StoreUnavailable,
)

__all__ = [
    "Amount",
    "BudgetCheck",
    "BudgetConfig",
    "BudgetLedger",
    "BudgetLine",
    "BudgetRule",
    "BudgetStatus",
    "Denied",
    "DuplicateReservation",
    "HoldPlan",
    "Metric",
    "Reservation",
    "Scope",
    "ScopeKind",
    "Window",
    "WindowKind",
    "window_for",
]

ScopeKind = Literal["key", "user", "team", "project", "pipeline"]
Metric = Literal["usd", "tokens"]
WindowKind = Literal["daily", "monthly", "lifetime", "rolling"]

DAY = 86_400.0
KEY_GRACE_SECONDS = DAY  # counters outlive their window by this, so late settles land
RECORD_GRACE_SECONDS = 3_600.0  # settled records dedupe repeated settles this long
MEMO_LIMIT = 65_536  # memoized (check, day) counters; cleared when full

_TAG = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BudgetRule(_Frozen):
    """One limit: `usd` and/or `tokens` per `window` for scopes of kind `scope`.

    `id: "*"` gives every scope of that kind its own counter with this limit; a
    rule naming a specific id replaces the `*` rule with the same window for that
    id (so one team can get a bigger budget than the default).
    """

    scope: ScopeKind
    id: str = Field(default="*", min_length=1, max_length=256)
    window: WindowKind
    days: int | None = Field(default=None, ge=1, le=366)
    usd: Decimal | None = Field(default=None, ge=0)
    tokens: int | None = Field(default=None, ge=0)
    name: str | None = Field(default=None, min_length=1, max_length=128)

    @model_validator(mode="after")
    def _consistent(self) -> BudgetRule:
        if self.usd is None and self.tokens is None:
            raise ValueError("set usd, tokens or both")
        if (self.window == "rolling") != (self.days is not None):
            raise ValueError("days is required with window: rolling, and only then")
        return self

    @property
    def window_label(self) -> str:
        return f"rolling-{self.days}d" if self.window == "rolling" else self.window

    @property
    def label(self) -> str:
        return self.name or f"{self.scope}:{self.id}/{self.window_label}"

    def limits(self) -> list[tuple[Metric, int]]:
        """(metric, limit in micro-USD or tokens) for each limit the rule sets."""
        out: list[tuple[Metric, int]] = []
        if self.usd is not None:
            out.append(("usd", usd_to_micros(self.usd)))
        if self.tokens is not None:
            out.append(("tokens", self.tokens))
        return out


class BudgetConfig(_Frozen):
    """`budgets:` in the config file."""

    rules: tuple[BudgetRule, ...] = ()
    # The request header that names the CI pipeline (the `pipeline` scope).
    pipeline_header: str = Field(default="x-ci-pipeline-id", pattern=r"^[a-z0-9-]{1,64}$")
    reservation_ttl_seconds: float = Field(default=900.0, gt=0, le=86_400)
    hash_tag: str = "gateway"
    key_prefix: str = Field(default="gw", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    fail_open: bool = False

    @field_validator("hash_tag")
    @classmethod
    def _tag(cls, value: str) -> str:
        if not _TAG.match(value):
            raise ValueError("hash_tag: 1-64 letters, digits, '_', '.' or '-' (no braces)")
        return value

    @model_validator(mode="after")
    def _unique(self) -> BudgetConfig:
        seen: set[tuple[str, str, str]] = set()
        for rule in self.rules:
            ident = (rule.scope, rule.id, rule.window_label)
            if ident in seen:
                raise ValueError(f"two rules for {rule.scope} {rule.id!r} {rule.window_label}")
            seen.add(ident)
        return self


# ---- values -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scope:
    kind: ScopeKind
    id: str


@slot_init
@dataclass(frozen=True, slots=True)
class Amount:
    """What a request costs or may cost: micro-USD and tokens (both >= 0)."""

    usd_micros: int = 0
    tokens: int = 0

    def __post_init__(self) -> None:
        if self.usd_micros < 0 or self.tokens < 0:
            raise ValueError("amounts are never negative")

    def of(self, metric: Metric) -> int:
        return self.usd_micros if metric == "usd" else self.tokens

    @classmethod
    def of_usage(cls, usage: Usage, price: Price) -> Amount:
        """The actual amount of a finished call: its cost and all of its tokens."""
        return cls(cost_micros(usage, price), usage.total_tokens)


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """One rule applied to one scope of the request."""

    rule: BudgetRule
    scope: Scope
    # The rule's label, read once: a pydantic attribute read costs ~10x a plain one,
    # and the checks are made once per set of scopes (`checks_for`), the label read per request.
    label: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.rule.label)


@dataclass(frozen=True, slots=True)
class Window:
    """Where a rule's counter lives at one moment (pure calendar arithmetic)."""

    suffix: str
    bucket: str
    buckets: tuple[str, ...]
    resets_at: float | None
    expires_at: float | None
    prune_before: str | None = None


@slot_init
@dataclass(frozen=True, slots=True)
class BudgetLine:
    """One counter of a reservation: check, metric, window and the store hold."""

    check: BudgetCheck
    metric: Metric
    window: Window
    hold: Hold

    @property
    def limit(self) -> int:
        return self.hold.counter.limit


@slot_init
@dataclass(frozen=True, slots=True)
class HoldPlan:
    """A reservation about to be held: its lines, record key and expiries."""

    request_id: str
    record_key: str
    lines: tuple[BudgetLine, ...]
    amount: Amount
    now: float
    ttl: float

    @property
    def holds(self) -> list[Hold]:
        return [line.hold for line in self.lines]

    @property
    def until(self) -> float:
        return self.now + self.ttl

    @property
    def record_ttl(self) -> float:
        return self.ttl + RECORD_GRACE_SECONDS


@slot_init
@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A counter's state for headers and admin: `used` includes live holds."""

    budget: str
    scope: Scope
    metric: Metric
    limit: int
    used: int
    resets_at: float | None

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)


@slot_init
@dataclass(frozen=True, slots=True)
class Reservation:
    """Held budget for one request; pass it to `settle` or `release` exactly once."""

    request_id: str
    lines: tuple[BudgetLine, ...]
    amount: Amount
    expires_at: float
    statuses: tuple[BudgetStatus, ...] = ()
    degraded: bool = False  # store was down and fail_open let the request through


@dataclass(frozen=True, slots=True)
class Denied:
    """The first budget the request would exceed; enough for a 429 and its headers."""

    budget: str
    scope: Scope
    metric: Metric
    limit: int
    used: int
    requested: int
    resets_at: float | None
    now: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    @property
    def retry_after(self) -> int | None:
        """Whole seconds until the window resets; None for lifetime budgets."""
        if self.resets_at is None:
            return None
        return max(1, math.ceil(self.resets_at - self.now))

    def message(self) -> str:
        unit = _fmt_amount(self.metric, self.limit)
        left = _fmt_amount(self.metric, self.remaining)
        when = "never resets" if self.resets_at is None else f"resets at {_iso(self.resets_at)}"
        return f"budget {self.budget} ({unit}) has {left} left for this request; it {when}"


class DuplicateReservation(ValueError):
    """A reservation with this request id exists already; request ids must be unique."""


def _fmt_amount(metric: Metric, value: int) -> str:
    if metric == "usd":
        return f"${micros_to_usd(value):.2f}"
    return f"{value} tokens"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- windows ------------------------------------------------------------------------------


def _midnight(day: date) -> float:
    return calendar.timegm(day.timetuple())


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def window_for(rule: BudgetRule, now: float, hold_seconds: float) -> Window:
    """The counter suffix, buckets and reset time of `rule` at `now` (UTC).

    Every field depends only on the UTC day of `now`, so callers may cache by day.
    """
    today = datetime.fromtimestamp(now, UTC).date()
    slack = hold_seconds + KEY_GRACE_SECONDS
    if rule.window == "daily":
        resets = _midnight(today + timedelta(days=1))
        return Window(f"d{today:%Y%m%d}", "s", ("s",), resets, resets + slack)
    if rule.window == "monthly":
        resets = _midnight(_next_month(today))
        return Window(f"m{today:%Y%m}", "s", ("s",), resets, resets + slack)
    if rule.window == "lifetime":
        return Window("life", "s", ("s",), None, None)
    return _rolling(rule.days or 1, today, slack)


def _rolling(days: int, today: date, slack: float) -> Window:
    buckets = tuple(f"s:{today - timedelta(days=n):%Y%m%d}" for n in range(days))
    resets = _midnight(today + timedelta(days=1))
    return Window(
        f"r{days}d", buckets[0], buckets, resets, resets + days * DAY + slack, buckets[-1]
    )


_SAFE = re.compile(r"[A-Za-z0-9_.@~+=-]*")


def _enc(value: str) -> str:
    """Percent-encode `value` for a key; ids made of safe characters only (request ids
    are) pass as they are without `quote`'s cost, which is paid per request."""
    if _SAFE.fullmatch(value):
        return value
    return quote(value, safe="-_.@~+=")


# ---- the ledger ---------------------------------------------------------------------------


class BudgetLedger:
    """Budgets over a `Store`; time comes from the store's clock."""

    def __init__(self, config: BudgetConfig, store: Store) -> None:
        self._config = config
        self._store = store
        self._clock = store.clock  # (read per request: a plain copy)
        self._ttl = config.reservation_ttl_seconds
        self._hash_tag = config.hash_tag  # (read per request: a plain copy)
        self._base = f"{config.key_prefix}:b:{{{config.hash_tag}}}"
        self._rules: dict[str, list[BudgetRule]] = {}
        for rule in config.rules:
            self._rules.setdefault(rule.scope, []).append(rule)
        # keyed by the check's id: hashing a pydantic rule field by field, or even a Scope
        # (a Python-level __hash__), cost microseconds on every request; `checks_for` hands
        # out the same checks request after request, and the entry keeps its check, so an
        # id is never mistaken for another's
        self._memo: dict[
            tuple[int, int], tuple[BudgetCheck, list[tuple[Metric, Window, Counter]]]
        ] = {}
        self._checks: dict[tuple[Scope, ...], list[BudgetCheck]] = {}

    def checks_for(self, scopes: Iterable[Scope]) -> list[BudgetCheck]:
        """The rules that apply to these scopes; a specific id beats `*` per window.
        Memoized by the scopes: the rules are fixed, and reading their pydantic fields
        cost microseconds on every request."""
        key = tuple(scopes)
        found = self._checks.get(key)
        if found is None:
            if len(self._checks) >= MEMO_LIMIT:
                self._checks.clear()
            found = self._checks[key] = self._checks_of(key)
        return list(found)

    def _checks_of(self, scopes: Iterable[Scope]) -> list[BudgetCheck]:
        out: list[BudgetCheck] = []
        for scope in dict.fromkeys(scopes):
            rules = self._rules.get(scope.kind, [])
            specific = [r for r in rules if r.id == scope.id]
            taken = {r.window_label for r in specific}
            wild = [r for r in rules if r.id == "*" and r.window_label not in taken]
            out += [BudgetCheck(r, scope) for r in specific + wild]
        return out

    def counter_key(self, check: BudgetCheck, metric: Metric, window: Window) -> str:
        tag = "usd" if metric == "usd" else "tok"
        scope = check.scope
        return f"{self._base}:{scope.kind}:{_enc(scope.id)}:{tag}:{window.suffix}"

    def record_key(self, request_id: str) -> str:
        return f"{self._base}:res:{_enc(request_id)}"

    def lines(self, checks: Sequence[BudgetCheck], amount: Amount, now: float) -> list[BudgetLine]:
        """One line per (check, metric) with the counter it uses at `now`."""
        day = int(now // DAY)
        usd, tokens = amount.usd_micros, amount.tokens  # (= amount.of(metric), inlined)
        return [
            BudgetLine(check, metric, window, Hold(counter, usd if metric == "usd" else tokens))
            for check in checks
            for metric, window, counter in self._counters_of(check, day)
        ]

    def _counters_of(self, check: BudgetCheck, day: int) -> list[tuple[Metric, Window, Counter]]:
        """The counters of one check on one UTC day; memoized (windows change daily)."""
        memo = (id(check), day)
        entry = self._memo.get(memo)
        if entry is None or entry[0] is not check:  # (an id reused by another check)
            if len(self._memo) >= MEMO_LIMIT:
                self._memo.clear()
            window = window_for(check.rule, day * DAY, self._ttl)
            found = [
                (metric, window, self._counter(check, metric, window, limit))
                for metric, limit in check.rule.limits()
            ]
            entry = self._memo[memo] = (check, found)
        return entry[1]

    def _counter(self, check: BudgetCheck, metric: Metric, window: Window, limit: int) -> Counter:
        return Counter(
            key=self.counter_key(check, metric, window),
            bucket=window.bucket,
            window=window.buckets,
            limit=limit,
            expires_at=window.expires_at,
            prune_before=window.prune_before,
        )

    @property
    def hash_tag(self) -> str:
        return self._hash_tag

    @property
    def fail_open(self) -> bool:
        return self._config.fail_open

    def plan(self, request_id: str, checks: Sequence[BudgetCheck], amount: Amount) -> HoldPlan:
        """Everything a hold needs, computed without I/O (for `reserve` or a combined admit)."""
        now = self._clock.time()
        lines = tuple(self.lines(checks, amount, now))
        return HoldPlan(request_id, self.record_key(request_id), lines, amount, now, self._ttl)

    def outcome(self, plan: HoldPlan, result: HoldResult) -> Reservation | Denied:
        """Turn the store's verdict on `plan` into a reservation or a denial."""
        if result.duplicate:
            raise DuplicateReservation(f"request id {plan.request_id!r} already holds budget")
        if not result.ok:
            assert result.failed is not None
            return _denied(plan.lines[result.failed], result.used[-1], plan.now)
        statuses = tuple(  # (= _status per line, written out: this runs per request)
            [
                BudgetStatus(
                    line.check.label,
                    line.check.scope,
                    line.metric,
                    line.hold.counter.limit,
                    used + line.hold.amount,
                    line.window.resets_at,
                )
                for line, used in zip(plan.lines, result.used, strict=True)
            ]
        )
        return Reservation(plan.request_id, plan.lines, plan.amount, plan.until, statuses)

    @staticmethod
    def empty(plan: HoldPlan, *, degraded: bool = False) -> Reservation:
        """A reservation that holds nothing (no rules apply, or the store is down)."""
        return Reservation(plan.request_id, (), plan.amount, plan.until, degraded=degraded)

    async def reserve(
        self, request_id: str, checks: Sequence[BudgetCheck], amount: Amount
    ) -> Reservation | Denied:
        """Hold `amount` on every counter of `checks`, all or nothing, in one round trip.

        Raises `DuplicateReservation` for a reused request id and `StoreUnavailable`
        when the store is down (unless `fail_open`, which admits the request with a
        `degraded` reservation that records nothing).
        """
        plan = self.plan(request_id, checks, amount)
        if not plan.lines:
            return self.empty(plan)
        try:
            result = await self._store.hold(
                request_id,
                plan.record_key,
                plan.holds,
                until=plan.until,
                record_ttl=plan.record_ttl,
            )
        except StoreUnavailable:
            if not self._config.fail_open:
                raise
            return self.empty(plan, degraded=True)
        return self.outcome(plan, result)

    async def settle(
        self, reservation: Reservation, actual: Amount, debit: Sequence[RateItem] = ()
    ) -> SettleOutcome:
        """Replace the holds by `actual` (may exceed the estimate); idempotent. `debit`:
        rate items (the token limits' correction) charged in the same store call, once;
        they need this ledger's hash tag and a reservation with lines."""
        return await self._finish(reservation, actual, release=False, debit=debit)

    async def release(self, reservation: Reservation) -> SettleOutcome:
        """Drop the holds without charging anything (the call never spent)."""
        return await self._finish(reservation, Amount(), release=True)

    async def _finish(
        self,
        reservation: Reservation,
        actual: Amount,
        *,
        release: bool,
        debit: Sequence[RateItem] = (),
    ) -> SettleOutcome:
        if not reservation.lines:
            if debit:
                raise ValueError("a debit travels with a settle that holds lines")
            return SettleOutcome.SETTLED
        usd, tokens = actual.usd_micros, actual.tokens  # (= actual.of(metric), inlined)
        lines = reservation.lines
        return await self._store.settle(
            reservation.request_id,
            self.record_key(reservation.request_id),
            [line.hold for line in lines],
            [usd if line.metric == "usd" else tokens for line in lines],
            record_ttl=RECORD_GRACE_SECONDS,
            release=release,
            debit=debit,
        )

    async def status(self, scopes: Iterable[Scope]) -> list[BudgetStatus]:
        """Current usage (settled + live holds) of every budget of these scopes."""
        now = self._clock.time()
        lines = self.lines(self.checks_for(scopes), Amount(), now)
        used = await self._store.usage([line.hold.counter for line in lines])
        return [_status(line, u) for line, u in zip(lines, used, strict=True)]


def _status(line: BudgetLine, used: int) -> BudgetStatus:
    check = line.check
    return BudgetStatus(
        check.label, check.scope, line.metric, line.limit, used, line.window.resets_at
    )


def _denied(line: BudgetLine, used: int, now: float) -> Denied:
    check = line.check
    return Denied(
        check.label,
        check.scope,
        line.metric,
        line.limit,
        used,
        line.hold.amount,
        line.window.resets_at,
        now,
    )
