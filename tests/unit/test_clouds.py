"""Client-facing Bedrock and Vertex paths and bodies (extproc.apis.clouds)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from extproc.apis.clouds import (
    CloudAction,
    CloudKind,
    CloudPath,
    anthropic_request,
    bedrock_error_body,
    bedrock_exception_type,
    beta_header,
    inference_profiles_body,
    parse_cloud_path,
    to_messages_body,
    without_invocation_metrics,
)
from extproc.errors import BadRequest, MethodNotAllowed, NotFound

PROFILE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
VERTEX_BASE = "/vertex/projects/proj-1/locations/us-east5/publishers/anthropic/models"


def bedrock(method: str, path: str) -> CloudPath | None:
    return parse_cloud_path(method, path, "/bedrock", "bedrock")


def vertex(method: str, path: str) -> CloudPath | None:
    return parse_cloud_path(method, path, "/vertex", "vertex")


@pytest.mark.parametrize(
    ("path", "action", "model"),
    [
        (f"/bedrock/model/{PROFILE}/invoke", CloudAction.INVOKE, PROFILE),
        (
            f"/bedrock/model/{PROFILE}/invoke-with-response-stream",
            CloudAction.INVOKE_STREAM,
            PROFILE,
        ),
        # the anthropic JS SDK percent-encodes the colon; the Python one keeps it
        (
            "/bedrock/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/invoke",
            CloudAction.INVOKE,
            PROFILE,
        ),
        (
            "/bedrock/model/anthropic.claude-3-haiku/invoke?x=1",
            CloudAction.INVOKE,
            "anthropic.claude-3-haiku",
        ),
        (f"/bedrock/model/{PROFILE}/count-tokens", CloudAction.COUNT_TOKENS, PROFILE),
        (
            "/bedrock/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1234%3Ainference-profile%2Fus.anthropic.x-v1%3A0/invoke",
            CloudAction.INVOKE,
            "arn:aws:bedrock:us-east-1:1234:inference-profile/us.anthropic.x-v1:0",
        ),
    ],
)
def test_bedrock_paths(path: str, action: CloudAction, model: str) -> None:
    parsed = bedrock("POST", path)
    assert parsed is not None
    assert (parsed.cloud, parsed.action, parsed.model) == ("bedrock", action, model)


def test_inference_profiles() -> None:
    parsed = bedrock("GET", "/bedrock/inference-profiles?type=SYSTEM_DEFINED")
    assert parsed is not None
    assert parsed.action is CloudAction.INFERENCE_PROFILES


@pytest.mark.parametrize(
    ("path", "action", "model", "version"),
    [
        (
            f"{VERTEX_BASE}/claude-sonnet-4-5@20250929:streamRawPredict",
            CloudAction.STREAM_RAW_PREDICT,
            "claude-sonnet-4-5@20250929",
            "",
        ),
        (
            f"{VERTEX_BASE}/claude-opus-5-5:rawPredict",
            CloudAction.RAW_PREDICT,
            "claude-opus-5-5",
            "",
        ),
        (f"{VERTEX_BASE}/claude-x%40v1:rawPredict", CloudAction.RAW_PREDICT, "claude-x@v1", ""),
        (f"{VERTEX_BASE}/count-tokens:rawPredict", CloudAction.COUNT_TOKENS, "", ""),
        (
            "/vertex/v1/projects/p/locations/global/publishers/anthropic/models/m@1:streamRawPredict",
            CloudAction.STREAM_RAW_PREDICT,
            "m@1",
            "/v1",
        ),
    ],
)
def test_vertex_paths(path: str, action: CloudAction, model: str, version: str) -> None:
    parsed = vertex("POST", path)
    assert parsed is not None
    assert (parsed.action, parsed.model, parsed.api_version) == (action, model, version)


def test_other_prefixes_are_not_ours() -> None:
    assert bedrock("POST", "/v1/messages") is None
    assert bedrock("POST", "/bedrockx/model/a/invoke") is None
    assert vertex("POST", "/bedrock/model/a/invoke") is None


@pytest.mark.parametrize(
    "path",
    [
        "/bedrock",
        "/bedrock/model/a/converse",
        "/bedrock/model/a/b/invoke",
        "/bedrock/models",
        f"{VERTEX_BASE}/m:predict",
        "/vertex/projects/p/locations/r/publishers/google/models/m:rawPredict",
    ],
)
def test_unknown_paths_under_a_prefix_are_404(path: str) -> None:
    cloud: CloudKind = "bedrock" if path.startswith("/bedrock") else "vertex"
    with pytest.raises(NotFound):
        parse_cloud_path("POST", path, f"/{cloud}", cloud)


@pytest.mark.parametrize(
    "path",
    [
        "/bedrock/model/../invoke",
        "/bedrock/model/%2E%2E/invoke",
        "/bedrock/model/a%0d%0ab/invoke",
        "/bedrock/model/a%20b/invoke",
        "/bedrock/model/%ff/invoke",
        "/bedrock/model/arn%3Ax%2F%2Fy/invoke",
        "/bedrock/model/.hidden/invoke",
    ],
)
def test_bad_model_ids_are_400(path: str) -> None:
    with pytest.raises(BadRequest) as caught:
        bedrock("POST", path)
    assert caught.value.reason == "invalid_model"


def test_bad_vertex_segments() -> None:
    with pytest.raises(BadRequest):
        vertex("POST", "/vertex/projects/p%0a/locations/r/publishers/anthropic/models/m:rawPredict")


def test_wrong_method() -> None:
    with pytest.raises(MethodNotAllowed):
        bedrock("GET", f"/bedrock/model/{PROFILE}/invoke")
    with pytest.raises(MethodNotAllowed):
        bedrock("POST", "/bedrock/inference-profiles")


BEDROCK_BODY: dict[str, Any] = {
    "anthropic_version": "bedrock-2023-05-31",
    "anthropic_beta": ["interleaved-thinking-2025-05-14"],
    "max_tokens": 10,
    "messages": [{"role": "user", "content": "hi"}],
}


def test_bedrock_body_round_trip() -> None:
    where = bedrock("POST", f"/bedrock/model/{PROFILE}/invoke-with-response-stream")
    assert where is not None
    messages = to_messages_body(BEDROCK_BODY, where)
    assert messages["model"] == PROFILE
    assert messages["stream"] is True
    assert messages["anthropic_beta"] == ["interleaved-thinking-2025-05-14"]


def test_bedrock_invoke_does_not_stream() -> None:
    where = bedrock("POST", f"/bedrock/model/{PROFILE}/invoke")
    assert where is not None
    assert "stream" not in to_messages_body(BEDROCK_BODY, where)


def test_vertex_body_keeps_its_stream_flag() -> None:
    where = vertex("POST", f"{VERTEX_BASE}/m@1:streamRawPredict")
    assert where is not None
    body = {
        "anthropic_version": "vertex-2023-10-16",
        "stream": True,
        "max_tokens": 5,
        "messages": [],
    }
    messages = to_messages_body(body, where)
    assert (messages["model"], messages["stream"]) == ("m@1", True)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (f"/bedrock/model/{PROFILE}/invoke", {**BEDROCK_BODY, "model": "other"}),
        (f"/bedrock/model/{PROFILE}/invoke", {**BEDROCK_BODY, "stream": True}),
    ],
)
def test_conflicting_body_fields_are_400(path: str, body: dict[str, Any]) -> None:
    where = bedrock("POST", path)
    assert where is not None
    with pytest.raises(BadRequest):
        to_messages_body(body, where)


def test_vertex_count_tokens_keeps_the_body_model() -> None:
    where = vertex("POST", f"{VERTEX_BASE}/count-tokens:rawPredict")
    assert where is not None
    body = {"model": "claude-x@1", "messages": []}
    assert to_messages_body(body, where)["model"] == "claude-x@1"


def test_beta_header() -> None:
    assert beta_header(BEDROCK_BODY) == "interleaved-thinking-2025-05-14"
    assert beta_header({}) is None
    for bad in ("a", [1], ["a\r\nx: y"]):
        with pytest.raises(BadRequest):
            beta_header({"anthropic_beta": bad})


def test_bedrock_error_body_serves_both_client_kinds() -> None:
    body = orjson.loads(bedrock_error_body(429, "nope", "rate_limit_error"))
    assert (body["message"], body["__type"]) == ("nope", "ThrottlingException")
    assert body["error"] == {"type": "rate_limit_error", "message": "nope"}
    assert bedrock_exception_type(429) == "ThrottlingException"
    assert bedrock_exception_type(502) == "InternalServerException"


def test_inference_profiles_body() -> None:
    body = orjson.loads(inference_profiles_body([PROFILE]))
    [summary] = body["inferenceProfileSummaries"]
    assert summary["inferenceProfileId"] == PROFILE
    assert summary["status"] == "ACTIVE"


def test_cross_serving_a_bedrock_client_from_the_anthropic_api() -> None:
    where = bedrock("POST", f"/bedrock/model/{PROFILE}/invoke-with-response-stream")
    assert where is not None
    body, path, beta = anthropic_request(BEDROCK_BODY, where)
    assert path == "/v1/messages"
    assert beta == "interleaved-thinking-2025-05-14"
    assert body == {
        "model": PROFILE,
        "stream": True,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert BEDROCK_BODY["anthropic_version"] == "bedrock-2023-05-31"  # input untouched


def test_cross_serving_vertex_count_tokens() -> None:
    where = vertex("POST", f"{VERTEX_BASE}/count-tokens:rawPredict")
    assert where is not None
    body, path, beta = anthropic_request({"model": "m@1", "messages": []}, where)
    assert (path, beta, body) == (
        "/v1/messages/count_tokens",
        None,
        {"model": "m@1", "messages": []},
    )


def test_invocation_metrics_are_dropped() -> None:
    event: dict[str, Any] = {"type": "message_stop", "amazon-bedrock-invocationMetrics": {}}
    assert without_invocation_metrics(event)
    assert event == {"type": "message_stop"}
    assert not without_invocation_metrics(event)
