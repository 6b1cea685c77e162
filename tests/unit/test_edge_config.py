"""Every shipped Envoy config carries the edge hardening; the fd-limit check; model ids.

Issue 11 items 13, 15 and 16: request-header/idle timeouts, a downstream connection cap
below the descriptor limit, path normalisation with escaped-slash rejection, the filter
that strips gateway keys after ext_proc (fail open) and the plain 503 for a dead or hung
ext_proc server, in envoy/*.yaml, the compose and sidecar bootstraps and the Istio
EnvoyFilters.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc import envoy_config, fdlimit
from extproc.apis import Endpoint, classify
from extproc.config import Config, parse_config
from extproc.errors import BadRequest

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAPS = [
    *sorted((ROOT / "envoy").glob("*.yaml")),
    ROOT / "deploy" / "compose" / "envoy.yaml",
    ROOT / "deploy" / "k8s" / "sidecar" / "envoy.yaml",
]
ISTIO = sorted((ROOT / "deploy" / "istio").glob("envoyfilter-*.yaml"))
HCM = "envoy.filters.network.http_connection_manager"
Json = dict[str, Any]


def _hcms(bootstrap: Json) -> list[Json]:
    return [
        f["typed_config"]
        for listener in bootstrap["static_resources"]["listeners"]
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == HCM
    ]


def _seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def _check_hcm(hcm: Json) -> None:
    assert 0 < _seconds(hcm["request_headers_timeout"]) <= 30
    assert 0 < _seconds(hcm["request_timeout"]) <= 600
    assert 0 < _seconds(hcm["common_http_protocol_options"]["idle_timeout"]) <= 300
    assert hcm["normalize_path"] is True
    assert hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    first = hcm["local_reply_config"]["mappers"][0]
    assert first["status_code"] == 503
    assert "ext_proc_error" in str(first["filter"])
    assert "RESPONSE_CODE_DETAILS" not in str(first)


def _check_filters(filters: list[Json]) -> None:
    names = [f["name"] for f in filters]
    ext_proc = names.index("envoy.filters.http.ext_proc")
    assert names[ext_proc + 1 :] == ["envoy.filters.http.lua", "envoy.filters.http.router"]
    source = filters[ext_proc + 1]["typed_config"]["default_source_code"]["inline_string"]
    assert "gwk_" in source
    assert "x-api-key" in source
    assert "authorization" in source


@pytest.mark.parametrize("path", BOOTSTRAPS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_bootstrap_has_timeouts_a_cap_normalisation_and_key_stripping(path: Path) -> None:
    bootstrap = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert envoy_config.max_connections(bootstrap) is not None
    for hcm in _hcms(bootstrap):
        _check_hcm(hcm)
        _check_filters(hcm["http_filters"])


@pytest.mark.parametrize("path", ISTIO, ids=lambda p: p.stem)
def test_every_istio_filter_patches_the_same_settings(path: Path) -> None:
    patches = yaml.safe_load(path.read_text(encoding="utf-8"))["spec"]["configPatches"]
    merges = [
        p
        for p in patches
        if p["applyTo"] == "NETWORK_FILTER" and p["patch"]["operation"] == "MERGE"
    ]
    (merge,) = merges
    _check_hcm(merge["patch"]["value"]["typed_config"])
    names = [p["patch"]["value"].get("name") for p in patches]
    assert "envoy.filters.network.connection_limit" in names
    assert names.index("envoy.filters.http.lua") > names.index("envoy.filters.http.ext_proc")


# --------------------------------------------------------------------------- the fd limit


def test_connection_cap_fits_the_descriptor_limit() -> None:
    assert fdlimit.connection_cap(None, 50_000, 1_048_576) == 50_000
    assert fdlimit.connection_cap(None, 50_000, 20_000) == (20_000 - fdlimit.RESERVE) // 2
    assert fdlimit.connection_cap(1_000, 50_000, 20_000) == 1_000
    with pytest.raises(fdlimit.FdLimitError, match=r"envoy\.max_connections is 50000"):
        fdlimit.connection_cap(50_000, 50_000, 20_000)
    with pytest.raises(fdlimit.FdLimitError, match="too low"):
        fdlimit.connection_cap(None, 50_000, 200)


def test_render_sets_the_configured_cap() -> None:
    template = envoy_config.load_template(ROOT / "envoy" / "front-proxy.yaml")
    config = parse_config({"envoy": {"max_connections": 1234}})
    assert envoy_config.max_connections(envoy_config.render(config, template)) == 1234
    assert envoy_config.render(Config(), template) == template


def test_up_refuses_a_cap_the_descriptor_limit_cannot_hold(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("envoy:\n  max_connections: 50000\n", encoding="utf-8")
    # util-linux prlimit, not preexec_fn: forking beside gRPC threads can kill the child
    # (see supervisor.with_parent).
    command = [sys.executable, "-m", "extproc", "up", "--config", str(config)]
    result = subprocess.run(
        ["prlimit", "--nofile=4096:4096", "--", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "envoy.max_connections is 50000" in result.stderr
    assert "ulimit -n" in result.stderr


# --------------------------------------------------------------------------- model ids


@pytest.mark.parametrize(
    "model_id", ["claude-opus-4-8", "gpt-5-mini", "us.anthropic.claude-3-5:0", "ft:gpt-4o:org::1"]
)
def test_plain_model_ids_are_model_requests(model_id: str) -> None:
    assert classify("GET", f"/v1/models/{model_id}", {}).endpoint is Endpoint.MODELS


@pytest.mark.parametrize("model_id", ["..", "..;", "%2e%2e", "a..b", ".hidden", "x%2Fy", "-x"])
def test_odd_model_ids_are_refused(model_id: str) -> None:
    with pytest.raises(BadRequest, match="model id"):
        classify("GET", f"/v1/models/{model_id}", {})
