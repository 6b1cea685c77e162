"""Model prices and the cost of a call, in exact integer micro-USD.

Prices are USD per million tokens, which is the same number as micro-USD per
token: the cost of a call is `sum(tokens * price)` micro-USD with no division,
kept exact as `Decimal` and rounded *up* to a whole micro-USD (`cost_micros`)
so budgets never under-count. Integers are what the store adds atomically
(HINCRBY); a budget of $1e9 is still far below 2**53 micro-USD.

`Usage` is the provider-neutral shape from `extproc.apis.usage`: uncached input,
output, cache writes and cache reads never overlap, so each count is priced once at
its own rate. Cache writes are split into 5-minute (`cache_write`) and 1-hour
(`cache_write_1h`) writes as Anthropic reports them (`cache_creation.ephemeral_1h_
input_tokens`); server tools are priced per use (`web_search`, USD per search). A
`long_context` tier replaces every rate of a call whose prompt (input + cache writes
+ cache reads) is over its threshold: Anthropic bills the whole request at the
premium, not only the tokens past 200K.

Lookup order for a model name: exact entry, then glob patterns (`fnmatch`,
case-sensitive) from most to least specific (more literal characters, then
fewer `*`), then the unknown-model rule: `refuse` (raise `UnknownModel`; the
gateway answers 400 before spending anything) or `{price_as: <model>}`.

Shipped defaults, read 2026-12-01 (verify against the providers' pages before
billing on them):

| model | input | 5m write | 1h write | read | output | > 200K prompt (in / out) |
| --- | --- | --- | --- | --- | --- | --- |
| Claude Opus 4.5-4.8 | 5 | 6.25 | 10 | 0.50 | 25 | none |
| Claude Opus 4, 4.1 | 15 | 18.75 | 30 | 1.50 | 75 | none |
| Claude Sonnet 4.6 | 3 | 3.75 | 6 | 0.30 | 15 | none (1M context at standard rates) |
| Claude Sonnet 4, 4.5 | 3 | 3.75 | 6 | 0.30 | 15 | 6 / 22.50 (writes 7.50 / 12, read 0.60) |
| Claude Haiku 4.5 | 1 | 1.25 | 2 | 0.10 | 5 | none |
| web search (Anthropic) | $10 per 1,000 searches | | | | | |
| gpt-5 | 1.25 | = input | = input | 0.125 | 10 | |
| gpt-5-mini | 0.25 | = input | = input | 0.025 | 2 | |
| gpt-4.1 | 2 | = input | = input | 0.50 | 8 | |
| gpt-4o / gpt-4o-mini | 2.50 / 0.15 | = input | = input | 1.25 / 0.075 | 10 / 0.60 | |

USD per million tokens. Sources: Anthropic, platform.claude.com/docs/en/about-claude/
pricing ("Model pricing": 5m writes 1.25x, 1h writes 2x, reads 0.1x input; "Long
context pricing": Sonnet 4 and 4.5 with the 1M context beta, $6 / $22.50 above 200K
input tokens, the cache multipliers applying to the premium input rate; "Web search
tool": $10 per 1,000 searches) and the model overview pages (Sonnet 4.6 and Opus 4.6
list a 1M context at their standard rates since the window became generally available
on 2026-03-13). OpenAI, openai.com/api/pricing (cached input at the cached rate;
reasoning tokens are part of `completion_tokens` and billed as output); OpenAI does
not bill cache writes, so both write rates equal the input rate.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from extproc.apis.usage import Usage

__all__ = [
    "DEFAULT_PRICES",
    "MICROS_PER_USD",
    "LongContext",
    "Price",
    "PriceAs",
    "PriceTable",
    "PricingConfig",
    "Rates",
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


class Rates(_Frozen):
    """USD per million tokens (= micro-USD per token) for each kind of token."""

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cache_write: Decimal = Field(ge=0)
    cache_read: Decimal = Field(ge=0)
    # 1-hour cache writes; absent: Anthropic's 2x the input rate.
    cache_write_1h: Decimal | None = Field(default=None, ge=0)

    @property
    def write_1h(self) -> Decimal:
        return self.cache_write_1h if self.cache_write_1h is not None else 2 * self.input

    @property
    def dearest_input(self) -> Decimal:
        """The most a prompt token can cost (a cache hit only makes it cheaper)."""
        return max(self.input, self.cache_write, self.write_1h)


class LongContext(Rates):
    """Rates for a whole call whose prompt is over `threshold_tokens`."""

    threshold_tokens: int = Field(default=200_000, gt=0)


@dataclass(frozen=True, slots=True)
class _PlainRates:
    """One tier's rates as a plain object (see `_PlainPrice`)."""

    input: Decimal
    output: Decimal
    cache_write: Decimal
    write_1h: Decimal
    cache_read: Decimal

    @classmethod
    def of(cls, rates: Rates) -> _PlainRates:
        return cls(rates.input, rates.output, rates.cache_write, rates.write_1h, rates.cache_read)


@dataclass(frozen=True, slots=True)
class _PlainPrice:
    """What `cost_micros` and `estimate_micros` read of a `Price`, copied once (`_plain`):
    a pydantic model's attribute read costs ~10x a plain object's (its `__getattr__`
    defeats the interpreter's attribute cache), and prices are read ~25 times a request."""

    base: _PlainRates
    long: _PlainRates | None
    threshold_tokens: int
    web_search: Decimal
    per_input: Decimal  # the dearest a prompt token can cost (estimate_micros)
    per_output: Decimal


