"""Config validation: every error names the key and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extproc import envoy_config
from extproc.config import Config, ConfigError, load_config, parse_config


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def test_defaults_are_the_documented_laptop_setup() -> None:
    config = Config()
    assert str(config.listen) == "127.0.0.1:8080"
    assert config.store == "memory://"
    assert config.providers["anthropic"].base_url == "https://api.anthropic.com"
    assert config.failure_mode_allow is False
    assert config.audit.record_text is False


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"listen": "8080"}, "listen: '8080' is not 'host:port'"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"providers": {}}, "declare at least one provider"),
        ({"providers": {"Bad Name": {"api": "openai", "base_url": "http://x"}}}, "lower-case"),
        ({"providers": {"p": {"api": "openai", "base_url": "ftp://x"}}}, "providers.p.base_url"),
        ({"providers": {"p": {"api": "cohere", "base_url": "http://x"}}}, "providers.p.api"),
        (
            {"providers": {"p": {"api": "openai", "base_url": "http://x", "credential": {}}}},
            "exactly one of env, file or value",
        ),
        ({"store": "mysql://x"}, "use memory://"),
        ({"limits": {"max_body_bytes": 10}}, "limits.max_body_bytes"),
        ({"profiles": {"x": {}}}, "define a 'default' profile"),
        ({"auth": {"keys": [{"id": "a", "hash": "md5:x"}]}}, "keys generate"),
        ({"auth": {"cache_seconds": 60}}, "auth.cache_seconds"),
        ({"models": {"routes": [{"match": "*", "provider": "ghost"}]}}, "'ghost' is not declared"),
        ({"teams": {"t": {"tier": "gold"}}}, "teams.t.tier: 'gold' is not declared under tiers"),
    ],
)
def test_errors_name_key_and_fix(data: Any, fragment: str) -> None:
    assert any(fragment in problem for problem in problems(data)), problems(data)


def test_top_level_must_be_a_mapping() -> None:
    assert problems([1]) == ["(top level): expected a mapping of keys to values"]


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_relative_bootstrap_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "gateway.yaml"
    path.parent.mkdir()
    path.write_text("envoy: {bootstrap: ../envoy.yaml}\n")
    assert load_config(path).envoy.bootstrap == tmp_path / "conf" / ".." / "envoy.yaml"


def test_render_patches_only_what_the_config_owns() -> None:
    config = parse_config(
        {
            "listen": "0.0.0.0:9000",
            "grpc_listen": "10.0.0.5:7000",
            "failure_mode_allow": True,
            "limits": {"max_body_bytes": 2048},
            "providers": {
                "local": {"api": "openai", "base_url": "http://127.0.0.1:8000/v1base"},
                "claude": {"api": "anthropic", "base_url": "https://api.anthropic.com"},
            },
        }
    )
    template = envoy_config.load_template(envoy_config._REPO_TEMPLATE)
    rendered = envoy_config.render(config, template)
    listener = rendered["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 9000}
    assert listener["per_connection_buffer_limit_bytes"] == 2048
    clusters = {c["name"]: c for c in rendered["static_resources"]["clusters"]}
    assert set(clusters) == {"extproc", "provider_local", "provider_claude"}
    assert "transport_socket" not in clusters["provider_local"]
    assert (
        clusters["provider_claude"]["transport_socket"]["typed_config"]["sni"]
        == "api.anthropic.com"
    )
    routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    by_name = {r["name"]: r for r in routes["virtual_hosts"][0]["routes"]}
    assert by_name["openai"]["route"]["cluster"] == "provider_local"
    assert by_name["anthropic"]["route"]["cluster"] == "provider_claude"
    assert template != rendered  # the template itself is untouched


_SSO: Any = {
    "oidc": {"issuer": "https://idp.example.com", "client_id": "gw", "client_secret": {"env": "S"}}
}


def test_sso_example_config_is_valid() -> None:
    config = load_config(Path(__file__).parents[2] / "examples" / "sso.yaml")
    assert config.sso is not None
    assert [p.group for p in config.sso.groups] == ["ml-platform", "eng-*"]
    assert config.otlp_relay.endpoint == "http://otel-collector:4318"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"store": "redis://r:6379/0", "sso": _SSO}, "sso.signing_key: replicas sharing a store"),
        ({"sso": {**_SSO, "groups": [{"group": "g", "team": "nope"}]}}, "team 'nope'"),
        ({"sso": {**_SSO, "default": {"tier": "gold"}}}, "tier 'gold'"),
        ({"sso": {**_SSO, "oidc": {**_SSO["oidc"], "issuer": "ftp://x"}}}, "http:// or https://"),
        ({"otlp_relay": {"endpoint": "collector:4318"}}, "http:// or https://"),
    ],
)
def test_sso_config_errors(data: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert fragment in "; ".join(caught.value.problems)
