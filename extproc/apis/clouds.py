"""The client-facing Bedrock and Vertex wire formats: paths, bodies and error bodies.

Claude Code (and the `anthropic` SDK's AnthropicBedrock / AnthropicVertex clients)
speak Anthropic Messages with the model in the URL when pointed at a cloud. The
gateway serves them under configurable path prefixes (`/bedrock`, `/vertex`):

    Bedrock  GET  {prefix}/inference-profiles?type=SYSTEM_DEFINED       (at start; 404 tolerated)
             POST {prefix}/model/{id}/invoke                            JSON answer
             POST {prefix}/model/{id}/invoke-with-response-stream       event-stream answer
             POST {prefix}/model/{id}/count-tokens                      (not served: 501)
    Vertex   POST {prefix}[/v1]/projects/{p}/locations/{r}/publishers/anthropic/models/ + ...
                  {id}:rawPredict          JSON, or SSE when the body has `stream: true`
                  {id}:streamRawPredict    SSE answer
                  count-tokens:rawPredict  the model in the body

Recorded from Claude Code 2.1.332: `{id}` is a Bedrock inference-profile id with a literal
`:` (`us.anthropic.claude-sonnet-4-5-20250929-v1:0`; other clients percent-encode it,
so it is decoded here) or a Vertex `name@version` (or a bare name). Bedrock bodies have
no `model` and no `stream` (the path says whether to stream) and carry
`anthropic_version: "bedrock-2023-05-31"` and `anthropic_beta: [...]`; Vertex bodies have
no `model`, carry `anthropic_version: "vertex-2023-10-16"` and `stream: true` when
streaming, and send `anthropic-beta` as a header. Neither sends SigV4 or a Google token
to the gateway when told to skip cloud auth (`CLAUDE_CODE_SKIP_*_AUTH=1`); the gateway
key comes as `x-api-key` (ANTHROPIC_API_KEY) or `Authorization: Bearer`
(ANTHROPIC_AUTH_TOKEN, or AWS_BEARER_TOKEN_BEDROCK without the skip).

Everything here is pure: a path in, a `CloudPath` or a `GatewayError` out; a body in,
the canonical Anthropic Messages body out (`upstream/cloud_clients.py` sends it on).
"""

from __future__ import annotations

import enum
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from extproc.errors import BadRequest, MethodNotAllowed, NotFound

__all__ = [
    "BEDROCK_VERSION",
    "VERTEX_VERSION",
    "CloudAction",
    "CloudKind",
    "CloudPath",
    "anthropic_request",
    "bedrock_error_body",
    "bedrock_exception_type",
    "beta_header",
    "check_cloud_model",
    "inference_profiles_body",
    "parse_cloud_path",
    "to_messages_body",
    "without_invocation_metrics",
]

CloudKind = Literal["bedrock", "vertex"]
BEDROCK_VERSION: Final = "bedrock-2023-05-31"
VERTEX_VERSION: Final = "vertex-2023-10-16"


class CloudAction(enum.Enum):
    INVOKE = "invoke"  # Bedrock /invoke: JSON answer
    INVOKE_STREAM = "invoke-with-response-stream"  # Bedrock: event-stream answer
    RAW_PREDICT = "rawPredict"  # Vertex: streams when the body says `stream: true`
    STREAM_RAW_PREDICT = "streamRawPredict"  # Vertex: SSE answer
    COUNT_TOKENS = "count-tokens"
    INFERENCE_PROFILES = "inference-profiles"


@dataclass(frozen=True, slots=True)
class CloudPath:
    """A parsed cloud request path. `model` is decoded ('' for listings and Vertex
    count-tokens, whose model is in the body)."""

    cloud: CloudKind
    action: CloudAction
    prefix: str
    model: str = ""
    project: str = ""
    location: str = ""
    api_version: str = ""  # Vertex: the optional `/v1` after the prefix, kept as sent

    @property
    def method(self) -> str:
        return "GET" if self.action is CloudAction.INFERENCE_PROFILES else "POST"

    @property
    def streams_by_path(self) -> bool | None:
        """Bedrock streams by path; Vertex by the body's `stream` (None here)."""
        if self.cloud == "bedrock":
            return self.action is CloudAction.INVOKE_STREAM
        return None


