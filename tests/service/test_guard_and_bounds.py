"""A request stream's guard and limits, fed phase by phase (no sockets): cached answers are
screened on replay, and only screened answers are stored."""

from __future__ import annotations

from typing import Any

import orjson

from extproc.apis import anthropic
from extproc.apis.sse import SseParser
from extproc.config import parse_config
from extproc.decisions import Continue, Decision, Respond
from extproc.gateway import Gateway
from extproc.store.memory import MemoryStore
from extproc.stream import RequestStream
from extproc.telemetry.metrics import Metrics

GH = "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"


class ListSink:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        return None


def gateway(store: MemoryStore, *, guard: bool, **extra: Any) -> Gateway:
    config: dict[str, Any] = {
        "providers": {
            "main": {
                "api": "anthropic",
                "base_url": "https://llm.internal",
                "credential": {"value": "sk"},
            }
        },
        "profiles": {"default": {"cache": {"enabled": True}}},
        **extra,
    }
    if guard:
        config["guard"] = {"profiles": {"default": {}}}
    return Gateway.from_config(
        parse_config(config), metrics=Metrics(), audit=ListSink(), store=store
    )


HEADERS = {
    ":method": "POST",
    ":path": "/v1/messages",
    "content-type": "application/json",
    "x-api-key": "k",
}
ANSWER = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-opus-4-8",
    "content": [
        {"type": "thinking", "thinking": f"key {GH}", "signature": "s"},
        {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": f"echo {GH}"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 5},
}


def ask(stream: bool = False) -> bytes:
    body = {
        "model": "claude-opus-4-8",
        "max_tokens": 50,
        "stream": stream,
        "messages": [{"role": "user", "content": "deploy"}],
    }
    return orjson.dumps(body)


async def call(
    gw: Gateway, body: bytes, answer: bytes | None = None, sse: bool = False
) -> tuple[Decision, bytes]:
    """One request; (the request-body decision, what the client got back)."""
    s = RequestStream(gw)
    await s.request_headers(dict(HEADERS), False)
    decision = await s.request_body(body, True)
    got = b""
    if not isinstance(decision, Respond) and answer is not None:
        content_type = "text/event-stream" if sse else "application/json"
        await s.response_headers({":status": "200", "content-type": content_type}, False)
        reply = await s.response_body(answer, True)
        changed = reply.body if isinstance(reply, Continue) else None
        got = changed if changed is not None else answer
    await s.close()
    return decision, got


async def test_an_answer_cached_before_the_guard_is_screened_on_replay() -> None:
    store = MemoryStore()
    plain, guarded = gateway(store, guard=False), gateway(store, guard=True)
    await call(plain, ask(), orjson.dumps(ANSWER))  # stored unscreened, as before the guard
    for streamed in (False, True):
        hit, _ = await call(guarded, ask(streamed))
        assert isinstance(hit, Respond)
        assert dict(hit.headers)["x-gateway-cache"] == "hit"
        assert GH not in hit.body.decode()
        assert "[REDACTED:github_token:" in hit.body.decode()


async def test_only_the_screened_stream_is_stored() -> None:
    store = MemoryStore()
    guarded, plain = gateway(store, guard=True), gateway(store, guard=False)
    _, sent = await call(guarded, ask(True), anthropic.unfold_message(ANSWER), sse=True)
    parser, acc = SseParser(), anthropic.StreamAccumulator()
    for event in parser.feed(sent) + parser.close():
        acc.feed(event)
    assert GH not in orjson.dumps(acc.folded_message()).decode()
    hit, _ = await call(plain, ask(True))  # even a route without a guard replays it screened
    assert isinstance(hit, Respond)
    assert dict(hit.headers)["x-gateway-cache"] == "hit"
    assert GH not in hit.body.decode()
