"""Which provider serves a request (`Target`), and the header changes that send it there.

The ext_proc server sets `x-gateway-cluster` and asks Envoy to clear its route
cache; Envoy's "dispatch" route forwards to that cluster (see envoy/front-proxy.yaml).
How a request leaves for a provider of a given kind is its upstream adapter's
(`extproc.upstream`); the provider credential held by the gateway replaces whatever
the caller sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.apis.kind import ApiKind
from extproc.config import Config, ProviderConfig
from extproc.decisions import HeaderChanges
from extproc.upstream import ROUTING_HEADER, UpstreamAdapter, adapter_for, default_provider

__all__ = ["ROUTING_HEADER", "NoProvider", "Target", "default_target", "upstream_headers"]


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    provider: ProviderConfig

    @property
    def cluster(self) -> str:
        return self.provider.cluster or f"provider_{self.name}"

    @property
    def adapter(self) -> UpstreamAdapter:
        return adapter_for(self.provider.api)


class NoProvider(Exception):
    pass


# The last config's default target per API kind (a request without a routing rule
# takes it): at most one entry per kind; the config is held, so `is` cannot be fooled.
_DEFAULTS: dict[ApiKind, tuple[Config, Target]] = {}


def default_target(config: Config, api: ApiKind) -> Target:
    found = _DEFAULTS.get(api)
    if found is not None and found[0] is config:
        return found[1]
    name = default_provider(config, api)
    if name is None:
        raise NoProvider(f"no provider with api: {api} is configured")
    target = Target(name=name, provider=config.providers[name])
    _DEFAULTS[api] = (config, target)
    return target


def upstream_headers(target: Target, path: str, credential: str | None) -> HeaderChanges:
    """Route to the target's cluster, rebase the path, and swap in a held key."""
    adapter = target.adapter
    auth = adapter.key_headers(credential) if credential is not None else None
    return adapter.headers(adapter.route(target.cluster, target.provider, path), auth)
