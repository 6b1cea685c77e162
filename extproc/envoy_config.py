"""Render the Envoy bootstrap `extproc up` runs, from envoy/front-proxy.yaml and the config.

The YAML file is the commented source of truth; this module changes only what
the gateway config owns (addresses, buffer limit, failure mode, provider
clusters and fallback routes) and leaves every other setting as written.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from extproc.apis.kind import CLOUD_APIS
from extproc.config import Config, FallbackStep, HostPort, ProviderConfig
from extproc.fallback import (
    ATTEMPT_METADATA,
    HOST_NAMESPACE,
    RETRIABLE_STATUSES,
    chain_cluster,
)
from extproc.upstream import default_provider

_REPO_TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "front-proxy.yaml"
_OPENAI_FALLBACK = "openai"
_ANTHROPIC_FALLBACK = "anthropic"
_EXT_PROC = "envoy.filters.http.ext_proc"


class TemplateError(Exception):
    """The Envoy template lacks a part the renderer patches."""


# A wheel installs the template as data under <prefix>/share/extproc/envoy/.
_INSTALLED_TEMPLATE = Path(sys.prefix) / "share" / "extproc" / "envoy" / "front-proxy.yaml"


def template_path(config: Config) -> Path:
    """The configured bootstrap, else the repository's (editable install), else the wheel's."""
    if config.envoy.bootstrap is not None:
        return config.envoy.bootstrap
    if _REPO_TEMPLATE.is_file():
        return _REPO_TEMPLATE
    return _INSTALLED_TEMPLATE


def load_template(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: not an Envoy bootstrap mapping")
    return data


def _socket(address: HostPort) -> dict[str, Any]:
    return {"socket_address": {"address": address.host, "port_value": address.port}}


def _find(items: list[dict[str, Any]], name: str, what: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise TemplateError(f"the Envoy template has no {what} named {name!r}")


def provider_cluster(
    name: str, provider: ProviderConfig, template: dict[str, Any]
) -> dict[str, Any]:
    """A cluster for one provider, modelled on the template's provider cluster."""
    cluster = copy.deepcopy(template)
    cluster_name = provider.cluster or f"provider_{name}"
    cluster["name"] = cluster_name
    cluster["connect_timeout"] = f"{provider.connect_timeout_seconds:g}s"
    cluster["load_assignment"] = {
        "cluster_name": cluster_name,
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {
                                "socket_address": {
                                    "address": provider.hostname,
                                    "port_value": provider.port,
                                }
                            }
                        }
                    }
                ]
            }
        ],
    }
    if provider.scheme == "https":
        cluster["transport_socket"]["typed_config"]["sni"] = provider.hostname
    else:
        cluster.pop("transport_socket", None)
        options = cluster["typed_extension_protocol_options"]
        protocol = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        protocol.pop("auto_config", None)
        protocol["explicit_http_config"] = {"http_protocol_options": {}}
    return cluster


def _patch_routes(hcm: dict[str, Any], config: Config) -> None:
    """Point the template's default routes (if it has them) at the default providers."""
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    fallbacks = {
        _ANTHROPIC_FALLBACK: default_provider(config, "anthropic"),
        _OPENAI_FALLBACK: default_provider(config, "openai"),
    }
    first = next(iter(config.providers))
    for route in routes:
        if route.get("name") not in fallbacks:
            continue
        name = fallbacks[route["name"]] or first
        provider = config.providers[name]
        route["route"]["cluster"] = provider.cluster or f"provider_{name}"


def _patch_cloud_routes(hcm: dict[str, Any], config: Config) -> None:
    """The `bedrock` / `vertex` routes (if the template has them) match the configured
    client prefixes, fall back to a provider that can serve that cloud's clients, and go
    when their prefix is turned off."""
    virtual_host = hcm["route_config"]["virtual_hosts"][0]
    prefixes = dict((kind, prefix) for prefix, kind in config.cloud_paths.prefixes())
    kept = []
    for route in virtual_host["routes"]:
        kind = route.get("name")  # the cloud client routes are named after their cloud
        if kind in CLOUD_APIS:
            if kind not in prefixes:
                continue
            route["match"] = {"prefix": prefixes[kind] + "/"}
            name = default_provider(config, kind) or next(iter(config.providers))
            route["route"]["cluster"] = config.providers[name].cluster or f"provider_{name}"
        kept.append(route)
    virtual_host["routes"] = kept


