"""Model prices and the cost of a call, in exact integer micro-USD.

Prices are USD per million tokens, which is the same number as micro-USD per
token: the cost of a call is `sum(tokens * price)` micro-USD with no division,
kept exact as `Decimal` and rounded *up* to a whole micro-USD (`cost_micros`)
so budgets never under-count. Integers are what the store adds atomically
(HINCRBY); a budget of $1e9 is still far below 2**53 micro-USD.

`Usage` is the provider-neutral shape from `extproc.apis.usage`: uncached input,
output, cache writes and cache reads never overlap, so each count is priced
once at its own rate. Anthropic's 1-hour cache writes cost more than 5-minute
ones; usage does not split them, so `cache_write` is the 5-minute rate (a
deployment that uses 1-hour caching can override the price).

Lookup order for a model name: exact entry, then glob patterns (`fnmatch`,
case-sensitive) from most to least specific (more literal characters, then
fewer `*`),
then the unknown-model rule: `refuse` (raise `UnknownModel`; the gateway answers
400 before spending anything) or `{price_as: <model>}`.

Shipped defaults (verify against the providers' pages before billing on them):

* Anthropic, from platform.claude.com/docs/en/about-claude/pricing (the
  "Model pricing" table, read via the docs search): Opus 4.5 and later
  (4.5-4.8) $5 in / $25 out / $6.25 5-minute cache write / $0.50 cache read;
  Opus 4 and 4.1 keep the older $15 / $75 / $18.75 / $1.50. Sonnet 4.x
  $3 / $15 / $3.75 / $0.30 and Haiku 4.5 $1 / $5 / $1.25 / $0.10 follow the
  model overview pages; the cache rates assume Anthropic's usual 1.25x input
  (5-minute write) and 0.1x input (read) multipliers.
* OpenAI, per openai.com/api/pricing as mirrored in public price tables
  (github/docs Copilot models-and-pricing, openai-cost): gpt-5 $1.25 / $10 /
  cached $0.125; gpt-5-mini $0.25 / $2 / $0.025; gpt-4.1 $2 / $8 / $0.50;
  gpt-4o $2.50 / $10 / $1.25; gpt-4o-mini $0.15 / $0.60 / $0.075. OpenAI does
  not bill cache writes separately, so `cache_write` equals the input rate
  (its usage never reports cache-creation tokens anyway).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from extproc.apis.usage import Usage

__all__ = [
    "DEFAULT_PRICES",
    "MICROS_PER_USD",
    "Price",
    "PriceAs",
    "PriceTable",
    "PricingConfig",
    "UnknownModel",
    "cost_micros",
    "cost_usd",
    "estimate_micros",
    "micros_to_usd",
    "usd_to_micros",
]

MICROS_PER_USD = 1_000_000


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Price(_Frozen):
    """USD per million tokens (= micro-USD per token) for each kind of token."""

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cache_write: Decimal = Field(ge=0)
    cache_read: Decimal = Field(ge=0)


class PriceAs(_Frozen):
    """Price unknown models like this known one (e.g. the most expensive you allow)."""

    price_as: str


def _p(input_: str, output: str, cache_write: str, cache_read: str) -> Price:
    return Price(
        input=Decimal(input_),
        output=Decimal(output),
        cache_write=Decimal(cache_write),
        cache_read=Decimal(cache_read),
    )


_OPUS_NEW = _p("5", "25", "6.25", "0.50")
_OPUS_OLD = _p("15", "75", "18.75", "1.50")
_SONNET_4 = _p("3", "15", "3.75", "0.30")
_HAIKU_4_5 = _p("1", "5", "1.25", "0.10")

DEFAULT_PRICES: Mapping[str, Price] = {
    "claude-opus-4-8": _OPUS_NEW,
    "claude-opus-4-8-*": _OPUS_NEW,
    "claude-opus-4-7*": _OPUS_NEW,
    "claude-opus-4-6*": _OPUS_NEW,
    "claude-opus-4-5*": _OPUS_NEW,
    "claude-opus-4-1": _OPUS_OLD,
    "claude-opus-4-1-*": _OPUS_OLD,
    "claude-opus-4-0": _OPUS_OLD,
    "claude-opus-4-2025*": _OPUS_OLD,  # Opus 4 by dated id (claude-opus-4-20250514)
    "claude-sonnet-4-6": _SONNET_4,
    "claude-sonnet-4-5": _SONNET_4,
    "claude-sonnet-4-*": _SONNET_4,
    "claude-haiku-4-5": _HAIKU_4_5,
    "claude-haiku-4-5-*": _HAIKU_4_5,
    "gpt-5": _p("1.25", "10", "1.25", "0.125"),
    "gpt-5-2*": _p("1.25", "10", "1.25", "0.125"),  # dated snapshots (gpt-5-2025-08-07)
    "gpt-5-mini": _p("0.25", "2", "0.25", "0.025"),
    "gpt-5-mini-*": _p("0.25", "2", "0.25", "0.025"),
    "gpt-4.1": _p("2", "8", "2", "0.50"),
    "gpt-4.1-2*": _p("2", "8", "2", "0.50"),
    "gpt-4o": _p("2.50", "10", "2.50", "1.25"),
    "gpt-4o-2*": _p("2.50", "10", "2.50", "1.25"),
    "gpt-4o-mini": _p("0.15", "0.60", "0.15", "0.075"),
    "gpt-4o-mini-*": _p("0.15", "0.60", "0.15", "0.075"),
}

_WILDCARDS = re.compile(r"[*?\[]")


def _is_glob(name: str) -> bool:
    return _WILDCARDS.search(name) is not None


class PricingConfig(_Frozen):
    """`pricing:` in the config file.

    `models` entries (exact names or globs) are merged over the shipped
    defaults unless `include_defaults` is false.
    """

    models: dict[str, Price] = Field(default_factory=dict)
    include_defaults: bool = True
    unknown_models: Literal["refuse"] | PriceAs = "refuse"

    def merged(self) -> dict[str, Price]:
        return {**(DEFAULT_PRICES if self.include_defaults else {}), **self.models}

    @model_validator(mode="after")
    def _price_as_known(self) -> PricingConfig:
        rule = self.unknown_models
        if isinstance(rule, PriceAs):
            if _is_glob(rule.price_as):
                raise ValueError("unknown_models.price_as must be a model name, not a pattern")
            if PriceTable(self.merged()).find(rule.price_as) is None:
                raise ValueError(
                    f"unknown_models.price_as: {rule.price_as!r} has no price; "
                    "add it under pricing.models or pick a listed model"
                )
        return self


class UnknownModel(LookupError):
    """No price for this model and the unknown-model rule is `refuse`."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"no price for model {model!r}; add it under pricing.models")


