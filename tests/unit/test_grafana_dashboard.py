"""The Grafana dashboard only asks for metrics and labels the gateway emits.

Every panel's PromQL (and every template variable's `label_values`) is tokenised: each
metric name must be one the metrics module registers (with the suffix its type gets on
the wire: `_total`, `_bucket`/`_sum`/`_count`), each label in a matcher must be one of
that metric's labels, each label in `by (...)` one of the labels of the metrics the
query reads, and values of labels whose values are a closed set must be in that set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from extproc.telemetry.metrics import Metrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "extproc-dashboard.json"

FUNCTIONS = {
    "sum", "min", "max", "avg", "count", "topk", "bottomk", "quantile", "rate", "irate",
    "increase", "histogram_quantile", "clamp_min", "clamp_max", "abs", "delta", "deriv",
    "label_replace", "vector", "scalar", "time", "sort", "sort_desc", "avg_over_time",
    "max_over_time", "min_over_time", "sum_over_time", "absent",
}  # fmt: skip
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
KEYWORDS |= {"unless", "bool", "offset"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
# Labels whose values the gateway takes from a fixed set.
CLOSED_VALUES = {
    "scope": {"key", "user", "team", "project", "pipeline"},
    "result": {"hit", "miss", "bypass", "wait_timeout"},
    "type": {"input", "output", "cache_creation", "cache_read"},
    "direction": {"input", "injection", "output"},
    "action": {"redact", "block", "log", "mask", "strip"},
    "streamed": {"True", "False"},
    "endpoint": {"messages", "count_tokens", "models", "chat_completions", "quota"},
}

TOKEN = re.compile(
    r'\s*(?:(?P<string>"(?:[^"\\]|\\.)*")|(?P<range>\[[^\]]*\])|(?P<number>\d+(?:\.\d+)?)'
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>(){},]))"
)


def emitted() -> dict[str, set[str]]:
    """Exposed series name -> label names, from the metrics module's registry."""
    names: dict[str, set[str]] = {}
    for collector in vars(Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        (family,) = collector.describe()
        labels = set(collector._labelnames)  # the public API has no label-name accessor
        if family.type == "counter":
            names[f"{family.name}_total"] = labels
        elif family.type == "histogram":
            names[f"{family.name}_bucket"] = labels | {"le"}
            names[f"{family.name}_sum"] = names[f"{family.name}_count"] = labels
        else:
            names[family.name] = labels
    return names


def tokens(expr: str) -> list[tuple[str, str]]:
    # Grafana's variables: $__rate_interval etc. stand in ranges, $team in label values.
    expr = re.sub(r"\$__range|\$__rate_interval|\$__interval", "5m", expr)
    out: list[tuple[str, str]] = []
    position = 0
    while position < len(expr.rstrip()):
        match = TOKEN.match(expr, position)
        assert match is not None, f"cannot tokenise {expr[position:]!r} in {expr!r}"
        kind = match.lastgroup
        assert kind is not None
        out.append((kind, match.group(kind)))
        position = match.end()
    return out


@dataclass
class Query:
    metrics: list[str] = field(default_factory=list)
    # (metric, label, operator, value)
    matchers: list[tuple[str, str, str, str]] = field(default_factory=list)
    grouping: list[str] = field(default_factory=list)


def parse(expr: str) -> Query:
    query = Query()
    items = tokens(expr)
    i = 0
    while i < len(items):
        kind, text = items[i]
        following = items[i + 1][1] if i + 1 < len(items) else ""
        if kind != "ident":
            assert kind != "op" or text != "{", f"a selector without a metric name in {expr!r}"
            i += 1
        elif text in ("by", "without", "on", "ignoring"):
            i, labels = _label_list(items, i + 1, expr)
            query.grouping += labels
        elif following in ("(", "by", "without"):  # `sum by (x) (...)` or `sum(...) by (x)`
            assert text in FUNCTIONS, f"unknown function {text!r} in {expr!r}"
            i += 1
        elif text in KEYWORDS:
            i += 1
        else:
            query.metrics.append(text)
            i += 1
            if following == "{":
                i = _matchers(items, i + 1, text, query, expr)
    return query


def _label_list(items: list[tuple[str, str]], i: int, expr: str) -> tuple[int, list[str]]:
    assert items[i][1] == "(", f"expected a label list in {expr!r}"
    labels = []
    i += 1
    while items[i][1] != ")":
        if items[i][0] == "ident":
            labels.append(items[i][1])
        i += 1
    return i + 1, labels


def _matchers(items: list[tuple[str, str]], i: int, metric: str, query: Query, expr: str) -> int:
    while items[i][1] != "}":
        if items[i][1] == ",":
            i += 1
            continue
        (kind, label), (_, op), (value_kind, value) = items[i : i + 3]
        assert kind == "ident", f"bad matcher in {expr!r}"
        assert value_kind == "string", f"bad matcher in {expr!r}"
        query.matchers.append((metric, label, op, value[1:-1]))
        i += 3
    return i + 1


def panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", ()):
        yield panel
        yield from panels(panel)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def expressions() -> list[tuple[str, str]]:
    found = []
    for panel in panels(dashboard()):
        for target in panel.get("targets", ()):
            found.append((panel["title"], target["expr"]))
    return found


@pytest.mark.parametrize(("title", "expr"), expressions())
def test_panel_query_uses_emitted_metrics_and_labels(title: str, expr: str) -> None:
    known = emitted()
    query = parse(expr)
    assert query.metrics, f"{title}: no metric in {expr!r}"
    for metric in query.metrics:
        assert metric in known, f"{title}: {metric} is not emitted (known: {sorted(known)})"
    readable = set().union(*(known[m] for m in query.metrics)) | TARGET_LABELS
    for label in query.grouping:
        assert label in readable, f"{title}: `by ({label})` is not a label of {query.metrics}"
    for metric, label, op, value in query.matchers:
        assert label in known[metric] | TARGET_LABELS, f"{title}: {metric} has no label {label}"
        allowed = CLOSED_VALUES.get(label)
        if allowed is not None and "$" not in value:
            values = value.split("|") if op in ("=~", "!~") else [value]
            assert set(values) <= allowed, f"{title}: {label}={value!r} is never emitted"


def test_every_panel_has_a_query_and_ids_are_unique() -> None:
    data = dashboard()
    every = list(panels(data))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids))
    for panel in every:
        if panel["type"] not in ("row", "text"):
            assert panel.get("targets"), panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"