class Price(Rates):
    """A model's rates, its long-context tier and its per-use server tool prices."""

    long_context: LongContext | None = None
    web_search: Decimal = Field(default=Decimal("0.01"), ge=0)  # USD per search

    def rates_for(self, prompt_tokens: int) -> Rates:
        tier = self.long_context
        return tier if tier is not None and prompt_tokens > tier.threshold_tokens else self

    @property
    def dearest(self) -> Rates:
        """The dearest rates that can apply to a call of this model (for reservations)."""
        return self.long_context or self


class PriceAs(_Frozen):
    """Price unknown models like this known one (e.g. the most expensive you allow)."""

    price_as: str


def _p(input_: str, output: str, cache_write: str, cache_read: str, **extra: object) -> Price:
    """Anthropic rates (1h writes at 2x input); OpenAI's pass cache_write = input."""
    write_1h = extra.pop("cache_write_1h", None) or str(2 * Decimal(input_))
    return Price(
        input=Decimal(input_),
        output=Decimal(output),
        cache_write=Decimal(cache_write),
        cache_read=Decimal(cache_read),
        cache_write_1h=Decimal(str(write_1h)),
        **extra,  # type: ignore[arg-type]
    )


def _oai(input_: str, output: str, cache_read: str) -> Price:
    return _p(input_, output, input_, cache_read, cache_write_1h=input_)


_OPUS_NEW = _p("5", "25", "6.25", "0.50")
_OPUS_OLD = _p("15", "75", "18.75", "1.50")
_SONNET_4_6 = _p("3", "15", "3.75", "0.30")
_SONNET_4_LONG = LongContext(
    input=Decimal("6"),
    output=Decimal("22.50"),
    cache_write=Decimal("7.50"),
    cache_write_1h=Decimal("12"),
    cache_read=Decimal("0.60"),
)
_SONNET_4 = _p("3", "15", "3.75", "0.30", long_context=_SONNET_4_LONG)
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
    "claude-sonnet-4-6": _SONNET_4_6,
    "claude-sonnet-4-6-*": _SONNET_4_6,
    "claude-sonnet-4-5": _SONNET_4,
    "claude-sonnet-4-*": _SONNET_4,
    "claude-haiku-4-5": _HAIKU_4_5,
    "claude-haiku-4-5-*": _HAIKU_4_5,
    "gpt-5": _oai("1.25", "10", "0.125"),
    "gpt-5-2*": _oai("1.25", "10", "0.125"),  # dated snapshots (gpt-5-2025-08-07)
    "gpt-5-mini": _oai("0.25", "2", "0.025"),
    "gpt-5-mini-*": _oai("0.25", "2", "0.025"),
    "gpt-4.1": _oai("2", "8", "0.50"),
    "gpt-4.1-2*": _oai("2", "8", "0.50"),
    "gpt-4o": _oai("2.50", "10", "1.25"),
    "gpt-4o-2*": _oai("2.50", "10", "1.25"),
    "gpt-4o-mini": _oai("0.15", "0.60", "0.075"),
    "gpt-4o-mini-*": _oai("0.15", "0.60", "0.075"),
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


_PLAIN_LIMIT = 4096  # memoized prices; cleared when full
_plains: dict[int, tuple[Price, _PlainPrice]] = {}


def _plain(price: Price) -> _PlainPrice:
    """`price` as plain values, memoized by identity (the model is frozen; the entry
    keeps its price, so a reused id is never mistaken for it)."""
    entry = _plains.get(id(price))
    if entry is not None and entry[0] is price:
        return entry[1]
    if len(_plains) >= _PLAIN_LIMIT:
        _plains.clear()
    long, dearest = price.long_context, price.dearest
    plain = _PlainPrice(
        _PlainRates.of(price),
        _PlainRates.of(long) if long is not None else None,
        long.threshold_tokens if long is not None else 0,
        price.web_search,
        max(price.dearest_input, dearest.dearest_input),
        max(price.output, dearest.output),
    )
    _plains[id(price)] = (price, plain)
    return plain


def _cost_micros_exact(usage: Usage, price: Price) -> Decimal:
    plain = _plain(price)  # (= price.rates_for, read as plain values)
    long = plain.long
    over = long is not None and usage.prompt_tokens > plain.threshold_tokens
    rates = long if over and long is not None else plain.base
    one_hour = min(usage.cache_creation_1h_input_tokens, usage.cache_creation_input_tokens)
    return (
        usage.input_tokens * rates.input
        + usage.output_tokens * rates.output
        + (usage.cache_creation_input_tokens - one_hour) * rates.cache_write
        + one_hour * rates.write_1h
        + usage.cache_read_input_tokens * rates.cache_read
        + usage.web_search_requests * plain.web_search * MICROS_PER_USD
    )


def cost_micros(usage: Usage, price: Price) -> int:
    """Cost in whole micro-USD, rounded up (at most 1 micro-USD over per call)."""
    return math.ceil(_cost_micros_exact(usage, price))


def estimate_micros(price: Price, *, input_tokens: int, max_output_tokens: int) -> int:
    """An upper-bound cost to reserve before a call: every input token at the dearest
    rate that can apply to it (1-hour cache write, long-context tier), and the full
    `max_output_tokens` at the dearest output rate."""
    plain = _plain(price)
    return math.ceil(input_tokens * plain.per_input + max_output_tokens * plain.per_output)


def usd_to_micros(usd: Decimal | int | str) -> int:
    """Whole micro-USD in a USD amount, rounded up (limits and displays)."""
    return math.ceil(Decimal(usd) * MICROS_PER_USD)


def micros_to_usd(micros: int) -> Decimal:
    return Decimal(micros) / MICROS_PER_USD