# A cloud model id: a Bedrock model or inference-profile id (`us.anthropic.x-v1:0`), a
# Vertex `name@version`, or a Bedrock ARN (`arn:aws:bedrock:...:inference-profile/id`,
# its `/` percent-encoded by clients). Never a dot segment, CR/LF or an encoded byte.
_CLOUD_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+\-]{0,255}|arn:[A-Za-z0-9._:@+\-/]{1,2044}")
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}")
_BEDROCK_ACTIONS = {a.value: a for a in (CloudAction.INVOKE, CloudAction.INVOKE_STREAM)}
_BEDROCK_ACTIONS["count-tokens"] = CloudAction.COUNT_TOKENS
_VERTEX_ACTIONS = {a.value: a for a in (CloudAction.RAW_PREDICT, CloudAction.STREAM_RAW_PREDICT)}
_VERTEX = re.compile(
    r"(?P<v>/v1(?:beta1)?)?/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
    r"/publishers/anthropic/models/(?P<model>[^/]+):(?P<action>[A-Za-z]+)"
)


def check_cloud_model(model: str) -> None:
    """`BadRequest` unless `model` is a plain cloud model id (it goes into a URL and a header)."""
    if not _CLOUD_MODEL.fullmatch(model) or ".." in model or "//" in model:
        raise BadRequest(
            "the model id in the path may contain only letters, digits and . _ : @ + - "
            "(and / in an ARN)",
            reason="invalid_model",
        )