def _patch_dispatch(hcm: dict[str, Any], config: Config) -> None:
    """The first-byte timeout on the route that reaches providers, and the access log path."""
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        if route.get("name") == "dispatch":
            retry = route["route"].setdefault("retry_policy", {"num_retries": 0})
            retry["per_try_timeout"] = f"{config.limits.first_byte_timeout_seconds:g}s"
    for log in hcm.get("access_log", ()):
        if log.get("name") == "envoy.access_loggers.file":
            log["typed_config"]["path"] = config.envoy.access_log


def _patch_listener(bootstrap: dict[str, Any], config: Config) -> dict[str, Any]:
    listener = _find(bootstrap["static_resources"]["listeners"], "gateway", "listener")
    listener["address"] = _socket(config.listen)
    listener["per_connection_buffer_limit_bytes"] = config.limits.max_body_bytes
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    ext_proc = _find(hcm["http_filters"], _EXT_PROC, "http filter")["typed_config"]
    ext_proc["failure_mode_allow"] = config.failure_mode_allow
    return hcm


_DOWNSTREAM_CONNECTIONS = "envoy.resource_monitors.global_downstream_max_connections"


def connection_monitor(bootstrap: dict[str, Any]) -> dict[str, Any] | None:
    """The overload manager's downstream connection cap settings, if the bootstrap has one."""
    monitors = bootstrap.get("overload_manager", {}).get("resource_monitors", [])
    for monitor in monitors:
        if monitor.get("name") == _DOWNSTREAM_CONNECTIONS:
            settings: dict[str, Any] = monitor["typed_config"]
            return settings
    return None


def max_connections(bootstrap: dict[str, Any]) -> int | None:
    monitor = connection_monitor(bootstrap)
    return None if monitor is None else int(monitor["max_active_downstream_connections"])


def render(config: Config, template: dict[str, Any]) -> dict[str, Any]:
    """The bootstrap for `config`, leaving the template untouched."""
    bootstrap = copy.deepcopy(template)
    bootstrap["admin"]["address"] = _socket(config.envoy.admin)
    monitor = connection_monitor(bootstrap)
    if monitor is not None and config.envoy.max_connections is not None:
        monitor["max_active_downstream_connections"] = config.envoy.max_connections
    hcm = _patch_listener(bootstrap, config)
    _patch_routes(hcm, config)
    _patch_cloud_routes(hcm, config)
    _patch_dispatch(hcm, config)
    clusters = bootstrap["static_resources"]["clusters"]
    ext_proc = _find(clusters, "extproc", "cluster")
    endpoint = ext_proc["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"] = _socket(config.grpc_listen)
    provider_template = next((c for c in clusters if c["name"].startswith("provider_")), None)
    if provider_template is None:
        raise TemplateError("the Envoy template has no provider_* cluster to model others on")
    kept = [c for c in clusters if not c["name"].startswith("provider_")]
    kept += [provider_cluster(n, p, provider_template) for n, p in config.providers.items()]
    bootstrap["static_resources"]["clusters"] = kept
    _render_chains(bootstrap, hcm, config, provider_template)
    return bootstrap


# -- fallback chains (extproc/fallback.py; README "Fallback across providers") ----------

_PROTOCOL = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_RETRY_ON = "connect-failure,refused-stream,reset,5xx,retriable-status-codes"
# Circuit breaker thresholds of a chain's cluster: a fallback under load retries many at
# once (Envoy's default max_retries of 3 would fail the 4th concurrent one).
_HIGH = 10000
_UPSTREAM_CODEC = (
    "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"
)


def chains(config: Config) -> list[tuple[FallbackStep, ...]]:
    """The distinct fallback chains of the config's profiles, in profile order."""
    seen: dict[str, tuple[FallbackStep, ...]] = {}
    for profile in config.profiles.values():
        if profile.fallback:
            seen.setdefault(chain_cluster(profile.fallback), profile.fallback)
    return list(seen.values())


