"""Bounded metric label values: only names the configuration declares, else `other`.

A label value a caller can choose (a model name in a body, a pipeline id in a
header) would give an attacker one new time series per request: /metrics grows
without bound and Prometheus with it. So a model label is the name itself only
when the configuration names it (aliases, maps, pins, allow-lists, routes, the
price table), or when a provider answered successfully under that name (a dated
snapshot such as claude-sonnet-4-5-20250929), for at most `MAX_ANSWERED` such
names per process; a pipeline scope only when a budget rule names that pipeline.
Everything else is counted under `other`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from extproc.config import Config, ProfileConfig, TierConfig

OTHER = "other"
MAX_ANSWERED = 64
_GLOB = frozenset("*?[")


def _literal(names: Iterable[str | None]) -> set[str]:
    return {n for n in names if n and not _GLOB & set(n)}


def configured_models(config: Config) -> frozenset[str]:
    """Every exact model name the configuration mentions."""
    names: set[str] = set()
    names |= _literal(config.models.aliases)
    names |= _literal(config.models.aliases.values())
    names |= _literal(route.match for route in config.models.routes)
    names |= _literal(config.pricing.merged())
    policies: list[ProfileConfig | TierConfig] = [*config.profiles.values()]
    policies += config.tiers.values()
    for policy in policies:
        names |= _literal(policy.map.values())
        names |= _literal(policy.models or ())
    names |= _literal(profile.pin for profile in config.profiles.values())
    names |= _literal(model for team in config.teams.values() for model in team.models or ())
    names |= _literal(model for key in config.auth.keys for model in key.models or ())
    return frozenset(names)


@dataclass(frozen=True, slots=True)
class LabelBounds:
    models: frozenset[str] = frozenset()
    pipelines: frozenset[str] = frozenset()
    answered: set[str] = field(default_factory=set)  # names providers answered with

    @classmethod
    def from_config(cls, config: Config) -> LabelBounds:
        pipelines = {r.id for r in config.budgets.rules if r.scope == "pipeline" and r.id != "*"}
        return cls(models=configured_models(config), pipelines=frozenset(pipelines))

    def model(self, name: str | None, *, answered: bool = False) -> str:
        """`answered`: the name comes from a provider's successful answer."""
        if not name:
            return ""
        if name in self.models or name in self.answered:
            return name
        if answered and len(self.answered) < MAX_ANSWERED:
            self.answered.add(name)
            return name
        return OTHER

    def scope_id(self, kind: str, scope_id: str) -> str:
        """A scope id as a label; pipelines come from a header, so only named ones pass."""
        if kind == "pipeline" and scope_id not in self.pipelines:
            return OTHER
        return scope_id

    def scope(self, kind: str, scope_id: str) -> str:
        """A budget's `scope` label, `kind=id`."""
        return f"{kind}={self.scope_id(kind, scope_id)}"
