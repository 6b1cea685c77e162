"""Which model a request may use, which model it is served with, and by which provider.

Pure functions over the config and the caller's identity:

1. `served_model`: requested -> alias -> the route profile's `map` -> the profile's
   `pin` -> the caller's key `map` -> the caller's tier `map`. The tier comes last so a
   cost rule (free tier: anything -> an internal model) cannot be escaped by picking a
   route. The served model may live at a provider of the other wire shape
   (`gpt-4 -> claude-sonnet-4-6`): the request is then translated (extproc.translate).
2. `check_allowed`: the served model must match every allow-list that applies:
   the route profile's, the key's, the team's and the tier's (their intersection).
   Patterns are shell globs (`claude-sonnet-*`), matched case-sensitively.
3. `choose_provider`: the profile's provider, else the first `models.routes` rule
   matching the served model, else the first provider of the request's API shape;
   one that cannot serve the caller's schema (no translator) is a 400 `wrong_api`
   (`target_for`: the same, with a fallback chain's first provider first).

`MODELS` is the model policy's step (`extproc.policies.step`): at the request headers
its run finds the caller's tier and allow-lists, once the body is parsed it maps and
checks the requested model and has the request served with it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from extproc.apis.kind import ApiKind
from extproc.config import Config, ProfileConfig, TierConfig
from extproc.errors import BadRequest, Forbidden, Unavailable
from extproc.policies.auth import Identity
from extproc.policies.routing import NoProvider, Target, default_target
from extproc.policies.step import Done, Exchange, Run
from extproc.translate.models import literal_names


@dataclass(frozen=True, slots=True)
class AllowList:
    source: str  # "route", "key", "team", "tier"
    patterns: tuple[str, ...]

    def allows(self, model: str) -> bool:
        # A loop, not any(): no generator on every check of every request.
        for pattern in self.patterns:  # noqa: SIM110
            if fnmatchcase(model, pattern):
                return True
        return False


def _mapped(model: str, rules: Mapping[str, str]) -> str:
    if not rules:  # most maps are empty: no generator to build for them
        return model
    return next((to for pattern, to in rules.items() if fnmatchcase(model, pattern)), model)


def tier_of(config: Config, identity: Identity) -> TierConfig | None:
    tier = identity.tier
    if tier is None and identity.team in config.teams:
        tier = config.teams[identity.team].tier
    return config.tiers.get(tier) if tier else None


def served_model(
    requested: str,
    config: Config,
    profile: ProfileConfig,
    tier: TierConfig | None,
    key_map: Mapping[str, str] | None = None,
) -> str:
    model = config.models.aliases.get(requested, requested)
    model = _mapped(model, profile.map)
    if profile.pin is not None:
        model = profile.pin
    if key_map:
        model = _mapped(model, key_map)
    return _mapped(model, tier.map) if tier is not None else model


def mapped_names(
    config: Config,
    profile: ProfileConfig,
    tier: TierConfig | None,
    key_map: Mapping[str, str],
    lists: Sequence[AllowList],
) -> list[str]:
    """The names a mapping makes usable (an alias or a `map` rule naming one model, e.g.
    `gpt-4`) whose served model this caller may use: what `/v1/models` adds to the list."""
    sources = [config.models.aliases, profile.map, key_map, tier.map if tier else {}]
    names = dict.fromkeys(literal_names(name for rules in sources for name in rules))
    served = {name: served_model(name, config, profile, tier, key_map) for name in names}
    return [name for name, model in served.items() if model != name and visible(model, lists)]


def allow_lists(
    config: Config, profile: ProfileConfig, identity: Identity, tier: TierConfig | None
) -> list[AllowList]:
    team = config.teams.get(identity.team) if identity.team else None
    sources = [
        ("route", profile.models),
        ("key", identity.models),
        ("team", team.models if team else None),
        ("tier", tier.models if tier else None),
    ]
    return [_allow_list(source, tuple(p)) for source, p in sources if p is not None]


# AllowLists are frozen: one per (source, patterns), shared by the requests that meet it
# (patterns come from the config and the key records).
@functools.lru_cache(maxsize=10_000)
def _allow_list(source: str, patterns: tuple[str, ...]) -> AllowList:
    return AllowList(source, patterns)


def check_allowed(requested: str, served: str, lists: Sequence[AllowList]) -> None:
    for allow in lists:
        if allow.allows(served):
            continue
        shown = ", ".join(allow.patterns) or "none"
        via = f" (served as {served!r})" if served != requested else ""
        raise Forbidden(
            f"model {requested!r}{via} is not allowed by the {allow.source} policy; "
            f"allowed: {shown}",
            reason="model_not_allowed",
        )


def visible(model_id: str, lists: Sequence[AllowList]) -> bool:
    """Whether `/v1/models` should list a model for this caller."""
    return all(allow.allows(model_id) for allow in lists)


def choose_provider(config: Config, profile: ProfileConfig, model: str, api: ApiKind) -> Target:
    name = profile.provider
    routes = config.models.routes
    if name is None and routes:
        name = next((r.provider for r in routes if fnmatchcase(model, r.match)), None)
    if name is None:
        return default_target(config, api)
    target = Target(name=name, provider=config.providers[name])
    if target.adapter.translator(api) is None:
        path = target.adapter.dialect.generate_path
        raise BadRequest(
            f"model {model!r} is served by provider {name!r}, which speaks the "
            f"{target.provider.api} API; call {path}",
            reason="wrong_api",
        )
    return target


def target_for(config: Config, profile: ProfileConfig, model: str | None, api: ApiKind) -> Target:
    """The provider a request goes to directly: a fallback chain's first (a chain's route
    sends what is not generated there; generating requests go to the chain), else
    `choose_provider`'s, else the default for the caller's schema (no model named)."""
    chain = profile.fallback
    if chain:
        first = Target(chain[0].provider, config.providers[chain[0].provider])
        if first.adapter.translator(api) is not None:
            return first
    try:
        if model is None and profile.provider is None:
            return default_target(config, api)
        return choose_provider(config, profile, model or "", api)
    except NoProvider as exc:
        raise Unavailable(
            f"{exc}; add one under providers:", reason="no_provider", retryable=False
        ) from exc


class ModelRun(Run):
    """The model policy on one request: the caller's lists (request headers), then the
    served model for what it asked (request body)."""

    __slots__ = ("allow", "requested", "tier")

    def __init__(self) -> None:
        self.tier: TierConfig | None = None
        self.allow: list[AllowList] = []
        self.requested: str | None = None  # the model the request named

    async def headers(self, exchange: Exchange) -> None:
        config, identity = exchange.gw.config, exchange.identity
        self.tier = tier_of(config, identity)
        self.allow = allow_lists(config, exchange.profile, identity, self.tier)

    def start(self, exchange: Exchange) -> None:
        request = exchange.request
        assert request is not None
        assert request.model is not None
        self.requested = request.model
        config, key_map = exchange.gw.config, exchange.identity.map
        served = served_model(request.model, config, exchange.profile, self.tier, key_map)
        check_allowed(request.model, served, self.allow)
        exchange.serve_model(served)

    def visible(self, model_id: str) -> bool:
        return visible(model_id, self.allow)

    def mapped_names(self, exchange: Exchange) -> list[str]:
        """What `/v1/models` adds for this caller (see `mapped_names`)."""
        config, key_map = exchange.gw.config, exchange.identity.map
        return mapped_names(config, exchange.profile, self.tier, key_map, self.allow)

    def audit_fields(self, done: Done) -> Mapping[str, Any]:
        return {"requested_model": self.requested}


class ModelPolicy:
    """The model policy's place in the step order: second, on every request."""

    def open(self, exchange: Exchange) -> ModelRun:
        return ModelRun()


MODELS = ModelPolicy()
