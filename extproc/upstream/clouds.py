"""Upstream adapters for Claude on Amazon Bedrock and Google Vertex AI.

A provider with `api: bedrock` or `api: vertex` (and its `cloud:` settings) is served
through these. They take the request after every policy (and after translation from the
client's schema) and reshape it for the cloud (`extproc.cloud.upstreams`, pure):

- Bedrock: `/model/{id}/invoke[-with-response-stream]` with the id mapped through
  `cloud.models` and the cross-region inference profile prefix; the body without
  `model`/`stream`, with `anthropic_version` and the caller's `anthropic-beta` header as
  the body's `anthropic_beta` list (Bedrock reads betas only there); count_tokens is
  answered 501 `not_supported` (Claude Code then estimates locally).
- Vertex: `/v1/projects/{p}/locations/{r}/publishers/anthropic/models/{id}@{v}:streamRawPredict`
  (`:rawPredict`), the body without `model`, with `anthropic_version`.

Their credential is the cloud's (`extproc.cloud.providers`): a SigV4 signature over the
final path and body, or a Google OAuth token. Answers are Anthropic messages and events
(Bedrock streams them in AWS event-stream framing), read through the Anthropic dialect.

Foundry and Claude Platform on AWS speak the Anthropic API itself: they are `api:
anthropic` providers whose `cloud:` settings only change the credential (and add
`anthropic-workspace-id`), see `AnthropicUpstream.credential_for`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson

from extproc.apis.anthropic import error_type_for_status
from extproc.apis.dialect import ANTHROPIC
from extproc.apis.eventstream import EVENT_STREAM
from extproc.apis.framing import Framing
from extproc.apis.sse import SseEvent
from extproc.cloud import upstreams as shapes
from extproc.cloud.config import BedrockSettings, VertexSettings
from extproc.cloud.providers import credential_for as cloud_credential
from extproc.config import ProviderConfig
from extproc.decisions import HeaderChanges
from extproc.errors import BadRequest, NotSupported
from extproc.upstream.adapter import UpstreamAdapter, register_adapter
from extproc.upstream.credentials import CredentialProvider
from extproc.upstream.translate import EventTranslator, register_translator

__all__ = ["BedrockUpstream", "CloudToAnthropic", "VertexUpstream"]


def _request_of(path: str, body: Mapping[str, Any]) -> tuple[str, str]:
    """(endpoint, model) of an Anthropic Messages request after policies."""
    bare = path.split("?", 1)[0]
    endpoint = "count_tokens" if bare.endswith("/count_tokens") else "messages"
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: a model name is required", reason="invalid_request")
    return endpoint, model


class _CloudUpstream(UpstreamAdapter):
    dialect = ANTHROPIC
    key_header = "authorization"
    # Headers the cloud reads from the body instead (or does not accept).
    drop: ClassVar[tuple[str, ...]] = ("anthropic-version",)

    def credential_for(
        self, provider: ProviderConfig, environ: Mapping[str, str] | None = None
    ) -> CredentialProvider | None:
        assert provider.cloud is not None  # config validation: api bedrock/vertex need it
        return cloud_credential(provider.cloud, provider.credential, environ)

    def headers(
        self, route: list[tuple[str, str]], auth: Sequence[tuple[str, str]] | None
    ) -> HeaderChanges:
        changes = super().headers(route, auth)
        return HeaderChanges(set=changes.set, remove=(*changes.remove, *self.drop))


class BedrockUpstream(_CloudUpstream):
    kind = "bedrock"
    drop = ("anthropic-version", "anthropic-beta")

    def answer_framing(self, content_type: str) -> Framing | None:
        """Bedrock streams in AWS event-stream framing (each chunk one Anthropic event)."""
        if content_type.split(";", 1)[0].strip() == EVENT_STREAM.content_type:
            return EVENT_STREAM
        return super().answer_framing(content_type)

    def prepare(
        self,
        provider: ProviderConfig,
        body: dict[str, Any],
        path: str,
        headers: Mapping[str, str],
    ) -> tuple[dict[str, Any], str]:
        settings = provider.cloud
        assert isinstance(settings, BedrockSettings)
        endpoint, model = _request_of(path, body)
        betas = shapes.beta_list(headers.get("anthropic-beta"))
        try:
            model_id = shapes.bedrock_model_id(model, settings.models, settings.inference_profile)
            request = shapes.bedrock_request(
                endpoint, body, model_id, betas, settings.allowed_betas
            )
        except shapes.NotSupported as exc:
            raise NotSupported(str(exc), reason="not_supported", retryable=False) from exc
        except shapes.CloudRequestError as exc:
            raise BadRequest(str(exc), reason="unknown_model", retryable=False) from exc
        assert request.body is not None
        return request.body, request.path


class VertexUpstream(_CloudUpstream):
    kind = "vertex"

    def prepare(
        self,
        provider: ProviderConfig,
        body: dict[str, Any],
        path: str,
        headers: Mapping[str, str],
    ) -> tuple[dict[str, Any], str]:
        settings = provider.cloud
        assert isinstance(settings, VertexSettings)
        endpoint, model = _request_of(path, body)
        try:
            model_id = shapes.vertex_model_id(model, settings.models)
            request = shapes.vertex_request(
                endpoint, body, model_id, settings.project, settings.region
            )
        except shapes.CloudRequestError as exc:
            raise BadRequest(str(exc), reason="unknown_model", retryable=False) from exc
        assert request.body is not None
        return request.body, request.path


register_adapter(BedrockUpstream())
register_adapter(VertexUpstream())


# --------------------------------------------------------------------------- answers


class _Events:
    """Bedrock's last event carries `amazon-bedrock-invocationMetrics`; Anthropic's does not."""

    def feed(self, event: SseEvent) -> list[SseEvent]:
        if event.event == "message_stop" and _METRICS in event.data:
            data = orjson.loads(event.data)
            data.pop(_METRICS, None)
            event = SseEvent(event=event.event, data=orjson.dumps(data).decode(), id=event.id)
        return [event]

    def close(self) -> list[SseEvent]:
        return []


class CloudToAnthropic:
    """An Anthropic client served by Bedrock or Vertex: the request was reshaped by the
    adapter (`prepare`); answers are Anthropic messages, errors are the cloud's shape."""

    def request(self, body: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
        return body, path

    def answer(self, body: Mapping[str, Any], status: int) -> dict[str, Any]:
        if status < 400 or body.get("type") == "error":
            return dict(body)
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else body.get("message")
        kind = error_type_for_status(status)
        return {"type": "error", "error": {"type": kind, "message": str(message or "")}}

    def stream(self) -> EventTranslator:
        return _Events()


_METRICS = "amazon-bedrock-invocationMetrics"
register_translator("anthropic", "bedrock", CloudToAnthropic())
register_translator("anthropic", "vertex", CloudToAnthropic())