def _attempt_filter(hcm: dict[str, Any]) -> dict[str, Any]:
    """The per-attempt ext_proc upstream filter, talking to the same ext_proc cluster."""
    ext_proc = _find(hcm["http_filters"], _EXT_PROC, "http filter")["typed_config"]
    grpc_service = copy.deepcopy(ext_proc["grpc_service"])
    grpc_service["initial_metadata"] = [{"key": ATTEMPT_METADATA, "value": "1"}]
    config: dict[str, Any] = {
        "@type": ext_proc["@type"],
        "grpc_service": grpc_service,
        "failure_mode_allow": False,
        "processing_mode": {
            "request_header_mode": "SEND",
            "request_body_mode": "BUFFERED",
            "response_header_mode": "SEND",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        # Which provider (and model, position) this attempt's host is.
        "request_attributes": ["xds.upstream_host_metadata"],
    }
    for key in ("message_timeout", "max_message_timeout"):
        if key in ext_proc:
            config[key] = ext_proc[key]
    return {"name": _EXT_PROC, "typed_config": config}


def _step_cluster(
    chain: str, position: int, step: FallbackStep, config: Config, template: dict[str, Any]
) -> dict[str, Any]:
    """One provider of a chain: its cluster, with host metadata naming the step, and
    outlier detection that ejects a failing host so later requests skip it at once."""
    cluster = provider_cluster(step.provider, config.providers[step.provider], template)
    name = f"{chain}_{position}"
    cluster["name"] = cluster["load_assignment"]["cluster_name"] = name
    metadata = {"provider": step.provider, "model": step.model or "", "position": position}
    for locality in cluster["load_assignment"]["endpoints"]:
        for endpoint in locality["lb_endpoints"]:
            endpoint["metadata"] = {"filter_metadata": {HOST_NAMESPACE: metadata}}
    cluster["outlier_detection"] = {
        "consecutive_5xx": 5,
        "consecutive_gateway_failure": 3,
        "consecutive_local_origin_failure": 2,
        "split_external_local_origin_errors": True,
        "interval": "1s",
        "base_ejection_time": "5s",
        "max_ejection_percent": 100,
    }
    # An ejected provider means "no host": the composite cluster then tries the next one
    # in the same attempt (a panic threshold would send traffic to the ejected host).
    cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    return cluster


def _composite(
    chain: str, steps: int, first: dict[str, Any], hcm: dict[str, Any]
) -> dict[str, Any]:
    """The cluster a chain's route sends to: attempt N goes to sub-cluster N.

    Envoy 1.40 takes the upstream filters and the HTTP protocol options of this cluster,
    and the transport socket (TLS, SNI) of the sub-cluster whose host was picked
    (measured). Without a transport socket of its own this cluster cannot negotiate
    ALPN (`auto_config` is refused), so a chain speaks HTTP/1.1 to every provider."""
    options: dict[str, Any] = {
        "@type": first["typed_extension_protocol_options"][_PROTOCOL]["@type"],
        "explicit_http_config": {"http_protocol_options": {}},
    }
    options["http_filters"] = [
        _attempt_filter(hcm),
        {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {"@type": _UPSTREAM_CODEC},
        },
    ]
    thresholds = {"priority": "DEFAULT", "max_connections": _HIGH, "max_pending_requests": _HIGH}
    return {
        "name": chain,
        "connect_timeout": first["connect_timeout"],
        "lb_policy": "CLUSTER_PROVIDED",
        "typed_extension_protocol_options": {_PROTOCOL: options},
        "circuit_breakers": {
            "thresholds": [{**thresholds, "max_requests": _HIGH, "max_retries": _HIGH}]
        },
        "cluster_type": {
            "name": "envoy.clusters.composite",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.clusters.composite.v3.ClusterConfig",
                "clusters": [{"name": f"{chain}_{i}"} for i in range(steps)],
            },
        },
    }


def _chain_route(chain: str, steps: int, dispatch: dict[str, Any]) -> dict[str, Any]:
    """Like the dispatch route, for one chain: one retry per further provider."""
    route = copy.deepcopy(dispatch)
    route["name"] = chain
    route["match"]["headers"] = [{"name": "x-gateway-cluster", "string_match": {"exact": chain}}]
    retry = route["route"].setdefault("retry_policy", {})
    retry["retry_on"] = _RETRY_ON
    retry["retriable_status_codes"] = list(RETRIABLE_STATUSES)
    retry["num_retries"] = steps - 1
    # The next provider is another vendor: no reason to wait before trying it.
    retry["retry_back_off"] = {"base_interval": "0.001s", "max_interval": "0.005s"}
    return route


def _render_chains(
    bootstrap: dict[str, Any], hcm: dict[str, Any], config: Config, template: dict[str, Any]
) -> None:
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    dispatch = _find(routes, "dispatch", "route")
    clusters = bootstrap["static_resources"]["clusters"]
    for chain in chains(config):
        name = chain_cluster(chain)
        steps = [_step_cluster(name, i, s, config, template) for i, s in enumerate(chain)]
        clusters += [*steps, _composite(name, len(chain), steps[0], hcm)]
        routes.insert(routes.index(dispatch), _chain_route(name, len(chain), dispatch))


def render_yaml(config: Config) -> str:
    return yaml.safe_dump(render(config, load_template(template_path(config))), sort_keys=False)
