"""The report's pure core: audit records in, one `Summary` out (no I/O).

Spend is the settled `cost_usd` of each record; savings are `cost_saved_usd`, what a
cache hit would have cost upstream. A record's scopes are its `scopes` (key, user,
team, project, pipeline, as the budget saw them), falling back to the identity fields
for records written without a budget run.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SCOPES = ("key", "user", "team", "project", "pipeline")
_IDENTITY_FIELD = {"key": "key_id", "user": "user", "team": "team", "project": "project"}


@dataclass
class Tally:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0
    cache_hits: int = 0

    def add(self, record: Mapping[str, Any]) -> None:
        self.requests += 1
        self.input_tokens += _int(record.get("input_tokens"))
        self.output_tokens += _int(record.get("output_tokens"))
        self.cost_usd += _float(record.get("cost_usd"))
        self.saved_usd += _float(record.get("cost_saved_usd"))
        self.cache_hits += record.get("outcome") == "cache_hit"


@dataclass
class Summary:
    since: dt.datetime
    until: dt.datetime
    bucket: str
    only: Mapping[str, str] = field(default_factory=dict)
    total: Tally = field(default_factory=Tally)
    by_scope: dict[str, dict[str, Tally]] = field(
        default_factory=lambda: {kind: defaultdict(Tally) for kind in SCOPES}
    )
    by_model: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    by_session: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    by_time: dict[dt.datetime, Tally] = field(default_factory=lambda: defaultdict(Tally))
    outcomes: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)
    guard_hits: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)

    def add(self, record: Mapping[str, Any]) -> None:
        self.total.add(record)
        for kind in SCOPES:
            scope = scope_of(record, kind)
            if scope is not None:
                self.by_scope[kind][scope].add(record)
        self.by_model[str(record.get("served_model") or record.get("requested_model") or "-")].add(
            record
        )
        if record.get("session_id"):
            self.by_session[str(record["session_id"])].add(record)
        self.by_time[bucket_start(record_time(record), self.bucket)].add(record)
        outcome = str(record.get("outcome") or "unknown")
        self.outcomes[outcome] += 1
        if outcome.startswith("rejected_"):
            self.rejections[outcome.removeprefix("rejected_")] += 1
        if record.get("cache"):
            self.cache[str(record["cache"])] += 1
        self._guard(record.get("guard"))

    def _guard(self, guard: Any) -> None:
        if not isinstance(guard, Mapping):
            return
        for direction in ("input", "output"):
            for verdict in guard.get(direction) or ():
                if isinstance(verdict, Mapping):
                    key = (direction, str(verdict.get("rule")), str(verdict.get("action")))
                    self.guard_hits[key] += _int(verdict.get("count")) or 1
        injection = guard.get("injection")
        if isinstance(injection, Mapping):
            for rule in injection.get("rules") or ():
                self.guard_hits[("injection", str(rule), str(injection.get("action")))] += 1

    def top(self, table: Mapping[str, Tally], n: int) -> list[tuple[str, Tally]]:
        """The `n` most expensive entries (by cost, then requests)."""
        ranked = sorted(table.items(), key=lambda kv: (-kv[1].cost_usd, -kv[1].requests, kv[0]))
        return ranked[:n]

    def timeline(self) -> list[tuple[dt.datetime, Tally]]:
        """Every bucket of the window in order, empty ones included."""
        step = dt.timedelta(hours=1) if self.bucket == "hour" else dt.timedelta(days=1)
        start = bucket_start(self.since, self.bucket)
        end = self.until
        if self.by_time:
            start = min(start, min(self.by_time))
        points: list[tuple[dt.datetime, Tally]] = []
        while start < end and len(points) < 10_000:
            points.append((start, self.by_time.get(start, Tally())))
            start += step
        return points

    @property
    def cache_hit_ratio(self) -> float | None:
        looked_up = sum(self.cache.values())
        return self.cache.get("hit", 0) / looked_up if looked_up else None


def ranked(counter: Counter[Any], limit: int | None = None) -> list[tuple[Any, int]]:
    """Most frequent first; ties by name, so the order does not depend on record order."""
    return sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))[:limit]


def scope_of(record: Mapping[str, Any], kind: str) -> str | None:
    scopes = record.get("scopes")
    if isinstance(scopes, Mapping) and scopes.get(kind):
        return str(scopes[kind])
    name = _IDENTITY_FIELD.get(kind)
    value = record.get(name) if name else None
    return str(value) if value else None


def record_time(record: Mapping[str, Any]) -> dt.datetime:
    value = record.get("time")
    stamp = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)


def bucket_start(when: dt.datetime, bucket: str) -> dt.datetime:
    when = when.astimezone(dt.UTC)
    if bucket == "hour":
        return when.replace(minute=0, second=0, microsecond=0)
    return when.replace(hour=0, minute=0, second=0, microsecond=0)


def summarize(
    records: Iterable[Mapping[str, Any]],
    since: dt.datetime,
    until: dt.datetime,
    bucket: str,
    only: Mapping[str, str] | None = None,
) -> Summary:
    """Aggregate the records whose time falls in [since, until) and whose scopes match
    every `only` entry (e.g. {"team": "search"})."""
    summary = Summary(since=since, until=until, bucket=bucket, only=dict(only or {}))
    for record in records:
        try:
            when = record_time(record)
        except (TypeError, ValueError):
            continue
        if since <= when < until and all(scope_of(record, k) == v for k, v in summary.only.items()):
            summary.add(record)
    return summary


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _float(value: Any) -> float:
    if isinstance(value, bool) or value is None:
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