def _specificity(pattern: str) -> tuple[int, int, str]:
    """More literal characters first, then fewer `*`, then by name (deterministic)."""
    return (-len(_WILDCARDS.sub("", pattern)), pattern.count("*"), pattern)


class PriceTable:
    """Compiled prices: exact names, then globs by specificity, then the unknown rule."""

    _CACHE_LIMIT = 4096  # model names come from clients; keep the memo bounded

    def __init__(
        self, prices: Mapping[str, Price], unknown: Literal["refuse"] | PriceAs = "refuse"
    ) -> None:
        self._exact = {k: v for k, v in prices.items() if not _is_glob(k)}
        globs = sorted((k for k in prices if _is_glob(k)), key=_specificity)
        self._globs = [(re.compile(fnmatch.translate(g)), prices[g]) for g in globs]
        self._unknown = unknown
        self._memo: dict[str, Price | None] = {}

    @classmethod
    def from_config(cls, config: PricingConfig) -> PriceTable:
        return cls(config.merged(), config.unknown_models)

    @classmethod
    def default(cls) -> PriceTable:
        return cls(DEFAULT_PRICES)

    def find(self, model: str) -> Price | None:
        """The listed price (exact or glob) for `model`, ignoring the unknown rule."""
        if model in self._memo:
            return self._memo[model]
        price = self._exact.get(model)
        if price is None:
            price = next((p for rx, p in self._globs if rx.match(model)), None)
        if len(self._memo) < self._CACHE_LIMIT:
            self._memo[model] = price
        return price

    def lookup(self, model: str) -> Price:
        """The price to charge for `model`; raises `UnknownModel` under `refuse`."""
        price = self.find(model)
        if price is not None:
            return price
        if isinstance(self._unknown, PriceAs):
            fallback = self.find(self._unknown.price_as)
            if fallback is not None:
                return fallback
        raise UnknownModel(model)


def cost_usd(usage: Usage, price: Price) -> Decimal:
    """Exact cost in USD (no rounding)."""
    return _cost_micros_exact(usage, price) / MICROS_PER_USD


def _cost_micros_exact(usage: Usage, price: Price) -> Decimal:
    return (
        usage.input_tokens * price.input
        + usage.output_tokens * price.output
        + usage.cache_creation_input_tokens * price.cache_write
        + usage.cache_read_input_tokens * price.cache_read
    )


def cost_micros(usage: Usage, price: Price) -> int:
    """Cost in whole micro-USD, rounded up (at most 1 micro-USD over per call)."""
    return math.ceil(_cost_micros_exact(usage, price))


def estimate_micros(price: Price, *, input_tokens: int, max_output_tokens: int) -> int:
    """An upper-bound cost to reserve before a call: every input token at the dearer of
    the input and cache-write rates (a cache hit only makes it cheaper), and the full
    `max_output_tokens` at the output rate."""
    per_input = max(price.input, price.cache_write)
    return math.ceil(input_tokens * per_input + max_output_tokens * price.output)


def usd_to_micros(usd: Decimal | int | str) -> int:
    """Whole micro-USD in a USD amount, rounded up (limits and displays)."""
    return math.ceil(Decimal(usd) * MICROS_PER_USD)


def micros_to_usd(micros: int) -> Decimal:
    return Decimal(micros) / MICROS_PER_USD
