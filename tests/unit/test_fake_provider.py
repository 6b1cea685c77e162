"""The fake provider is realistic enough that the official SDKs accept it, and its controls work.

Every test talks to a real listening fake, mostly through the ``anthropic`` and ``openai``
SDKs (what users run), and through raw ``httpx`` where the wire bytes are the point.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from tests.fake_provider import (
    DEFAULT_MODELS,
    DEFAULT_TEXT,
    FakeProvider,
    SseEvent,
    SseWriter,
    cache_creation_tokens,
    display_name,
    encode_event,
    input_tokens,
    run_in_thread,
    text_pieces,
)

USER: list[Any] = [{"role": "user", "content": "Say hello."}]
ANTHROPIC_HEADERS = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
OPENAI_HEADERS = {"authorization": "Bearer sk-test"}
MESSAGE_BODY: dict[str, Any] = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": USER}
CHAT_BODY: dict[str, Any] = {"model": "gpt-5", "messages": USER}
FAKE_PROVIDER_SCRIPT = Path(__file__).resolve().parents[1] / "fake_provider.py"


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    provider = FakeProvider()
    await provider.start()
    yield provider
    await provider.stop()


@pytest.fixture
async def claude(fake: FakeProvider) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=fake.url, api_key="sk-ant-test", max_retries=0)
    async with client:
        yield client


@pytest.fixture
async def gpt(fake: FakeProvider) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{fake.url}/v1", api_key="sk-test", max_retries=0)
    async with client:
        yield client


@pytest.fixture
async def raw(fake: FakeProvider) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url) as client:
        yield client


def last_body(fake: FakeProvider) -> bytes:
    return fake.received[-1].body


def sse_event_names(payload: bytes) -> list[str]:
    lines = payload.decode().splitlines()
    return [line.partition(":")[2].strip() for line in lines if line.startswith("event:")]


# --------------------------------------------------------------------------- Anthropic


async def test_anthropic_json_message(fake: FakeProvider, claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(model="claude-opus-4-8", max_tokens=64, messages=USER)

    assert message.id.startswith("msg_01")
    assert message.model == "claude-opus-4-8"
    assert message.content[0].type == "text"
    assert message.content[0].text == DEFAULT_TEXT
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == input_tokens(last_body(fake))
    assert message.usage.output_tokens == 5
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.cache_read_input_tokens == 0
    assert (message._request_id or "").startswith("req_")


async def test_anthropic_stream_event_sequence(claude: anthropic.AsyncAnthropic) -> None:
    stream = await claude.messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=USER, stream=True
    )
    events = [event async for event in stream]

    types = [event.type for event in events]
    deltas = ["content_block_delta"] * 5
    assert types == [
        "message_start",
        "content_block_start",
        *deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0]
    assert start.type == "message_start"
    assert start.message.usage.output_tokens == 1
    assert start.message.model == "claude-haiku-4-5"


async def test_anthropic_stream_helper_accumulates(
    fake: FakeProvider, claude: anthropic.AsyncAnthropic
) -> None:
    async with claude.messages.stream(
        model="claude-sonnet-4-6", max_tokens=64, messages=USER
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()

    assert text == DEFAULT_TEXT
    assert final.content[0].type == "text"
    assert final.content[0].text == DEFAULT_TEXT
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == input_tokens(last_body(fake))
    assert final.usage.output_tokens == 5


async def test_anthropic_stream_wire_has_ping_and_sse_headers(raw: httpx.AsyncClient) -> None:
    body = {**MESSAGE_BODY, "stream": True}
    response = await raw.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)

    assert response.headers["content-type"].startswith("text/event-stream")
    names = sse_event_names(response.content)
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_cache_control_reports_cache_creation(
    fake: FakeProvider, claude: anthropic.AsyncAnthropic
) -> None:
    system: Any = [{"type": "text", "text": "x" * 400, "cache_control": {"type": "ephemeral"}}]
    message = await claude.messages.create(
        model="claude-opus-4-8", max_tokens=64, system=system, messages=USER
    )

    expected = cache_creation_tokens(last_body(fake))
    assert expected > 0
    assert message.usage.cache_creation_input_tokens == expected
    assert message.usage.cache_read_input_tokens == 0


async def test_count_tokens(fake: FakeProvider, claude: anthropic.AsyncAnthropic) -> None:
    result = await claude.messages.count_tokens(model="claude-opus-4-8", messages=USER)

    assert fake.received[-1].path == "/v1/messages/count_tokens"
    assert result.input_tokens == input_tokens(last_body(fake))


async def test_anthropic_models_list_paginates(
    fake: FakeProvider, claude: anthropic.AsyncAnthropic
) -> None:
    models = [model async for model in claude.models.list(limit=2)]

    assert [model.id for model in models] == list(DEFAULT_MODELS)
    assert models[0].display_name == "Claude Opus 4.8"
    assert models[0].type == "model"
    assert len([r for r in fake.received if r.path == "/v1/models"]) == 3


async def test_anthropic_model_retrieve(claude: anthropic.AsyncAnthropic) -> None:
    model = await claude.models.retrieve("claude-haiku-4-5")
    assert model.display_name == "Claude Haiku 4.5"

    with pytest.raises(anthropic.NotFoundError):
        await claude.models.retrieve("claude-unknown")


async def test_anthropic_accepts_bearer_auth(fake: FakeProvider) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=fake.url, auth_token="oauth-token", max_retries=0
    ) as client:
        message = await client.messages.create(model="m", max_tokens=8, messages=USER)

    assert message.content[0].type == "text"
    assert fake.received[-1].headers["authorization"] == "Bearer oauth-token"
    assert "x-api-key" not in fake.received[-1].headers


# --------------------------------------------------------------------------- OpenAI


async def test_openai_models_list(gpt: openai.AsyncOpenAI) -> None:
    page = await gpt.models.list()

    assert [model.id for model in page.data] == list(DEFAULT_MODELS)
    assert {model.owned_by for model in page.data} == {"anthropic", "openai"}
    assert all(model.object == "model" for model in page.data)


async def test_models_list_is_configurable() -> None:
    provider = FakeProvider(models=["local-a", "local-b"])
    await provider.start()
    try:
        async with httpx.AsyncClient(base_url=provider.url) as client:
            response = await client.get("/v1/models", headers=OPENAI_HEADERS)
    finally:
        await provider.stop()
    assert [model["id"] for model in response.json()["data"]] == ["local-a", "local-b"]


async def test_openai_chat_json(fake: FakeProvider, gpt: openai.AsyncOpenAI) -> None:
    completion = await gpt.chat.completions.create(model="gpt-5-mini", messages=USER)

    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-5-mini"
    assert completion.choices[0].message.content == DEFAULT_TEXT
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == input_tokens(last_body(fake))
    assert usage.completion_tokens == 5
    assert usage.total_tokens == usage.prompt_tokens + 5


async def test_openai_stream_with_usage(fake: FakeProvider, gpt: openai.AsyncOpenAI) -> None:
    stream = await gpt.chat.completions.create(
        model="gpt-5", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == DEFAULT_TEXT
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    *body, last = chunks
    assert all(chunk.usage is None for chunk in body)
    assert body[-1].choices[0].finish_reason == "stop"
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == input_tokens(last_body(fake))
    assert last.usage.completion_tokens == 5


async def test_openai_stream_without_usage(raw: httpx.AsyncClient) -> None:
    body = {**CHAT_BODY, "stream": True}
    response = await raw.post("/v1/chat/completions", json=body, headers=OPENAI_HEADERS)

    lines = [line for line in response.text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# --------------------------------------------------------------------------- x-fake-* controls


async def test_fake_text_json_and_stream(
    claude: anthropic.AsyncAnthropic, gpt: openai.AsyncOpenAI
) -> None:
    headers = {"x-fake-text": "one two   three"}
    async with claude.messages.stream(
        model="m", max_tokens=8, messages=USER, extra_headers=headers
    ) as stream:
        final = await stream.get_final_message()
    completion = await gpt.chat.completions.create(
        model="gpt-5", messages=USER, extra_headers=headers
    )

    assert final.content[0].type == "text"
    assert final.content[0].text == "one two   three"
    assert final.usage.output_tokens == 3
    assert completion.choices[0].message.content == "one two   three"


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
async def test_fake_status_anthropic(
    claude: anthropic.AsyncAnthropic,
    status: int,
    error_class: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    with pytest.raises(error_class) as caught:
        await claude.messages.create(
            model="m",
            max_tokens=8,
            messages=USER,
            stream=True,
            extra_headers={"x-fake-status": str(status)},
        )

    error = caught.value
    assert error.status_code == status
    assert isinstance(error.body, dict)
    assert error.body["type"] == "error"
    assert error.body["error"]["type"] == error_type
    assert error.body["request_id"] == error.response.headers["request-id"]
    assert ("retry-after" in error.response.headers) == (status == 429)


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (429, openai.RateLimitError, "requests"),
        (500, openai.InternalServerError, "server_error"),
        (503, openai.InternalServerError, "server_error"),
    ],
)
async def test_fake_status_openai(
    gpt: openai.AsyncOpenAI,
    status: int,
    error_class: type[openai.APIStatusError],
    error_type: str,
) -> None:
    with pytest.raises(error_class) as caught:
        await gpt.chat.completions.create(
            model="gpt-5", messages=USER, extra_headers={"x-fake-status": str(status)}
        )

    assert caught.value.status_code == status
    assert caught.value.type == error_type
    assert set(caught.value.response.json()["error"]) == {"message", "type", "param", "code"}


async def test_fake_delay_json_and_error(raw: httpx.AsyncClient) -> None:
    headers = {**ANTHROPIC_HEADERS, "x-fake-delay-ms": "150"}
    started = time.monotonic()
    ok = await raw.post("/v1/messages", json=MESSAGE_BODY, headers=headers)
    middle = time.monotonic()
    failed = await raw.post("/v1/messages", json={}, headers=headers)
    ended = time.monotonic()

    assert (ok.status_code, failed.status_code) == (200, 400)
    assert middle - started >= 0.15
    assert ended - middle >= 0.15


async def test_fake_delay_stream_flushes_first_event(gpt: openai.AsyncOpenAI) -> None:
    stream = await gpt.chat.completions.create(
        model="gpt-5",
        messages=USER,
        stream=True,
        extra_headers={"x-fake-delay-ms": "200", "x-fake-text": "hi"},
    )
    started = time.monotonic()
    arrivals = [time.monotonic() - started async for _ in stream]

    # role chunk, "hi", stop chunk, [DONE]: three 200 ms gaps after the first event
    assert len(arrivals) == 3
    assert arrivals[0] < 0.15
    assert arrivals[-1] >= 0.35


async def test_split_chunking_on_the_wire(raw: httpx.AsyncClient) -> None:
    headers = {**ANTHROPIC_HEADERS, "x-fake-chunking": "split"}
    body = {**MESSAGE_BODY, "stream": True}
    async with raw.stream("POST", "/v1/messages", json=body, headers=headers) as response:
        chunks = [chunk async for chunk in response.aiter_raw()]

    wire = b"".join(chunks)
    assert b"event:content_block_start\ndata:{" in wire
    assert b"event: message_start\ndata: {" in wire
    assert any(not chunk.endswith(b"\n\n") for chunk in chunks)
    assert sse_event_names(wire)[-1] == "message_stop"


async def test_split_chunking_parsed_by_sdks(
    claude: anthropic.AsyncAnthropic, gpt: openai.AsyncOpenAI
) -> None:
    headers = {"x-fake-chunking": "split"}
    async with claude.messages.stream(
        model="m", max_tokens=8, messages=USER, extra_headers=headers
    ) as stream:
        final = await stream.get_final_message()
    chat = await gpt.chat.completions.create(
        model="gpt-5",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=headers,
    )
    chunks = [chunk async for chunk in chat]

    assert final.content[0].type == "text"
    assert final.content[0].text == DEFAULT_TEXT
    assert final.usage.output_tokens == 5
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == DEFAULT_TEXT
    assert chunks[-1].usage is not None


class _Collect:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.writes.append(data)


async def test_split_writer_cuts_every_event_off_its_boundary() -> None:
    sink = _Collect()
    writer = SseWriter(sink, split=True)
    events = [SseEvent('{"n":1}', "a"), SseEvent('{"n":2}', "b"), SseEvent("[DONE]")]
    for event in events:
        await writer.send(event)
    await writer.flush()

    expected = b"".join(encode_event(e, compact=i % 2 == 1) for i, e in enumerate(events))
    assert b"".join(sink.writes) == expected
    assert all(not piece.endswith(b"\n\n") for piece in sink.writes[:-1])
    assert sink.writes[0] == b"even"


async def read_until_reset(
    raw: httpx.AsyncClient, path: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[bytes, Exception | None]:
    """The raw body bytes received, and the error that ended the read (None if it ended)."""
    received = b""
    try:
        async with raw.stream("POST", path, json=body, headers=headers) as response:
            async for chunk in response.aiter_raw():
                received += chunk
    except httpx.HTTPError as error:
        return received, error
    return received, None


async def test_abort_after_on_the_wire(raw: httpx.AsyncClient) -> None:
    headers = {**ANTHROPIC_HEADERS, "x-fake-abort-after": "3"}
    body = {**MESSAGE_BODY, "stream": True}
    received, error = await read_until_reset(raw, "/v1/messages", body, headers)

    assert isinstance(error, httpx.RemoteProtocolError)
    assert sse_event_names(received) == ["message_start", "content_block_start", "ping"]


async def test_abort_after_with_split_still_completes_events(raw: httpx.AsyncClient) -> None:
    headers = {**OPENAI_HEADERS, "x-fake-abort-after": "2", "x-fake-chunking": "split"}
    body = {**CHAT_BODY, "stream": True}
    received, error = await read_until_reset(raw, "/v1/chat/completions", body, headers)

    assert isinstance(error, httpx.RemoteProtocolError)
    assert received.count(b"\n\n") == 2
    assert received.endswith(b"\n\n")


async def test_abort_after_surfaces_in_sdk(claude: anthropic.AsyncAnthropic) -> None:
    stream = await claude.messages.create(
        model="m",
        max_tokens=8,
        messages=USER,
        stream=True,
        extra_headers={"x-fake-abort-after": "4"},
    )
    seen: list[str] = []
    error: Exception | None = None
    try:
        async for event in stream:
            seen.append(event.type)
    except Exception as exc:  # the SDK lets the transport error through unwrapped
        error = exc

    assert error is not None
    assert "incomplete chunked read" in str(error)
    assert seen == ["message_start", "content_block_start", "content_block_delta"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-fake-status", "abc"),
        ("x-fake-status", "200"),
        ("x-fake-delay-ms", "-1"),
        ("x-fake-abort-after", "x"),
        ("x-fake-chunking", "sideways"),
    ],
)
async def test_malformed_control_is_a_400(raw: httpx.AsyncClient, name: str, value: str) -> None:
    headers = {**ANTHROPIC_HEADERS, name: value}
    response = await raw.post("/v1/messages", json=MESSAGE_BODY, headers=headers)

    assert response.status_code == 400
    assert name in response.json()["error"]["message"]


# --------------------------------------------------------------------------- error shapes


@pytest.mark.parametrize("missing", ["model", "messages", "max_tokens"])
async def test_anthropic_missing_field(raw: httpx.AsyncClient, missing: str) -> None:
    body = {k: v for k, v in MESSAGE_BODY.items() if k != missing}
    response = await raw.post("/v1/messages", json=body, headers=ANTHROPIC_HEADERS)

    assert response.status_code == 400
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"] == {
        "type": "invalid_request_error",
        "message": f"{missing}: Field required",
    }
    assert payload["request_id"] == response.headers["request-id"]


async def test_anthropic_empty_messages_via_sdk(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="at least one message"):
        await claude.messages.create(model="m", max_tokens=8, messages=[])


async def test_anthropic_missing_credentials(raw: httpx.AsyncClient) -> None:
    headers = {"anthropic-version": "2023-06-01"}
    response = await raw.post("/v1/messages", json=MESSAGE_BODY, headers=headers)

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": USER}, None, None),
        ({"model": "gpt-5"}, "messages", "missing_required_parameter"),
        ({"model": "gpt-5", "messages": []}, "messages", "empty_array"),
        ({**CHAT_BODY, "stream_options": {"include_usage": True}}, "stream_options", None),
    ],
)
async def test_openai_bad_request(
    raw: httpx.AsyncClient, body: dict[str, Any], param: str | None, code: str | None
) -> None:
    response = await raw.post("/v1/chat/completions", json=body, headers=OPENAI_HEADERS)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


async def test_openai_missing_credentials(raw: httpx.AsyncClient) -> None:
    response = await raw.post("/v1/chat/completions", json=CHAT_BODY)

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "x-request-id" in response.headers


async def test_invalid_json_is_a_400(raw: httpx.AsyncClient) -> None:
    headers = {**OPENAI_HEADERS, "content-type": "application/json"}
    response = await raw.post("/v1/chat/completions", content=b"{not json", headers=headers)

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "headers", "shape"),
    [
        ("/v1/complete", ANTHROPIC_HEADERS, "anthropic"),
        ("/v1/messages/batches", {}, "anthropic"),
        ("/v1/embeddings", OPENAI_HEADERS, "openai"),
    ],
)
async def test_unknown_path_is_a_404_in_shape(
    raw: httpx.AsyncClient, path: str, headers: dict[str, str], shape: str
) -> None:
    response = await raw.post(path, json={}, headers=headers)

    assert response.status_code == 404
    payload = response.json()
    if shape == "anthropic":
        assert payload["error"]["type"] == "not_found_error"
    else:
        assert set(payload["error"]) == {"message", "type", "param", "code"}


# --------------------------------------------------------------------------- recording


async def test_requests_are_recorded(fake: FakeProvider, raw: httpx.AsyncClient) -> None:
    headers = [("X-Multi", "a"), ("x-multi", "b"), ("Authorization", "Bearer k")]
    await raw.post("/v1/chat/completions?trace=1", json=CHAT_BODY, headers=headers)

    record = fake.received[-1]
    assert (record.method, record.path, record.query) == ("POST", "/v1/chat/completions", "trace=1")
    assert record.headers["x-multi"] == "a,b"
    assert record.headers["authorization"] == "Bearer k"
    assert record.json() == CHAT_BODY
    fake.clear()
    assert fake.received == []


# --------------------------------------------------------------------------- helpers and CLI


def test_run_in_thread_serves_sync_sdk_clients() -> None:
    with run_in_thread(models=["claude-opus-4-8"], text="sync hello") as fake:
        claude = anthropic.Anthropic(base_url=fake.url, api_key="k", max_retries=0)
        gpt = openai.OpenAI(base_url=f"{fake.url}/v1", api_key="k", max_retries=0)
        with claude, gpt:
            message = claude.messages.create(model="claude-opus-4-8", max_tokens=8, messages=USER)
            completion = gpt.chat.completions.create(model="gpt-5", messages=USER)
            models = [model.id for model in claude.models.list()]
        assert len(fake.received) == 3

    assert message.content[0].type == "text"
    assert message.content[0].text == "sync hello"
    assert completion.choices[0].message.content == "sync hello"
    assert models == ["claude-opus-4-8"]


async def test_cli_prints_url_and_stops_on_sigterm() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(FAKE_PROVIDER_SCRIPT), "--port", "0", stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        url = (await asyncio.wait_for(process.stdout.readline(), 20)).decode().strip()
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.get("/v1/models", headers=OPENAI_HEADERS)
        assert response.json()["object"] == "list"
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), 20)
    assert url.startswith("http://127.0.0.1:")
    assert returncode == 0


def test_port_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        _ = FakeProvider().port


@pytest.mark.parametrize("text", [DEFAULT_TEXT, "  lead and trail  ", "one", "", "   "])
def test_text_pieces_join_back(text: str) -> None:
    assert "".join(text_pieces(text)) == text


@pytest.mark.parametrize(
    ("model_id", "name"),
    [("claude-opus-4-8", "Claude Opus 4.8"), ("gpt-5-mini", "GPT 5 Mini"), ("x", "X")],
)
def test_display_name(model_id: str, name: str) -> None:
    assert display_name(model_id) == name


def test_input_tokens_are_deterministic_and_at_least_one() -> None:
    assert input_tokens(b"") == 1
    assert input_tokens(b"x" * 400) == 100


def test_compression_follows_accept_encoding_or_the_forced_coding() -> None:
    import gzip

    from tests.fake_provider import Compressor, choose_coding

    accepts = {"accept-encoding": "br;q=1.0, gzip", "x-fake-compress": "allowed"}
    assert choose_coding(accepts, "none") == "br"
    assert choose_coding({"accept-encoding": "identity"}, "allowed") is None
    assert (
        choose_coding({"accept-encoding": "identity", "x-fake-compress": "gzip"}, "none") == "gzip"
    )
    assert choose_coding({}, "none") is None
    compressor = Compressor("gzip")
    data = compressor.piece(b"event one\n\n") + compressor.piece(b"event two\n\n")
    assert gzip.decompress(data + compressor.finish()) == b"event one\n\nevent two\n\n"


# --------------------------------------------------------------------------- tool calls

TOOL_INPUT = {"command": "ls -la\n/tmp", "n": 2}


@pytest.mark.parametrize("stream", [False, True])
async def test_anthropic_tool_call_control(claude: anthropic.AsyncAnthropic, stream: bool) -> None:
    headers = {"x-fake-tool-input": orjson.dumps(TOOL_INPUT).decode(), "x-fake-piece-chars": "3"}
    message: Any
    if stream:
        async with claude.messages.stream(
            model="claude-opus-4-8", max_tokens=64, messages=USER, extra_headers=headers
        ) as events:
            message = await events.get_final_message()
    else:
        message = await claude.messages.create(
            model="claude-opus-4-8", max_tokens=64, messages=USER, extra_headers=headers
        )
    (block,) = message.content
    assert block.type == "tool_use"
    assert block.model_dump()["input"] == TOOL_INPUT
    assert message.stop_reason == "tool_use"


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_tool_call_control(gpt: openai.AsyncOpenAI, stream: bool) -> None:
    headers = {"x-fake-tool-input": orjson.dumps(TOOL_INPUT).decode(), "x-fake-piece-chars": "3"}
    if stream:
        chunks = await gpt.chat.completions.create(
            model="gpt-5", messages=USER, stream=True, extra_headers=headers
        )
        parts = [
            call.function.arguments or ""
            async for chunk in chunks
            for choice in chunk.choices
            for call in choice.delta.tool_calls or ()
            if call.function is not None
        ]
        arguments = "".join(parts)
    else:
        completion = await gpt.chat.completions.create(
            model="gpt-5", messages=USER, extra_headers=headers
        )
        calls: Any = completion.choices[0].message.tool_calls
        assert completion.choices[0].finish_reason == "tool_calls"
        arguments = calls[0].function.arguments
    assert orjson.loads(arguments) == TOOL_INPUT


@pytest.mark.parametrize("stream", [False, True])
async def test_openai_parallel_tool_calls_with_usage(gpt: openai.AsyncOpenAI, stream: bool) -> None:
    headers = {
        "x-fake-tool-input": orjson.dumps(TOOL_INPUT).decode(),
        "x-fake-tool-calls": "2",
        "x-fake-tool-name": "Read",
    }
    if stream:
        chunks = await gpt.chat.completions.create(
            model="gpt-5",
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
        arguments: dict[int, str] = {}
        names, usage = set(), None
        async for chunk in chunks:
            usage = chunk.usage or usage
            for call in (c for choice in chunk.choices for c in choice.delta.tool_calls or ()):
                assert call.function is not None
                names.add(call.function.name)
                arguments[call.index] = arguments.get(call.index, "") + (
                    call.function.arguments or ""
                )
        assert usage is not None
        assert sorted(arguments) == [0, 1]
        assert [orjson.loads(a) for a in arguments.values()] == [TOOL_INPUT, TOOL_INPUT]
        assert names - {None} == {"Read"}
    else:
        completion = await gpt.chat.completions.create(
            model="gpt-5", messages=USER, extra_headers=headers
        )
        calls: Any = completion.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == ["Read", "Read"]
        assert calls[0].id != calls[1].id


async def test_tool_once_answers_the_tool_result_with_text(
    claude: anthropic.AsyncAnthropic, gpt: openai.AsyncOpenAI
) -> None:
    headers = {
        "x-fake-tool-input": orjson.dumps(TOOL_INPUT).decode(),
        "x-fake-tool-once": "1",
        "x-fake-echo": "1",
    }
    first = await claude.messages.create(
        model="claude-opus-4-8", max_tokens=64, messages=USER, extra_headers=headers
    )
    block: Any = first.content[0]
    assert block.type == "tool_use"
    result = {"type": "tool_result", "tool_use_id": block.id, "content": "42 files"}
    turns: Any = [*USER, {"role": "assistant", "content": [block.model_dump()]}]
    turns.append({"role": "user", "content": [result]})
    second = await claude.messages.create(
        model="claude-opus-4-8", max_tokens=64, messages=turns, extra_headers=headers
    )
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text"
    assert second.content[0].text == "tool said: 42 files"
    chat: Any = [*USER, {"role": "tool", "tool_call_id": "call_1", "content": "7 files"}]
    answer = await gpt.chat.completions.create(model="gpt-5", messages=chat, extra_headers=headers)
    assert answer.choices[0].message.content == "tool said: 7 files"
    plain = {k: v for k, v in headers.items() if k != "x-fake-echo"}
    third = await claude.messages.create(
        model="claude-opus-4-8", max_tokens=64, messages=turns, extra_headers=plain
    )
    third_block: Any = third.content[0]
    assert third_block.text == DEFAULT_TEXT  # without echo: the usual reply text


async def test_tool_input_control_must_be_a_json_object(raw: httpx.AsyncClient) -> None:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01", "x-fake-tool-input": "[1]"}
    response = await raw.post("/v1/messages", json=MESSAGE_BODY, headers=headers)
    assert response.status_code == 400
