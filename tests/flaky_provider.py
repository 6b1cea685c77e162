"""A first provider for fallback tests, run as its own process so a test can kill it.

Anthropic-shaped: `POST /v1/messages` answers a short JSON message, or, when the request
carries `x-flaky-status: N`, an Anthropic error of status N (429 `rate_limit_error`, 500
`api_error`, 529 `overloaded_error`): the statuses after which the gateway falls back;
`x-flaky-stall-ms: N` first sends nothing for N ms; `x-flaky-break: 1` starts a 200 SSE
stream, sends `message_start`, then drops the connection (a provider failing mid-stream).
The next provider of the chain (a `FakeProvider`) ignores that header, so one request
can make the first provider fail and the second answer.

    python -m tests.flaky_provider --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from aiohttp import web

ERROR_TYPES = {429: "rate_limit_error", 500: "api_error", 503: "api_error"}


async def broken_stream(request: web.Request, model: object) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    start = {"type": "message_start", "message": {"id": "msg_flaky", "model": model}}
    await response.write(b"event: message_start\ndata: " + json.dumps(start).encode() + b"\n\n")
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()  # no final chunk: the stream breaks mid-way
    return response


async def messages(request: web.Request) -> web.StreamResponse:
    body: dict[str, Any] = await request.json()
    if request.headers.get("x-flaky-break"):
        return await broken_stream(request, body.get("model"))
    stall = request.headers.get("x-flaky-stall-ms", "")
    if stall.isdigit():  # no response headers for that long: a hung provider
        await asyncio.sleep(int(stall) / 1000)
    status = request.headers.get("x-flaky-status", "")
    if status.isdigit():
        code = int(status)
        kind = ERROR_TYPES.get(code, "overloaded_error")
        error = {"type": "error", "error": {"type": kind, "message": f"flaky {code}"}}
        return web.json_response(error, status=code)
    message = {
        "id": "msg_flaky",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": [{"type": "text", "text": "from the first provider"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }
    return web.json_response(message)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    web.run_app(app, host="127.0.0.1", port=args.port, print=lambda *_: None)


if __name__ == "__main__":
    main()
