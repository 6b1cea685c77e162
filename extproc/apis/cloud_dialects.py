"""The Bedrock-invoke and Vertex-rawPredict client dialects: Anthropic Messages with the
model in the URL (paths and bodies: `extproc.apis.clouds`).

A cloud client's body is made canonical when it is parsed (`clouds.to_messages_body`:
the URL's model and, on Bedrock, the path's `stream` go into the body), so every policy
reads it exactly as it reads a `/v1/messages` body: the guard's walker, the cache key,
the token estimate, the output cap, model mapping (`with_model` sets the body's model;
the translator renders it back into the URL). The cloud-only fields `anthropic_version`
and `anthropic_beta` stay in the body until the translator decides where they go.

What differs from Anthropic Messages:

- Bedrock streams in AWS event-stream framing (`eventstream.EVENT_STREAM`), and its
  error bodies carry `message`/`__type` for boto3 besides Anthropic's `error` object;
  a stream that must end early ends with an exception message.
- Cache keys are Anthropic's (`cache_schema`), without `anthropic_version` and with the
  body's betas counted as `anthropic-beta` header values, so an answer cached for one
  format answers the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extproc.apis import anthropic
from extproc.apis.clouds import BEDROCK_VERSION, VERTEX_VERSION, bedrock_error_body
from extproc.apis.dialect import AnthropicMessages, ModelIn, register_dialect
from extproc.apis.eventstream import EVENT_STREAM
from extproc.apis.kind import ApiKind
from extproc.apis.sse import SseParser

__all__ = ["BEDROCK", "VERTEX", "BedrockInvoke", "VertexRawPredict"]

_CLOUD_FIELDS = ("anthropic_version", "anthropic_beta")
# The Messages API version each cloud's `anthropic_version` pins.
_PINNED = {BEDROCK_VERSION: "2023-06-01", VERTEX_VERSION: "2023-06-01"}


class _CloudMessages(AnthropicMessages):
    """Anthropic Messages (the walker and rewriter tables map these names to Anthropic's)."""

    model_in = ModelIn.URL
    pages_model_list = False

    def cache_schema(self) -> ApiKind:
        return "anthropic"

    def cache_headers(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> dict[str, str]:
        """As a `/v1/messages` request's: the body's version names the Messages API
        version it pins, and its betas join the header's."""
        flags = {f.strip() for f in headers.get("anthropic-beta", "").split(",")}
        in_body = body.get("anthropic_beta")
        if isinstance(in_body, list):
            flags.update(f for f in in_body if isinstance(f, str))
        version = body.get("anthropic_version")
        if not isinstance(version, str):
            version = headers.get("anthropic-version", "")
        version = _PINNED.get(version, version)
        return {"version": version, "beta": ",".join(sorted(f for f in flags if f))}

    def cache_view(self, body: Mapping[str, Any]) -> dict[str, Any]:
        view = anthropic.cache_view(body)
        for name in _CLOUD_FIELDS:  # betas count through cache_key's header part
            view.pop(name, None)
        return view


class BedrockInvoke(_CloudMessages):
    name = "bedrock"
    framing = EVENT_STREAM
    generate_path = "/model/{id}/invoke-with-response-stream"

    def unfold(self, answer: Mapping[str, Any]) -> bytes:
        """A cached answer as the event stream InvokeModelWithResponseStream sends."""
        parser = SseParser()
        events = parser.feed(anthropic.unfold_message(answer)) + parser.close()
        return b"".join(self.framing.encode(event) for event in events)

    def error_body(self, status: int, message: str, reason: str) -> bytes:
        return bedrock_error_body(status, message, anthropic.error_type_for_status(status))


class VertexRawPredict(_CloudMessages):
    name = "vertex"
    generate_path = "/projects/{p}/locations/{r}/publishers/anthropic/models/{id}:streamRawPredict"


BEDROCK = BedrockInvoke()
VERTEX = VertexRawPredict()
register_dialect(BEDROCK)
register_dialect(VERTEX)
