"""Which provider serves a request, and the header changes that send it there.

The ext_proc server sets `x-gateway-cluster` and asks Envoy to clear its route
cache; Envoy's "dispatch" route forwards to that cluster (see envoy/front-proxy.yaml).
The provider credential held by the gateway replaces whatever the caller sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from extproc.apis import ApiKind
from extproc.config import Config, ProviderConfig
from extproc.decisions import HeaderChanges

ROUTING_HEADER = "x-gateway-cluster"


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    provider: ProviderConfig

    @property
    def cluster(self) -> str:
        return self.provider.cluster or f"provider_{self.name}"


class NoProvider(Exception):
    pass


def default_target(config: Config, api: ApiKind) -> Target:
    name = config.default_provider(api)
    if name is None:
        raise NoProvider(f"no provider with api: {api} is configured")
    return Target(name=name, provider=config.providers[name])


def upstream_headers(target: Target, path: str, credential: str | None) -> HeaderChanges:
    """Route to the target's cluster, rebase the path, and swap in its credential."""
    # The gateway reads every answer: ask for it uncompressed, whatever the client accepts.
    changes: list[tuple[str, str]] = [
        (ROUTING_HEADER, target.cluster),
        ("accept-encoding", "identity"),
    ]
    prefix = target.provider.path_prefix
    if prefix:
        changes.append((":path", prefix + path))
    if credential is None:
        return HeaderChanges(set=tuple(changes))
    if target.provider.api == "anthropic":
        changes.append(("x-api-key", credential))
        return HeaderChanges(set=tuple(changes), remove=("authorization",))
    changes.append(("authorization", f"Bearer {credential}"))
    return HeaderChanges(set=tuple(changes), remove=("x-api-key",))