def _decoded(segment: str) -> str:
    try:
        return urllib.parse.unquote(segment, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadRequest("the model id in the path is not UTF-8", reason="invalid_model") from exc


def parse_cloud_path(method: str, raw_path: str, prefix: str, cloud: CloudKind) -> CloudPath | None:
    """The cloud request at `raw_path` under `prefix`; None when the path is not under it.

    `NotFound` for an unknown path under the prefix, `MethodNotAllowed` for a wrong
    method, `BadRequest` for a malformed model id."""
    path = raw_path.split("?", 1)[0]
    if path != prefix and not path.startswith(prefix + "/"):
        return None
    rest = path[len(prefix) :]
    parsed = _parse_bedrock(rest, prefix) if cloud == "bedrock" else _parse_vertex(rest, prefix)
    if parsed is None:
        raise NotFound(f"the gateway's {cloud} endpoint does not serve {path!r}; see the README")
    if method != parsed.method:
        raise MethodNotAllowed(f"{path} accepts {parsed.method}, not {method}")
    return parsed


def _parse_bedrock(rest: str, prefix: str) -> CloudPath | None:
    if rest.rstrip("/") == "/inference-profiles":
        return CloudPath("bedrock", CloudAction.INFERENCE_PROFILES, prefix)
    parts = rest.split("/")
    if len(parts) != 4 or parts[1] != "model" or parts[3] not in _BEDROCK_ACTIONS:
        return None
    model = _decoded(parts[2])
    check_cloud_model(model)
    return CloudPath("bedrock", _BEDROCK_ACTIONS[parts[3]], prefix, model=model)


def _parse_vertex(rest: str, prefix: str) -> CloudPath | None:
    match = _VERTEX.fullmatch(rest)
    if match is None:
        return None
    project, location = match["project"], match["location"]
    if not (_SEGMENT.fullmatch(project) and _SEGMENT.fullmatch(location)):
        raise BadRequest("the project or location in the path is malformed", reason="bad_path")
    action, model = match["action"], _decoded(match["model"])
    common = {"project": project, "location": location, "api_version": match["v"] or ""}
    if model == "count-tokens" and action == "rawPredict":
        return CloudPath("vertex", CloudAction.COUNT_TOKENS, prefix, **common)
    if action not in _VERTEX_ACTIONS:
        return None
    check_cloud_model(model)
    return CloudPath("vertex", _VERTEX_ACTIONS[action], prefix, model=model, **common)


# -- bodies --------------------------------------------------------------------------


def to_messages_body(body: dict[str, Any], where: CloudPath) -> dict[str, Any]:
    """The request as an Anthropic Messages body (the model from the URL, `stream` from
    the path on Bedrock); `anthropic_version`/`anthropic_beta` stay, so the Bedrock or
    Vertex upstream gets them back untouched. `BadRequest` when the body names a model
    (the URL does; a second one would let a caller pass the allow-list with one and
    be served the other)."""
    if "model" in body and where.action is not CloudAction.COUNT_TOKENS:
        raise BadRequest(
            f"a {where.cloud} request names its model in the URL; remove `model` from the body",
            reason="invalid_request",
        )
    messages = dict(body)
    if where.model:
        messages["model"] = where.model
    streams = where.streams_by_path
    if streams is not None:
        if "stream" in body:
            raise BadRequest(
                "a Bedrock request streams by path (invoke-with-response-stream); remove "
                "`stream` from the body",
                reason="invalid_request",
            )
        if streams:
            messages["stream"] = True
    return messages


def beta_header(body: dict[str, Any]) -> str | None:
    """The body's `anthropic_beta` list as an `anthropic-beta` header value (for an
    Anthropic API upstream); None when absent. `BadRequest` for a malformed list."""
    betas = body.get("anthropic_beta")
    if betas is None:
        return None
    if not isinstance(betas, list) or not all(isinstance(b, str) for b in betas):
        raise BadRequest("`anthropic_beta` must be a list of strings", reason="invalid_request")
    if any(not re.fullmatch(r"[A-Za-z0-9._\-]+", b) for b in betas):
        raise BadRequest("an `anthropic_beta` entry is malformed", reason="invalid_request")
    return ",".join(betas)


def anthropic_request(
    body: dict[str, Any], where: CloudPath
) -> tuple[dict[str, Any], str, str | None]:
    """A cloud client's request for the Anthropic API (cross-serving): the Messages body
    (model from the URL, `stream` from the path on Bedrock; the cloud-only fields
    `anthropic_version`/`anthropic_beta` out, which the API refuses as extra inputs),
    its path, and the `anthropic-beta` header the body's list becomes (None: none)."""
    messages = to_messages_body(body, where)
    beta = beta_header(messages)
    messages.pop("anthropic_version", None)
    messages.pop("anthropic_beta", None)
    count = where.action is CloudAction.COUNT_TOKENS
    if count:
        messages.pop("stream", None)
    return messages, "/v1/messages/count_tokens" if count else "/v1/messages", beta


def without_invocation_metrics(data: dict[str, Any]) -> bool:
    """Drop Bedrock's `amazon-bedrock-invocationMetrics` from a `message_stop` event
    served to a non-Bedrock client; True if it was there."""
    return data.pop("amazon-bedrock-invocationMetrics", None) is not None


# -- answers -------------------------------------------------------------------------

# Bedrock's error names per status (the `x-amzn-ErrorType` header and the event-stream
# `:exception-type`), from the InvokeModel API reference.
_BEDROCK_ERRORS: Final = {
    400: "ValidationException",
    401: "AccessDeniedException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    413: "ValidationException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    501: "ValidationException",
    503: "ServiceUnavailableException",
}


def bedrock_exception_type(status: int) -> str:
    return _BEDROCK_ERRORS.get(status, "InternalServerException")


def bedrock_error_body(status: int, message: str, anthropic_type: str) -> bytes:
    """An error body every kind of Bedrock client reads: boto3 takes `message` and
    `__type` (its error code), the anthropic SDKs and Claude Code `error.message`."""
    return orjson.dumps(
        {
            "message": message,
            "__type": bedrock_exception_type(status),
            "type": "error",
            "error": {"type": anthropic_type, "message": message},
        }
    )


def inference_profiles_body(model_ids: list[str]) -> bytes:
    """A ListInferenceProfiles answer naming the Bedrock ids the gateway serves."""
    summaries = [
        {
            "inferenceProfileId": model,
            "inferenceProfileName": model,
            "inferenceProfileArn": f"arn:aws:bedrock:gateway::inference-profile/{model}",
            "models": [],
            "status": "ACTIVE",
            "type": "SYSTEM_DEFINED",
        }
        for model in model_ids
    ]
    return orjson.dumps({"inferenceProfileSummaries": summaries})
