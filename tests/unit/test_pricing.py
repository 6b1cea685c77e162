"""Pricing: shipped table, glob lookup, unknown-model rules, exact integer costs."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from extproc.apis.usage import Usage
from extproc.policies.pricing import (
    DEFAULT_PRICES,
    Price,
    PriceAs,
    PriceTable,
    PricingConfig,
    UnknownModel,
    cost_micros,
    cost_usd,
    estimate_micros,
    micros_to_usd,
    usd_to_micros,
)


def price(i: str, o: str, w: str, r: str) -> Price:
    return Price(input=Decimal(i), output=Decimal(o), cache_write=Decimal(w), cache_read=Decimal(r))


@pytest.mark.parametrize(
    ("model", "input_", "output"),
    [
        ("claude-opus-4-8", "5", "25"),
        ("claude-opus-4-5-20251101", "5", "25"),
        ("claude-opus-4-1", "15", "75"),
        ("claude-opus-4-1-20250805", "15", "75"),
        ("claude-opus-4-20250514", "15", "75"),
        ("claude-sonnet-4-6", "3", "15"),
        ("claude-sonnet-4-5-20250929", "3", "15"),
        ("claude-haiku-4-5", "1", "5"),
        ("claude-haiku-4-5-20251001", "1", "5"),
        ("gpt-5", "1.25", "10"),
        ("gpt-5-2025-08-07", "1.25", "10"),
        ("gpt-5-mini", "0.25", "2"),
        ("gpt-5-mini-2025-08-07", "0.25", "2"),
        ("gpt-4.1", "2", "8"),
        ("gpt-4o", "2.50", "10"),
        ("gpt-4o-2024-08-06", "2.50", "10"),
        ("gpt-4o-mini", "0.15", "0.60"),
        ("gpt-4o-mini-2024-07-18", "0.15", "0.60"),
    ],
)
def test_default_prices(model: str, input_: str, output: str) -> None:
    p = PriceTable.default().lookup(model)
    assert (p.input, p.output) == (Decimal(input_), Decimal(output))


def test_anthropic_cache_rates_follow_multipliers() -> None:
    for name, p in DEFAULT_PRICES.items():
        if name.startswith("claude-"):
            assert p.cache_write == p.input * Decimal("1.25"), name
            assert p.cache_read == p.input / 10, name


@pytest.mark.parametrize("model", ["claude-3-opus", "gpt-4", "", "GPT-4O", "llama-3"])
def test_unknown_models_are_refused(model: str) -> None:
    with pytest.raises(UnknownModel) as info:
        PriceTable.default().lookup(model)
    assert info.value.model == model


def test_unknown_models_priced_as() -> None:
    config = PricingConfig(unknown_models=PriceAs(price_as="claude-opus-4-1"))
    table = PriceTable.from_config(config)
    assert table.lookup("some-new-model").output == Decimal(75)
    assert table.find("some-new-model") is None


def test_most_specific_glob_wins() -> None:
    table = PriceTable(
        {
            "m-*": price("1", "1", "1", "1"),
            "m-big-*": price("9", "9", "9", "9"),
            "m-?": price("2", "2", "2", "2"),
        }
    )
    assert table.lookup("m-big-1").input == 9
    assert table.lookup("m-small").input == 1
    assert table.lookup("m-x").input == 2  # same literals as "m-*", but `?` is narrower


def test_config_merges_and_overrides_defaults() -> None:
    config = PricingConfig.model_validate(
        {"models": {"gpt-4o": {"input": 1, "output": 2, "cache_write": 1, "cache_read": 0.1}}}
    )
    table = PriceTable.from_config(config)
    assert table.lookup("gpt-4o").cache_read == Decimal("0.1")  # YAML floats stay exact decimals
    assert table.lookup("gpt-4o-mini").input == Decimal("0.15")
    bare = PriceTable.from_config(PricingConfig(include_defaults=False))
    with pytest.raises(UnknownModel):
        bare.lookup("gpt-4o")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"unknown_models": {"price_as": "nope"}}, "has no price"),
        ({"unknown_models": {"price_as": "gpt-*"}}, "not a pattern"),
        ({"unknown_models": "allow"}, "refuse"),
        (
            {"models": {"x": {"input": -1, "output": 1, "cache_write": 1, "cache_read": 1}}},
            "greater",
        ),
        ({"models": {"x": {"input": 1, "output": 1, "cache_write": 1}}}, "cache_read"),
        ({"colour": "red"}, "Extra inputs"),
    ],
)
def test_config_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PricingConfig.model_validate(data)


def test_cost_is_exact_and_rounded_up() -> None:
    sonnet = PriceTable.default().lookup("claude-sonnet-4-6")  # no long-context tier
    usage = Usage(
        input_tokens=1_000_000,
        output_tokens=2_000,
        cache_creation_input_tokens=10_000,
        cache_read_input_tokens=100_000,
    )
    # 3.00 + 0.03 + 0.0375 + 0.03 USD
    assert cost_usd(usage, sonnet) == Decimal("3.0975")
    assert cost_micros(usage, sonnet) == 3_097_500
    mini = PriceTable.default().lookup("gpt-4o-mini")
    one_cached = Usage(cache_read_input_tokens=1)
    assert cost_usd(one_cached, mini) == Decimal("0.000000075")
    assert cost_micros(one_cached, mini) == 1
    assert cost_micros(Usage(), mini) == 0


def test_usd_micros_conversions() -> None:
    assert usd_to_micros(Decimal("12.34")) == 12_340_000
    assert usd_to_micros("0.0000001") == 1
    assert micros_to_usd(1_500_000) == Decimal("1.5")


counts = st.integers(min_value=0, max_value=10_000_000)
usages = st.builds(Usage, counts, counts, counts, counts)
prices = st.sampled_from(sorted(DEFAULT_PRICES.items()))


@given(usages, usages, prices)
def test_cost_micros_bounds_and_additivity(a: Usage, b: Usage, named: tuple[str, Price]) -> None:
    # Within one rate tier: a long-context tier prices a whole call by its prompt size.
    p = named[1].model_copy(update={"long_context": None})
    exact = cost_usd(a, p) * 1_000_000
    assert exact <= cost_micros(a, p) < exact + 1
    total = cost_micros(a + b, p)
    assert (
        cost_micros(a, p) + cost_micros(b, p) - 1 <= total <= cost_micros(a, p) + cost_micros(b, p)
    )


@given(usages, prices)
def test_estimate_bounds_any_split_of_the_same_prompt(u: Usage, named: tuple[str, Price]) -> None:
    p = named[1]
    prompt = u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens
    estimate = estimate_micros(p, input_tokens=prompt, max_output_tokens=u.output_tokens)
    assert cost_micros(u, p) <= estimate


# Usage blocks as the providers send them, and the cost each must give (USD), from the
# pages and dates cited in extproc/policies/pricing.py.
INVOICE_CASES = [
    # Anthropic: plain call, Sonnet 4.6: 1,000 in x $3 + 500 out x $15.
    ("anthropic", "claude-sonnet-4-6", {"input_tokens": 1000, "output_tokens": 500}, "0.0105"),
    # 5-minute and 1-hour cache writes apart: 10K x 3.75 + 20K x 6 + 100K reads x 0.30.
    (
        "anthropic",
        "claude-sonnet-4-6",
        {
            "input_tokens": 50,
            "output_tokens": 100,
            "cache_creation_input_tokens": 30_000,
            "cache_read_input_tokens": 100_000,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 10_000,
                "ephemeral_1h_input_tokens": 20_000,
            },
        },
        "0.18915",
    ),
    # Sonnet 4.5 with the 1M beta: a 798,265-token prompt is billed whole at $6 / $22.50.
    ("anthropic", "claude-sonnet-4-5", {"input_tokens": 798_265, "output_tokens": 1000}, "4.81209"),
    # ... and exactly 200K is still the base rate; cache reads count toward the threshold.
    ("anthropic", "claude-sonnet-4-5", {"input_tokens": 200_000}, "0.6"),
    (
        "anthropic",
        "claude-sonnet-4-5",
        {"input_tokens": 100_001, "cache_read_input_tokens": 100_000},
        "0.660006",
    ),
    # Sonnet 4.6 and Opus 4.6+ have a 1M window at standard rates.
    ("anthropic", "claude-sonnet-4-6", {"input_tokens": 798_265}, "2.394795"),
    ("anthropic", "claude-opus-4-8", {"input_tokens": 300_000, "output_tokens": 10}, "1.50025"),
    # Web search: $10 per 1,000 searches, on top of tokens.
    (
        "anthropic",
        "claude-haiku-4-5",
        {"input_tokens": 1000, "output_tokens": 0, "server_tool_use": {"web_search_requests": 3}},
        "0.031",
    ),
    # OpenAI: cached prompt tokens at the cached rate, reasoning tokens inside
    # completion_tokens billed as output (never twice).
    (
        "openai",
        "gpt-5",
        {
            "prompt_tokens": 10_000,
            "completion_tokens": 3_000,
            "prompt_tokens_details": {"cached_tokens": 8_000},
            "completion_tokens_details": {"reasoning_tokens": 2_500},
        },
        "0.0335",
    ),
    ("openai", "gpt-5-mini", {"prompt_tokens": 1_000_000, "completion_tokens": 0}, "0.25"),
]


@pytest.mark.parametrize(("api", "model", "usage", "usd"), INVOICE_CASES)
def test_usage_blocks_price_as_the_invoice(
    api: str, model: str, usage: dict[str, object], usd: str
) -> None:
    from extproc.apis import anthropic, openai

    parse = anthropic.usage_from_mapping if api == "anthropic" else openai.usage_from_mapping
    price = PriceTable.default().lookup(model)
    assert cost_usd(parse(usage), price) == Decimal(usd)


def test_reservations_use_the_dearest_rate_that_can_apply() -> None:
    sonnet_45 = PriceTable.default().lookup("claude-sonnet-4-5")
    # Long context 1h write ($12) and long-context output ($22.50).
    assert estimate_micros(sonnet_45, input_tokens=1, max_output_tokens=1) == 12 + 23
    sonnet_46 = PriceTable.default().lookup("claude-sonnet-4-6")
    assert estimate_micros(sonnet_46, input_tokens=1, max_output_tokens=1) == 6 + 15
