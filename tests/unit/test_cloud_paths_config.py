"""`cloud_paths`: where Bedrock- and Vertex-mode clients are served, in the gateway config,
the request classifier and the Envoy routes `extproc up` renders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extproc import envoy_config
from extproc.apis import Endpoint, classify
from extproc.config import ConfigError, parse_config
from extproc.errors import NotFound, NotSupported

ROOT = Path(__file__).resolve().parents[2]
PROFILE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


def test_defaults() -> None:
    paths = parse_config({}).cloud_paths
    assert paths.prefixes() == (("/bedrock", "bedrock"), ("/vertex", "vertex"))
    assert paths.inference_profiles == ()


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ({"bedrock": "bedrock"}, "must be a path"),
        ({"bedrock": "/bedrock/"}, "must be a path"),
        ({"vertex": "/a b"}, "must be a path"),
        ({"bedrock": "/v1/bedrock"}, "overlaps"),
        ({"bedrock": "/clouds", "vertex": "/clouds/vertex"}, "must not nest"),
        ({"bedrock": "/c", "vertex": "/c"}, "must not nest"),
        ({"gcp": "/gcp"}, "unknown key"),
    ],
)
def test_bad_prefixes(value: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({"cloud_paths": value})


def test_classify_under_configured_prefixes() -> None:
    clouds = parse_config({"cloud_paths": {"bedrock": "/aws", "vertex": None}}).cloud_paths
    route = classify("POST", f"/aws/model/{PROFILE}/invoke", {}, clouds.prefixes())
    assert (route.api, route.endpoint) == ("bedrock", Endpoint.MESSAGES)
    assert route.cloud is not None
    assert route.cloud.model == PROFILE
    # a turned-off prefix is just an unknown path
    with pytest.raises(NotFound):
        classify(
            "POST",
            "/vertex/projects/p/locations/r/publishers/anthropic/models/m:rawPredict",
            {},
            clouds.prefixes(),
        )


def test_bedrock_count_tokens_is_not_supported() -> None:
    with pytest.raises(NotSupported) as caught:
        classify("POST", f"/bedrock/model/{PROFILE}/count-tokens", {}, (("/bedrock", "bedrock"),))
    assert (caught.value.status, caught.value.reason, caught.value.retryable) == (
        501,
        "not_supported",
        False,
    )


def test_profiles_listing_is_its_own_endpoint() -> None:
    route = classify(
        "GET", "/bedrock/inference-profiles?type=SYSTEM_DEFINED", {}, (("/bedrock", "bedrock"),)
    )
    assert route.endpoint is Endpoint.INFERENCE_PROFILES


def _routes(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}


def test_render_sets_the_cloud_routes() -> None:
    template = envoy_config.load_template(ROOT / "envoy" / "front-proxy.yaml")
    config = parse_config(
        {
            "cloud_paths": {"bedrock": "/aws", "vertex": None},
            "providers": {
                "anthropic": {"api": "anthropic", "base_url": "https://api.anthropic.com"},
            },
        }
    )
    routes = _routes(envoy_config.render(config, template))
    assert routes["bedrock"]["match"] == {"prefix": "/aws/"}
    assert routes["bedrock"]["route"]["cluster"] == "provider_anthropic"
    assert "vertex" not in routes
    assert list(routes)[-1] == "anthropic"  # the catch-all stays last


def test_the_cloud_clients_example_is_valid_and_renders(tmp_path: Path) -> None:
    import subprocess

    import yaml

    from extproc import supervisor

    example = yaml.safe_load((ROOT / "examples" / "cloud-clients.yaml").read_text())
    config = parse_config(example, "examples/cloud-clients.yaml")
    assert config.cloud_paths.inference_profiles
    rendered = envoy_config.render_yaml(config)
    routes = _routes(yaml.safe_load(rendered))
    assert routes["bedrock"]["route"]["cluster"] == "provider_bedrock"
    assert routes["vertex"]["route"]["cluster"] == "provider_bedrock"  # no Vertex provider
    path = tmp_path / "envoy.yaml"
    path.write_text(rendered)
    result = subprocess.run(
        [supervisor.envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