def test_template_variables_use_emitted_labels() -> None:
    known = emitted()
    variables = [v for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    assert variables
    for variable in variables:
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
        assert match is not None, variable["query"]
        metric, label = match.groups()
        assert label in known[metric], f"${variable['name']}: {metric} has no label {label}"


def test_dashboard_covers_what_the_issue_asks_for() -> None:
    text = " ".join(expr for _, expr in expressions())
    for needle in (
        "extproc_request_duration_seconds_bucket",
        "extproc_time_to_first_token_seconds_bucket",
        'scope="key"',
        'scope="user"',
        'scope="pipeline"',
        "by (team)",
        "by (model)",
        'result="hit"',
        "extproc_cache_saved_usd_total",
        "extproc_guard_findings_total",
        "extproc_budget_remaining",
        "extproc_gateway_errors_total",
    ):
        assert needle in text, needle


def test_the_parser_rejects_what_the_gateway_does_not_emit() -> None:
    known = emitted()
    query = parse('sum by (tenant) (rate(extproc_nope_total{scope="org"}[$__rate_interval]))')
    assert query.metrics == ["extproc_nope_total"]
    assert "extproc_nope_total" not in known
    assert query.grouping == ["tenant"]
    assert query.matchers == [("extproc_nope_total", "scope", "=", "org")]
    with pytest.raises(AssertionError):
        parse("frobnicate(extproc_requests_total)")
