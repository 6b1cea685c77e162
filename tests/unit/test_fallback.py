"""Fallback chains: config validation, the attempts report, the rendered Envoy parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extproc import envoy_config, supervisor
from extproc.apis.usage import Usage
from extproc.config import ConfigError, FallbackStep, load_config, parse_config
from extproc.decisions import CONTINUE, Continue
from extproc.fallback import (
    ATTEMPTS_HEADER,
    Attempt,
    AttemptLog,
    AttemptStream,
    chain_cluster,
    decode_attempts,
    encode_attempts,
    fallback_reason,
)
from extproc.policies.auth import Identity
from extproc.policies.budget.spending import Spending
from extproc.policies.pricing import cost_micros, estimate_micros, micros_to_usd
from extproc.policies.profiles import ProfileResolver
from extproc.store.memory import MemoryStore
from extproc.telemetry.metrics import Metrics
from extproc.upstream.credentials import StaticKey
from extproc.upstream.translate import _TRANSLATORS, register_translator

PROVIDERS = {
    "a": {"api": "anthropic", "base_url": "https://api.anthropic.com"},
    "b": {"api": "anthropic", "base_url": "http://10.0.0.2:8000"},
    "o": {"api": "openai", "base_url": "https://api.openai.com"},
}
CHAIN = (FallbackStep(provider="a"), FallbackStep(provider="b", model="claude-haiku-4-5"))


def _config(fallback: Any, **profile: Any) -> dict[str, Any]:
    return {"providers": PROVIDERS, "profiles": {"default": {"fallback": fallback, **profile}}}


@pytest.mark.parametrize(
    ("fallback", "profile", "message"),
    [
        (["a"], {}, "at least two providers"),
        (["a", "b", "a"], {}, "in the chain twice"),
        (["a", "zz"], {}, "'zz' is not declared under providers"),
        (["a", "o"], {}, "mixes anthropic and openai providers"),
        (["a", "b"], {"provider": "a"}, "set provider or fallback, not both"),
        (["a", "b", "a", "b", "a"], {}, "at most 4"),
    ],
)
def test_bad_chains_are_refused_at_start(
    fallback: list[str], profile: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_config(fallback, **profile))


def test_a_chain_step_is_a_name_or_a_provider_and_model() -> None:
    config = parse_config(_config(["a", {"provider": "b", "model": "claude-haiku-4-5"}]))
    assert config.profiles["default"].fallback == CHAIN


def test_route_metadata_cannot_change_the_chain() -> None:
    resolver = ProfileResolver(parse_config(_config(["a", "b"])))
    with pytest.raises(Exception, match="fallback cannot be set in route metadata"):
        resolver.resolve({"fallback": ["b", "a"]}, "r")


@pytest.mark.parametrize(
    ("status", "reason"),
    [(0, "unavailable"), (429, "rate_limited"), (529, "overloaded"), (502, "server_error")],
)
def test_fallback_reasons(status: int, reason: str) -> None:
    assert fallback_reason(status) == reason


def test_attempts_round_trip_and_unseen_positions_are_filled() -> None:
    # Attempt 0 never reached an upstream filter (connection refused): only 1 reported.
    value = encode_attempts([Attempt(1, "b", "claude-haiku-4-5", 200, 3.5)])
    attempts = decode_attempts(value, CHAIN)
    assert attempts == [
        Attempt(0, "a", None, 0, None),
        Attempt(1, "b", "claude-haiku-4-5", 200, 3.5),
    ]


@pytest.mark.parametrize("value", ["", "nonsense", '[[5, "b", null, 200, 1]]', "[[9,1]]", "{}"])
def test_a_malformed_or_foreign_report_yields_no_attempts(value: str) -> None:
    assert decode_attempts(value, CHAIN) == []


def test_attempt_log_is_bounded_and_keeps_one_per_position() -> None:
    log = AttemptLog(size=2)
    log.add("r1", Attempt(0, "a", None, 529, 1.0))
    assert log.add("r1", Attempt(1, "b", None, 200, 2.0))[0].status == 529
    log.add("r2", Attempt(0, "a", None, 0, 1.0))
    log.add("r3", Attempt(0, "a", None, 0, 1.0))
    assert log.add("r1", Attempt(1, "b", None, 200, 2.0)) == [Attempt(1, "b", None, 200, 2.0)]


def test_render_builds_a_composite_cluster_per_chain() -> None:
    config = parse_config(_config(["a", {"provider": "b", "model": "claude-haiku-4-5"}]))
    template = envoy_config.load_template(envoy_config.template_path(config))
    bootstrap = envoy_config.render(config, template)
    name = chain_cluster(CHAIN)
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    composite = clusters[name]
    assert composite["cluster_type"]["typed_config"]["clusters"] == [
        {"name": f"{name}_0"},
        {"name": f"{name}_1"},
    ]
    options = composite["typed_extension_protocol_options"][envoy_config._PROTOCOL]
    attempt_filter = options["http_filters"][0]["typed_config"]
    assert attempt_filter["request_attributes"] == ["xds.upstream_host_metadata"]
    assert attempt_filter["grpc_service"]["initial_metadata"][0]["key"] == "x-gateway-attempt"
    endpoint = clusters[f"{name}_1"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["metadata"]["filter_metadata"]["extproc"] == {
        "provider": "b",
        "model": "claude-haiku-4-5",
        "position": 1,
    }
    assert clusters[f"{name}_1"]["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["name"] for r in routes[:2]] == [name, "dispatch"]
    retry = routes[0]["route"]["retry_policy"]
    assert retry["num_retries"] == 1
    assert retry["retriable_status_codes"] == [429, 529]
    assert "per_try_timeout" in retry  # the first-byte timeout still bounds each attempt


def test_render_without_chains_is_unchanged() -> None:
    config = parse_config({"providers": PROVIDERS})
    template = envoy_config.load_template(envoy_config.template_path(config))
    names = [
        c["name"] for c in envoy_config.render(config, template)["static_resources"]["clusters"]
    ]
    assert not [n for n in names if n.startswith("fallback_")]


async def test_budget_is_reserved_once_at_the_dearest_and_settled_at_the_answerer() -> None:
    config = parse_config(
        {
            "providers": PROVIDERS,
            "budgets": {"rules": [{"scope": "key", "id": "k", "window": "daily", "usd": 100}]},
        }
    )
    store = MemoryStore()
    spending = Spending(config, store, Metrics())
    identity = Identity(source="key", key_id="k")
    run = spending.start("r1", "claude-haiku-4-5", identity, {}, None)
    spending.may_serve(run, ["claude-haiku-4-5", "claude-opus-4-8", "claude-sonnet-4-6"])
    body = {"model": "claude-haiku-4-5", "max_tokens": 1000, "messages": []}
    await spending.admit(run, body, input_tokens=250)
    assert run.reservation is not None
    opus, sonnet = (
        spending.prices.find("claude-opus-4-8"),
        spending.prices.find("claude-sonnet-4-6"),
    )
    assert opus is not None
    assert sonnet is not None
    dearest = estimate_micros(opus, input_tokens=run.estimate_tokens, max_output_tokens=1000)
    assert run.reservation.amount.usd_micros == dearest  # one hold, covering any answerer
    spending.serve(run, "claude-sonnet-4-6")  # the second provider answered
    usage = Usage(input_tokens=100, output_tokens=50)
    await spending.settle(run, usage)
    assert run.cost_usd == micros_to_usd(cost_micros(usage, sonnet))
    assert run.model == "claude-sonnet-4-6"


def test_the_example_chain_renders_a_bootstrap_envoy_accepts() -> None:
    config = load_config(Path(__file__).parents[2] / "examples" / "fallback.yaml")
    assert [s.provider for s in config.profiles["default"].fallback] == ["anthropic", "backup"]
    assert supervisor.validate_envoy(config) == []


def _attempt(credentials: dict[str, Any] | None = None) -> tuple[AttemptStream, AttemptLog]:
    config = parse_config(_config(["a", "b"]))
    log = AttemptLog()
    times = iter([10.0, 10.25])
    return AttemptStream(config, credentials or {}, log, clock=lambda: next(times)), log


class _Secret:
    def __init__(self, value: str) -> None:
        self.value = value

    def get(self) -> str:
        return self.value


HOST_B = {"provider": "b", "model": "claude-haiku-4-5", "position": 1.0}
REQUEST = {":path": "/v1/messages", "x-request-id": "r1", "x-gateway-client-api": "anthropic"}


async def test_an_attempt_gets_its_providers_credential_and_model() -> None:
    attempt, _ = _attempt({"b": StaticKey(_Secret("sk-b"), "x-api-key")})  # type: ignore[arg-type]
    assert attempt.request_headers(REQUEST, HOST_B) == CONTINUE
    decision = await attempt.request_body(b'{"model": "claude-sonnet-4-6", "max_tokens": 5}')
    assert isinstance(decision, Continue)
    assert ("x-api-key", "sk-b") in decision.headers.set
    assert "x-gateway-client-api" in decision.headers.remove
    assert "content-length" in decision.headers.remove  # the body changed: its model
    assert decision.body == b'{"model":"claude-haiku-4-5","max_tokens":5}'


async def test_a_later_attempt_without_a_gateway_credential_drops_the_callers_key() -> None:
    attempt, _ = _attempt()
    attempt.request_headers(REQUEST, HOST_B)
    decision = await attempt.request_body(b'{"model": "claude-sonnet-4-6"}')
    assert isinstance(decision, Continue)
    assert {"x-api-key", "authorization"} <= set(decision.headers.remove)


class _Marker:
    """A translator that marks what it translated (the translator slot's protocol)."""

    def request(self, body: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
        return {**body, "translated": True}, "/v1/messages"

    def answer(self, body: Any, status: int) -> dict[str, Any]:
        return dict(body)

    def stream(self) -> Any:
        raise NotImplementedError


async def test_an_attempt_at_another_shape_uses_the_registered_translator() -> None:
    attempt, _ = _attempt()
    registered = _TRANSLATORS.get(("openai", "anthropic"))  # the real pair (extproc.translate)
    register_translator("openai", "anthropic", _Marker())
    try:
        headers = {**REQUEST, ":path": "/v1/chat/completions", "x-gateway-client-api": "openai"}
        attempt.request_headers(headers, HOST_B)
        decision = await attempt.request_body(b'{"model": "gpt-5"}')
    finally:
        _TRANSLATORS.pop(("openai", "anthropic"), None)
        if registered is not None:
            _TRANSLATORS[("openai", "anthropic")] = registered
    assert isinstance(decision, Continue)
    assert decision.body == b'{"model":"claude-haiku-4-5","translated":true}'
    assert (":path", "/v1/messages") in decision.headers.set


def test_the_answering_attempt_reports_every_attempt() -> None:
    attempt, log = _attempt()
    log.add("r1", Attempt(0, "a", None, 529, 3.0))
    attempt.request_headers(REQUEST, HOST_B)
    decision = attempt.response_headers({":status": "200"})
    assert isinstance(decision, Continue)
    ((name, value),) = decision.headers.set
    assert name == ATTEMPTS_HEADER
    chain = parse_config(_config(["a", "b"])).profiles["default"].fallback
    assert [(a.provider, a.status, a.latency_ms) for a in decode_attempts(value, chain)] == [
        ("a", 529, 3.0),
        ("b", 200, 250.0),
    ]
    attempt.close()  # answered: nothing more is logged
    assert len(log.add("r1", Attempt(2, "x", None, 0, None))) == 3


def test_an_attempt_that_never_got_an_answer_is_logged_as_status_0() -> None:
    attempt, log = _attempt()
    attempt.request_headers(REQUEST, HOST_B)
    attempt.close()
    assert log.add("r1", Attempt(0, "a", None, 0, None))[1].status == 0


async def test_an_attempt_without_chain_metadata_passes_unchanged() -> None:
    attempt, _ = _attempt()
    assert attempt.request_headers(REQUEST, {}) == CONTINUE
    assert await attempt.request_body(b"{}") == CONTINUE
    assert attempt.response_headers({":status": "200"}) == CONTINUE
