"""Bedrock and Vertex clients served by any provider (issue 14 item 5, client side).

A cloud client's body is canonical Anthropic Messages inside the gateway (model and,
on Bedrock, `stream` taken from the URL; see `extproc.apis.cloud_dialects`). These
translators send it on:

- to the Anthropic API (`api: anthropic`): `/v1/messages` (or `/count_tokens`), without
  the cloud-only `anthropic_version` and `anthropic_beta` fields (the API refuses extra
  inputs); the body's betas join the `anthropic-beta` header;
- to a Bedrock or Vertex provider: the canonical request on `/v1/messages`, which that
  provider's adapter reshapes for its cloud (`UpstreamAdapter.prepare`: the model into
  the URL). The client's `anthropic_version` is kept when it is that cloud's own
  (`bedrock-2023-05-31` to Bedrock), else the adapter sets the cloud's. Bedrock reads
  betas from the body, so `anthropic_beta` stays for it; Vertex reads the header.

Answers: JSON messages are the same shape everywhere; errors are rewritten into the
client's error shape; a stream's events pass on (the framings do the bytes), minus
Bedrock's `amazon-bedrock-invocationMetrics` for a client that is not Bedrock's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from extproc.apis.anthropic import error_type_for_status
from extproc.apis.clouds import bedrock_exception_type, beta_header, without_invocation_metrics
from extproc.apis.kind import ApiKind
from extproc.apis.sse import SseEvent
from extproc.upstream.translate import EventTranslator, register_translator

__all__ = ["CloudClient"]

_COUNT_TOKENS = re.compile(r"/count-tokens(?::rawPredict)?(?:$|[/?])")
_METRICS = "amazon-bedrock-invocationMetrics"


class CloudClient:
    """Translator for a `client` (bedrock | vertex) served by an `upstream` provider."""

    def __init__(self, client: ApiKind, upstream: ApiKind) -> None:
        self.client, self.upstream = client, upstream

    # -- request -------------------------------------------------------------------

    def request(self, body: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
        out = dict(body)
        version = out.get("anthropic_version")
        if not (isinstance(version, str) and version.startswith(f"{self.upstream}-")):
            # The serving cloud's adapter sets its own: a Bedrock version means nothing
            # to Vertex or the API, and an SDK's date-only one nothing to Bedrock.
            out.pop("anthropic_version", None)
        if self.upstream != "bedrock":
            out.pop("anthropic_beta", None)  # sent as the header (request_headers)
        if _COUNT_TOKENS.search(path.split("?", 1)[0]):
            out.pop("stream", None)
            return out, "/v1/messages/count_tokens"
        return out, "/v1/messages"

    def request_headers(
        self, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> tuple[tuple[str, str], ...]:
        if self.upstream == "bedrock":
            return ()
        in_body = beta_header(dict(body))
        if in_body is None:
            return ()
        flags = [f.strip() for f in headers.get("anthropic-beta", "").split(",") if f.strip()]
        merged = dict.fromkeys([*flags, *in_body.split(",")])
        return (("anthropic-beta", ",".join(merged)),)

    # -- answers -------------------------------------------------------------------

    def answer(self, body: Mapping[str, Any], status: int) -> dict[str, Any]:
        if status < 400:
            return dict(body)
        message = _error_message(body)
        kind = _error_type(body) or error_type_for_status(status)
        error = {"type": "error", "error": {"type": kind, "message": message}}
        if self.client == "bedrock":
            return {"message": message, "__type": bedrock_exception_type(status), **error}
        return error

    def stream(self) -> EventTranslator:
        return _PassEvents() if self.client == "bedrock" else _WithoutMetrics()


def _error_message(body: Mapping[str, Any]) -> str:
    error = body.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    for key in ("message", "Message"):
        if isinstance(body.get(key), str):
            return str(body[key])
    return "the provider refused the request"


def _error_type(body: Mapping[str, Any]) -> str | None:
    error = body.get("error")
    kind = error.get("type") if isinstance(error, dict) else None
    return kind if isinstance(kind, str) else None


class _PassEvents:
    def feed(self, event: SseEvent) -> list[SseEvent]:
        return [event]

    def close(self) -> list[SseEvent]:
        return []


class _WithoutMetrics:
    """Bedrock's last event carries invocation metrics no other client expects."""

    def feed(self, event: SseEvent) -> list[SseEvent]:
        if event.event == "message_stop" and _METRICS in event.data:
            data = orjson.loads(event.data)
            if isinstance(data, dict) and without_invocation_metrics(data):
                event = SseEvent(event.event, orjson.dumps(data).decode(), event.id)
        return [event]

    def close(self) -> list[SseEvent]:
        return []


_CLIENTS: tuple[ApiKind, ...] = ("bedrock", "vertex")
_UPSTREAMS: tuple[ApiKind, ...] = ("anthropic", "bedrock", "vertex")
for _client in _CLIENTS:
    for _upstream in _UPSTREAMS:
        register_translator(_client, _upstream, CloudClient(_client, _upstream))
