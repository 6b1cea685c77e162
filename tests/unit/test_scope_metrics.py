"""Per-scope spend and token counters: what they count and how their labels stay bounded."""

from __future__ import annotations

from prometheus_client import generate_latest

from extproc.apis.usage import Usage
from extproc.telemetry.labels import LabelBounds
from extproc.telemetry.metrics import SCOPE_IDS_PER_KIND, Metrics


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value


def test_spend_and_tokens_are_counted_per_scope() -> None:
    metrics = Metrics()
    metrics.bounds = LabelBounds(pipelines=frozenset({"ci-42"}))  # a budget rule names it
    usage = Usage(input_tokens=10, output_tokens=4, cache_read_input_tokens=2)
    scopes = {"key": "k1", "team": "core", "pipeline": "ci-42"}
    metrics.count_scopes(scopes, usage, 0.25)
    metrics.count_scopes(scopes, usage, 0.25)
    assert _sample(metrics, "extproc_scope_spend_usd_total", scope="team", id="core") == 0.5
    assert _sample(metrics, "extproc_scope_spend_usd_total", scope="pipeline", id="ci-42") == 0.5
    tokens = "extproc_scope_tokens_total"
    assert _sample(metrics, tokens, scope="key", id="k1", type="input") == 20
    assert _sample(metrics, tokens, scope="key", id="k1", type="cache_read") == 4
    assert _sample(metrics, tokens, scope="key", id="k1", type="cache_creation") is None


def test_ids_past_the_cap_are_counted_as_other() -> None:
    metrics = Metrics()
    for n in range(SCOPE_IDS_PER_KIND + 20):
        metrics.count_scopes({"user": f"p{n}"}, Usage(output_tokens=1), 0.01)
    metrics.count_scopes({"user": "p0"}, Usage(output_tokens=1), 0.01)  # known: kept
    metrics.count_scopes({"team": "t-new"}, Usage(output_tokens=1), 0.01)  # another kind
    exposed = generate_latest(metrics.registry).decode()
    users = {
        line.split('id="', 1)[1].split('"', 1)[0]
        for line in exposed.splitlines()
        if line.startswith("extproc_scope_spend_usd_total{") and 'scope="user"' in line
    }
    assert len(users) == SCOPE_IDS_PER_KIND + 1
    assert "other" in users
    spend = "extproc_scope_spend_usd_total"
    assert round(_sample(metrics, spend, scope="user", id="other") or 0, 6) == 0.2
    assert round(_sample(metrics, spend, scope="user", id="p0") or 0, 6) == 0.02
    assert _sample(metrics, spend, scope="team", id="t-new") == 0.01


def test_pipeline_ids_from_a_header_are_labels_only_when_configured() -> None:
    """A caller chooses its pipeline header: an id no budget rule names is `other`."""
    metrics = Metrics()
    metrics.bounds = LabelBounds(pipelines=frozenset({"release"}))
    for n in range(50):
        metrics.count_scopes({"pipeline": f"random-{n}"}, Usage(output_tokens=1), 0.01)
    metrics.count_scopes({"pipeline": "release"}, Usage(output_tokens=1), 0.01)
    spend = "extproc_scope_spend_usd_total"
    assert round(_sample(metrics, spend, scope="pipeline", id="other") or 0, 6) == 0.5
    assert _sample(metrics, spend, scope="pipeline", id="release") == 0.01
    assert "random-" not in generate_latest(metrics.registry).decode()
