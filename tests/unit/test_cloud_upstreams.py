"""The pure request shapes for Bedrock, Vertex, Foundry and Claude Platform on AWS."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from extproc import envoy_config, supervisor
from extproc.cloud import upstreams as up
from extproc.config import ConfigError, parse_config

BODY = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 10,
    "stream": True,
    "messages": [{"role": "user", "content": "hi"}],
}


SONNET = "anthropic.claude-sonnet-4-5-20250929-v1:0"
OPUS_EU = "eu.anthropic.claude-opus-4-1-20250805-v1:0"
PROFILE_ARN = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/ab12"


@pytest.mark.parametrize(
    ("model", "mapping", "prefix", "expected"),
    [
        (SONNET, {}, None, SONNET),
        (SONNET, {}, "us", f"us.{SONNET}"),
        (OPUS_EU, {}, "us", OPUS_EU),
        ("claude-sonnet-4-5", {"claude-sonnet-4-5": f"global.{SONNET}"}, None, f"global.{SONNET}"),
        ("x", {"x": PROFILE_ARN}, "us", PROFILE_ARN),
    ],
)
def test_bedrock_model_ids(
    model: str, mapping: dict[str, str], prefix: str | None, expected: str
) -> None:
    assert up.bedrock_model_id(model, mapping, prefix) == expected


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "anthropic.x/../y", "anthropic.a\r\nb", ""])
def test_unmapped_or_malformed_bedrock_ids_are_refused(model: str) -> None:
    with pytest.raises(up.CloudRequestError, match="Bedrock id"):
        up.bedrock_model_id(model, {}, "us")


def test_bedrock_request_moves_the_model_to_the_url_and_betas_into_the_body() -> None:
    body = {**BODY, "anthropic_beta": ["a"]}
    request = up.bedrock_request("messages", body, "us.anthropic.claude-x-v1:0", ["b", "a"], None)
    assert request.path == "/model/us.anthropic.claude-x-v1%3A0/invoke-with-response-stream"
    assert request.body is not None
    assert "model" not in request.body
    assert "stream" not in request.body
    assert request.body["anthropic_version"] == up.BEDROCK_VERSION
    assert request.body["anthropic_beta"] == ["a", "b"]
    assert ("accept", up.EVENT_STREAM) in request.set_headers
    assert "anthropic-beta" in request.remove_headers


def test_bedrock_drops_beta_flags_it_would_refuse_unless_told_to_pass_all() -> None:
    betas = ["claude-code-20250219", "context-1m-2025-08-07", "oauth-2025-04-20"]
    body = {**BODY, "anthropic_beta": ["mcp-servers-2025-12-04"]}
    kept = up.bedrock_request("messages", body, "anthropic.claude-x-v1:0", betas)
    assert kept.body is not None
    assert kept.body["anthropic_beta"] == ["context-1m-2025-08-07"]
    none = up.bedrock_request("messages", body, "anthropic.claude-x-v1:0", ["oauth-2025-04-20"])
    assert none.body is not None
    assert "anthropic_beta" not in none.body
    every = up.bedrock_request("messages", body, "anthropic.claude-x-v1:0", betas, None)
    assert every.body is not None
    assert every.body["anthropic_beta"] == ["mcp-servers-2025-12-04", *betas]


def test_bedrock_keeps_a_client_anthropic_version_and_invokes_without_stream() -> None:
    body = {**BODY, "stream": False, "anthropic_version": "bedrock-2023-05-31"}
    request = up.bedrock_request("messages", body, "anthropic.claude-x-v1:0", [])
    assert request.path.endswith("/invoke")
    assert request.body is not None
    assert "anthropic_beta" not in request.body


def test_bedrock_has_no_count_tokens() -> None:
    with pytest.raises(up.NotSupported):
        up.bedrock_request("count_tokens", BODY, "anthropic.claude-x-v1:0", [])


def test_vertex_paths_and_body() -> None:
    model = up.vertex_model_id(
        "claude-sonnet-4-5", {"claude-sonnet-4-5": "claude-sonnet-4-5@20250929"}
    )
    request = up.vertex_request("messages", BODY, model, "my-proj", "us-east5")
    base = "/v1/projects/my-proj/locations/us-east5/publishers/anthropic/models"
    assert request.path == f"{base}/claude-sonnet-4-5@20250929:streamRawPredict"
    assert request.body is not None
    assert "model" not in request.body
    assert request.body["anthropic_version"] == up.VERTEX_VERSION
    assert request.body["stream"] is True
    plain = up.vertex_request("messages", {**BODY, "stream": False}, model, "my-proj", "global")
    assert plain.path.endswith(":rawPredict")
    count = up.vertex_request("count_tokens", BODY, model, "my-proj", "us-east5")
    assert count.path == f"{base}/count-tokens:rawPredict"
    assert count.body is not None
    assert count.body["model"] == model
    assert up.vertex_host("global") == "aiplatform.googleapis.com"
    assert up.vertex_host("europe-west1") == "europe-west1-aiplatform.googleapis.com"


@pytest.mark.parametrize(
    ("project", "region"), [("p/../x", "us-east5"), ("proj", "us east"), ("", "r")]
)
def test_vertex_refuses_names_that_would_change_the_path(project: str, region: str) -> None:
    with pytest.raises(up.CloudRequestError):
        up.vertex_request("messages", BODY, "claude-x@20250101", project, region)


@pytest.mark.parametrize("model", ["claude-x@2025", "Claude X", "claude-x:rawPredict"])
def test_vertex_refuses_malformed_ids(model: str) -> None:
    with pytest.raises(up.CloudRequestError):
        up.vertex_model_id(model, {})


def test_foundry_and_claude_platform_on_aws() -> None:
    assert up.foundry_request("messages", "/anthropic").path == "/anthropic/v1/messages"
    assert (
        up.foundry_request("count_tokens", "/anthropic").path
        == "/anthropic/v1/messages/count_tokens"
    )
    assert up.foundry_key_headers("k") == {"x-api-key": "k", "api-key": "k"}
    aws = up.claude_platform_aws_request("messages", "wrkspc_01")
    assert aws.path == "/v1/messages"
    assert aws.body is None
    assert aws.set_headers == (("anthropic-workspace-id", "wrkspc_01"),)
    assert up.claude_platform_aws_request("messages", None).set_headers == ()


def test_beta_list() -> None:
    assert up.beta_list(" a, b,,c ") == ["a", "b", "c"]
    assert up.beta_list(None) == []


# --------------------------------------------------------------------------- SigV4 vs botocore


@pytest.mark.parametrize(
    ("url", "token"),
    [
        (
            "https://bedrock-runtime.us-east-1.amazonaws.com/model/us.anthropic.claude-x-v1%3A0/invoke",
            None,
        ),
        (
            "http://127.0.0.1:8443/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ax%2Fy/invoke",
            "tok/+=",
        ),
        ("https://aws-external-anthropic.us-west-2.api.aws/v1/messages?beta=true&a=%20b", "t"),
        ("https://h.example/", None),
    ],
)
def test_pure_sigv4_matches_botocore(url: str, token: str | None) -> None:
    import datetime as dt

    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import ReadOnlyCredentials

    from extproc.cloud import sigv4

    now = dt.datetime(2026, 12, 2, 1, 2, 3, tzinfo=dt.UTC)
    body = b'{"messages": [{"role": "user", "content": "h\\u00e9"}]}'
    ours = sigv4.sign(
        sigv4.AwsKeys("AKID", "s3cr3t", token), "bedrock", "eu-west-1", "POST", url, body, now=now
    )
    names = ["content-type", "host", "x-amz-date"] + (["x-amz-security-token"] if token else [])
    from urllib.parse import urlsplit

    headers = {"content-type": "application/json", "host": urlsplit(url).netloc, **ours}
    request = AWSRequest(method="POST", url=url, data=body, headers={n: headers[n] for n in names})
    request.context["timestamp"] = ours["x-amz-date"]
    auth = SigV4Auth(ReadOnlyCredentials("AKID", "s3cr3t", token), "bedrock", "eu-west-1")
    expected = auth.signature(
        auth.string_to_sign(request, auth.canonical_request(request)), request
    )
    assert ours["authorization"].endswith(f"Signature={expected}")
    assert f"SignedHeaders={';'.join(names)}," in ours["authorization"]


# --------------------------------------------------------------------------- config and Envoy


def test_the_cloud_example_renders_a_tls_cluster_per_cloud_that_envoy_accepts(
    tmp_path: Path,
) -> None:
    root = Path(__file__).resolve().parents[2]
    example = yaml.safe_load((root / "examples" / "cloud-upstreams.yaml").read_text())
    config = parse_config(example)
    template = envoy_config.load_template(envoy_config.template_path(config))
    bootstrap = envoy_config.render(config, template)
    clusters = bootstrap["static_resources"]["clusters"]
    sni = {
        c["name"]: c["transport_socket"]["typed_config"]["sni"]
        for c in clusters
        if c["name"].startswith("provider_")
    }
    assert sni == {
        "provider_bedrock": "bedrock-runtime.us-east-1.amazonaws.com",
        "provider_vertex": "us-east5-aiplatform.googleapis.com",
        "provider_foundry": "my-resource.services.ai.azure.com",
        "provider_claude-aws": "aws-external-anthropic.us-west-2.api.aws",
    }
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(bootstrap), encoding="utf-8")
    command = [supervisor.envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "critical"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


BEDROCK_CLOUD = {"kind": "bedrock", "region": "us-east-1"}
SHORT_PROJECT = {"kind": "vertex", "project": "p", "region": "us-east5"}


@pytest.mark.parametrize(
    ("provider", "problem"),
    [
        ({"api": "bedrock", "base_url": "https://b.example"}, "api: bedrock needs cloud"),
        (
            {"api": "anthropic", "base_url": "https://b.example", "cloud": BEDROCK_CLOUD},
            "cloud kind bedrock needs api: bedrock",
        ),
        (
            {"api": "openai", "base_url": "https://f.example", "cloud": {"kind": "foundry"}},
            "cloud kind foundry needs api: anthropic",
        ),
        (
            {"api": "vertex", "base_url": "https://v.example", "cloud": SHORT_PROJECT},
            "Google Cloud project",
        ),
    ],
)
def test_cloud_provider_config_errors_name_the_fix(
    provider: dict[str, object], problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_config({"providers": {"cloud": provider}})
