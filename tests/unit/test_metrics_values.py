"""The loop-only metric classes expose exactly what prometheus_client's own would.

`LoopCounter` and `LoopHistogram` keep plain floats instead of locked values (one event
loop thread updates them); /metrics must not tell the difference: same names, HELP,
TYPE, labels, buckets, `_created`, values.
"""

from __future__ import annotations

import math
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from extproc.apis.usage import Usage
from extproc.telemetry.labels import LabelBounds
from extproc.telemetry.metrics import LoopCounter, LoopGauge, LoopHistogram, Metrics

_BUCKETS = (0.005, 0.01, 0.5, 1, 60)
_AMOUNTS = (0, 0.005, 0.0051, 0.01, 0.3, 1, 1.0000001, 60, 61, 1e9, math.inf, -2.0, math.nan)


def _exposition(
    counter_class: type[Counter], histogram_class: type[Histogram], gauge_class: type[Gauge]
) -> bytes:
    registry = CollectorRegistry()
    active = gauge_class("g", "A gauge.", registry=registry, multiprocess_mode="livesum")
    recent = gauge_class("r", "Last.", ["b"], registry=registry, multiprocess_mode="mostrecent")
    active.inc()
    active.inc(2.5)
    active.dec()
    recent.labels("x").set(7)
    recent.labels("y").set(0.1)
    recent.labels("x").set(3)
    counter = counter_class("c", "A counter.", ["a", "b"], registry=registry)
    plain = counter_class("p", "No labels.", registry=registry)
    histogram = histogram_class("h", "A histogram.", ["x"], buckets=_BUCKETS, registry=registry)
    counter_class("unused", "Never incremented.", ["a"], registry=registry)
    for n, amount in enumerate(_AMOUNTS):
        if amount >= 0 and not math.isnan(amount):
            counter.labels(str(n % 3), "y").inc(amount)
            plain.inc()
        histogram.labels(str(n % 2)).observe(amount)
    return generate_latest(registry)


def test_loop_classes_expose_what_prometheus_client_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.25)  # the `_created` samples
    expected = _exposition(Counter, Histogram, Gauge)
    assert _exposition(LoopCounter, LoopHistogram, LoopGauge) == expected
    assert b"h_bucket" in expected
    assert b"c_created" in expected


def test_a_negative_increment_is_refused_as_before() -> None:
    counter = LoopCounter("c", "A counter.", ["a"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("x").inc(-1)


def test_a_mostrecent_gauge_still_refuses_inc_and_dec() -> None:
    gauge = LoopGauge("g", "A gauge.", registry=CollectorRegistry(), multiprocess_mode="mostrecent")
    with pytest.raises(RuntimeError, match="mostrecent"):
        gauge.inc()
    with pytest.raises(RuntimeError, match="mostrecent"):
        gauge.dec()


def test_the_gateway_metrics_use_plain_values_in_one_process() -> None:
    metrics = Metrics()
    assert isinstance(metrics.requests, LoopCounter)
    assert isinstance(metrics.latency, LoopHistogram)
    assert isinstance(metrics.budget_remaining, LoopGauge)
    metrics.child(metrics.latency, "anthropic", "messages", "False").observe(0.02)
    sample = metrics.registry.get_sample_value(
        "extproc_request_duration_seconds_bucket",
        {"api": "anthropic", "endpoint": "messages", "streamed": "False", "le": "0.025"},
    )
    assert sample == 1.0


def test_scope_ids_are_bounded_again_when_the_bounds_change() -> None:
    metrics = Metrics()
    metrics.bounds = LabelBounds(pipelines=frozenset({"ci-1"}))
    metrics.count_scopes({"pipeline": "ci-1"}, Usage(output_tokens=1), 0.5)
    metrics.bounds = LabelBounds()  # a new config that no longer names it
    metrics.count_scopes({"pipeline": "ci-1"}, Usage(output_tokens=1), 0.25)
    spend = "extproc_scope_spend_usd_total"
    assert metrics.registry.get_sample_value(spend, {"scope": "pipeline", "id": "ci-1"}) == 0.5
    assert metrics.registry.get_sample_value(spend, {"scope": "pipeline", "id": "other"}) == 0.25
