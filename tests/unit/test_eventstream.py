"""The AWS event-stream codec (extproc.apis.eventstream), with botocore as the oracle."""

from __future__ import annotations

import base64
import contextlib
import itertools
import struct
import uuid
import zlib
from typing import Any, cast

import orjson
import pytest
from anthropic.lib.bedrock._stream_decoder import AWSEventStreamDecoder
from botocore.eventstream import EventStreamBuffer
from botocore.loaders import Loader
from botocore.model import ServiceModel
from botocore.parsers import EventStreamJSONParser
from hypothesis import given
from hypothesis import strategies as st

from extproc.apis.eventstream import (
    BedrockEventParser,
    EventMessage,
    EventStreamDecoder,
    EventStreamError,
    HeaderValue,
    Int,
    Timestamp,
    chunk_payload,
    encode_bedrock_event,
    encode_chunk,
    encode_exception,
    encode_message,
)
from extproc.apis.sse import SseParser, encode_event
from extproc.errors import AnswerWithheld

EVERY_TYPE: dict[str, HeaderValue] = {
    "t": True,
    "f": False,
    "i8": Int(-7, 8),
    "i16": Int(-300, 16),
    "i32": Int(70000, 32),
    "i64": Int(-(2**40), 64),
    "bytes": b"\x00\xffraw",
    ":event-type": "chunk",
    "utf8": "café",
    "ts": Timestamp(1_764_633_600_000),
    "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
}


def botocore_messages(
    raw: bytes, cuts: list[int] | None = None
) -> list[tuple[dict[str, object], bytes]]:
    buffer = EventStreamBuffer()
    out: list[tuple[dict[str, object], bytes]] = []
    for piece in split_at(raw, cuts or []):
        buffer.add_data(piece)
        out.extend((cast(dict[str, object], m.headers), m.payload) for m in buffer)
    return out


def split_at(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(raw) + 1) for c in cuts}), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def decode(chunks: list[bytes]) -> list[EventMessage]:
    decoder = EventStreamDecoder()
    messages = [m for chunk in chunks for m in decoder.feed(chunk)]
    decoder.close()
    return messages


def test_botocore_decodes_every_header_type_we_encode() -> None:
    raw = encode_message(EVERY_TYPE, b'{"x":1}')
    [(headers, payload)] = botocore_messages(raw)
    assert payload == b'{"x":1}'
    assert headers == {
        "t": True,
        "f": False,
        "i8": -7,
        "i16": -300,
        "i32": 70000,
        "i64": -(2**40),
        "bytes": b"\x00\xffraw",
        ":event-type": "chunk",
        "utf8": "café",
        "ts": 1_764_633_600_000,
        # botocore hands a UUID back as its 16 raw bytes
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678").bytes,
    }


def test_round_trip_is_byte_exact() -> None:
    raw = encode_message(EVERY_TYPE, b"payload")
    [message] = decode([raw])
    assert dict(message.headers) == EVERY_TYPE
    assert list(message.headers) == list(EVERY_TYPE)  # wire order kept
    assert encode_message(message.headers, message.payload) == raw


def test_empty_message_is_sixteen_bytes() -> None:
    raw = encode_message({}, b"")
    assert len(raw) == 16
    assert decode([raw]) == [EventMessage({}, b"")]
    assert botocore_messages(raw) == [({}, b"")]


@given(
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_any_split_gives_the_same_messages_as_botocore(
    payloads: list[bytes], cuts: list[int]
) -> None:
    raw = b"".join(
        encode_message({":message-type": "event", "n": Int(i)}, p) for i, p in enumerate(payloads)
    )
    ours = decode(split_at(raw, cuts))
    assert [m.payload for m in ours] == payloads
    theirs = botocore_messages(raw, cuts)
    assert [(dict(m.headers)["n"], m.payload) for m in ours] == [
        (Int(cast(int, h["n"])), p) for h, p in theirs
    ]


def test_byte_at_a_time() -> None:
    raw = encode_chunk(b'{"type":"ping"}') + encode_chunk(b'{"type":"message_stop"}')
    chunks = [raw[i : i + 1] for i in range(len(raw))]
    assert [chunk_payload(m) for m in decode(chunks)] == [
        b'{"type":"ping"}',
        b'{"type":"message_stop"}',
    ]


def test_messages_are_returned_by_the_feed_that_completes_them() -> None:
    one, two = encode_chunk(b'{"a":1}'), encode_chunk(b'{"b":2}')
    decoder = EventStreamDecoder()
    assert decoder.feed(one[:5]) == []
    assert [chunk_payload(m) for m in decoder.feed(one[5:] + two[:20])] == [b'{"a":1}']
    assert [chunk_payload(m) for m in decoder.feed(two[20:])] == [b'{"b":2}']
    decoder.close()


def flip(raw: bytes, index: int) -> bytes:
    return raw[:index] + bytes((raw[index] ^ 0x01,)) + raw[index + 1 :]


@pytest.mark.parametrize(
    ("index", "match"),
    [
        pytest.param(0, "prelude CRC", id="total-length"),
        pytest.param(5, "prelude CRC", id="headers-length"),
        pytest.param(9, "prelude CRC", id="prelude-crc"),
        pytest.param(14, "message CRC", id="header-byte"),
        pytest.param(-6, "message CRC", id="payload-byte"),
        pytest.param(-1, "message CRC", id="message-crc"),
    ],
)
def test_corruption_is_a_clear_error(index: int, match: str) -> None:
    raw = encode_chunk(b'{"type":"ping"}')
    with pytest.raises(EventStreamError, match=match):
        decode([flip(raw, index % len(raw))])


def test_corrupt_prelude_fails_before_the_body_arrives() -> None:
    # a flipped length must not leave the decoder waiting for megabytes that never come
    raw = flip(encode_chunk(b"{}"), 2)
    with pytest.raises(EventStreamError, match="prelude CRC"):
        EventStreamDecoder().feed(raw[:12])


def with_prelude(total: int, headers_len: int, rest: bytes = b"") -> bytes:
    prelude = struct.pack(">II", total, headers_len)
    return prelude + struct.pack(">I", zlib.crc32(prelude)) + rest


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        pytest.param(with_prelude(15, 0), "impossible", id="total-below-minimum"),
        pytest.param(with_prelude(20, 5), "impossible", id="headers-longer-than-message"),
        pytest.param(with_prelude(64 * 1024 * 1024, 0), "exceeds", id="message-too-large"),
        pytest.param(with_prelude(200_000, 190_000), "exceeds", id="headers-too-large"),
    ],
)
def test_impossible_lengths(raw: bytes, match: str) -> None:
    with pytest.raises(EventStreamError, match=match):
        EventStreamDecoder().feed(raw)


def test_limit_is_configurable() -> None:
    raw = encode_message({}, b"x" * 100)
    with pytest.raises(EventStreamError, match="exceeds"):
        EventStreamDecoder(max_message_bytes=64).feed(raw)


def framed(headers: bytes) -> bytes:
    """A message with hand-made header bytes and valid CRCs."""
    total = 16 + len(headers)
    prelude = struct.pack(">II", total, len(headers))
    head = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers
    return head + struct.pack(">I", zlib.crc32(head))


@pytest.mark.parametrize(
    ("headers", "match"),
    [
        pytest.param(b"\x01a\x0a", "type 10 is unknown", id="unknown-type"),
        pytest.param(b"\x01a\x00\x01a\x01", "appears twice", id="duplicate"),
        pytest.param(b"\x01a\x07\x00\x09ab", "truncated", id="string-past-end"),
        pytest.param(b"\x01a\x05\x00\x00", "truncated", id="int64-past-end"),
        pytest.param(b"\x01a\x09\x00", "truncated", id="uuid-past-end"),
        pytest.param(b"\x05ab", "truncated", id="name-past-end"),
        pytest.param(b"\x01\xff\x00", "not UTF-8", id="name-not-utf8"),
    ],
)
def test_bad_headers(headers: bytes, match: str) -> None:
    with pytest.raises(EventStreamError, match=match):
        decode([framed(headers)])


def test_stream_ending_inside_a_message() -> None:
    decoder = EventStreamDecoder()
    decoder.feed(encode_chunk(b"{}")[:-3])
    with pytest.raises(EventStreamError, match="ended inside a message"):
        decoder.close()


def test_header_encoding_limits() -> None:
    with pytest.raises(ValueError, match="1-255 bytes"):
        encode_message({"": "x"}, b"")
    with pytest.raises(ValueError, match="65535"):
        encode_message({"a": "x" * 70000}, b"")


# -- Bedrock payloads -------------------------------------------------------------------

_SHAPE = ServiceModel(Loader().load_service_model("bedrock-runtime", "service-2")).shape_for(
    "ResponseStream"
)


def bedrock_parse(raw: bytes) -> list[dict[str, object]]:
    """What the anthropic SDK's AnthropicBedrock (botocore's parser) makes of our bytes."""
    buffer = EventStreamBuffer()
    buffer.add_data(raw)
    parser = EventStreamJSONParser()
    return [parser.parse(m.to_response_dict(), _SHAPE) for m in buffer]


def test_chunk_is_what_bedrock_clients_parse() -> None:
    event = orjson.dumps(
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hé"}}
    )
    [parsed] = bedrock_parse(encode_chunk(event))
    assert parsed == {"chunk": {"bytes": event}}


def test_exception_is_what_bedrock_clients_parse() -> None:
    raw = encode_exception("throttlingException", "slow down")
    buffer = EventStreamBuffer()
    buffer.add_data(raw)
    [message] = list(buffer)
    assert message.to_response_dict()["status_code"] == 400
    [parsed] = bedrock_parse(raw)
    assert parsed == {"Error": {"Code": "throttlingException", "Message": "slow down"}}


def test_chunk_payload_ignores_bedrock_padding() -> None:
    payload = orjson.dumps(
        {"bytes": base64.b64encode(b'{"type":"ping"}').decode(), "p": "abcdefgh"}
    )
    raw = encode_message(
        {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"},
        payload,
    )
    [message] = decode([raw])
    assert chunk_payload(message) == b'{"type":"ping"}'


@pytest.mark.parametrize(
    "payload",
    [b"not json", b'{"nobytes":1}', b'{"bytes":"***"}', b"[1]", b'{"bytes":3}'],
)
def test_bad_chunk_payload(payload: bytes) -> None:
    message = EventMessage({":event-type": "chunk", ":message-type": "event"}, payload)
    with pytest.raises(EventStreamError, match="not"):
        chunk_payload(message)


def test_chunk_payload_refuses_an_exception() -> None:
    [message] = decode([encode_exception("validationException", "bad")])
    assert message.message_type == "exception"
    assert message.header(":exception-type") == "validationException"
    with pytest.raises(EventStreamError, match="expected a chunk event"):
        chunk_payload(message)


# -- Bedrock answers as Anthropic events ------------------------------------------------

STREAM_EVENTS: list[dict[str, Any]] = [
    {"type": "message_start", "message": {"id": "m", "usage": {"input_tokens": 3}}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
    {"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 3}},
]


def test_bedrock_parser_gives_sse_events() -> None:
    raw = b"".join(encode_chunk(orjson.dumps(e)) for e in STREAM_EVENTS)
    parser = BedrockEventParser()
    events = [e for piece in split_at(raw, [7, 100, 101]) for e in parser.feed(piece)]
    events += parser.close()
    assert [e.event for e in events] == ["message_start", "content_block_delta", "message_stop"]
    assert [orjson.loads(e.data) for e in events] == STREAM_EVENTS


def test_bedrock_parser_turns_an_exception_into_an_error_event() -> None:
    [event] = BedrockEventParser().feed(encode_exception("throttlingException", "slow"))
    assert event.event == "error"
    assert orjson.loads(event.data) == {
        "type": "error",
        "error": {"type": "throttlingException", "message": "slow"},
    }


def test_bedrock_parser_skips_other_event_types() -> None:
    other = encode_message({":message-type": "event", ":event-type": "metadata"}, b"{}")
    events = BedrockEventParser().feed(other + encode_chunk(b'{"type":"ping"}'))
    assert [e.event for e in events] == ["ping"]


def test_bedrock_parser_refuses_a_truncated_stream() -> None:
    parser = BedrockEventParser()
    parser.feed(encode_chunk(b"{}")[:10])
    with pytest.raises(AnswerWithheld, match="not a valid AWS event stream") as caught:
        parser.close()
    assert (caught.value.status, caught.value.reason) == (502, "undecodable_answer")


def test_bedrock_parser_refuses_a_corrupt_frame() -> None:
    with pytest.raises(AnswerWithheld, match="CRC"):
        BedrockEventParser().feed(flip(encode_chunk(b"{}"), 20))


def anthropic_sdk_events(raw: bytes) -> list[tuple[str | None, str]]:
    """What the anthropic SDK's AnthropicBedrock stream decoder yields for `raw`."""
    decoder = AWSEventStreamDecoder()
    return [(sse.event, sse.data) for sse in decoder.iter_bytes(iter(split_at(raw, [5, 50])))]


def test_sse_events_re_encoded_for_bedrock_clients() -> None:
    sse = b"".join(encode_event(str(e["type"]), orjson.dumps(e).decode()) for e in STREAM_EVENTS)
    parser = SseParser()
    raw = b"".join(encode_bedrock_event(e.event, e.data) for e in parser.feed(sse) + parser.close())
    decoded = anthropic_sdk_events(raw)
    assert [orjson.loads(data) for _, data in decoded] == STREAM_EVENTS


@pytest.mark.parametrize(
    ("anthropic_type", "exception"),
    [
        ("rate_limit_error", "throttlingException"),
        ("overloaded_error", "serviceUnavailableException"),
        ("api_error", "internalServerException"),
        ("something_new", "internalServerException"),
    ],
)
def test_error_events_become_bedrock_exceptions(anthropic_type: str, exception: str) -> None:
    data = orjson.dumps({"type": "error", "error": {"type": anthropic_type, "message": "m"}})
    raw = encode_bedrock_event("error", data.decode())
    [(event, payload)] = anthropic_sdk_events(raw)
    assert event == "error"
    assert orjson.loads(payload)["error"] == {"type": exception, "message": "m"}


@given(
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_garbage_is_refused_cleanly(data: bytes, cuts: list[int]) -> None:
    """Any bytes give messages or an `EventStreamError`, never another exception."""
    decoder = EventStreamDecoder(max_message_bytes=1024)
    try:
        for piece in split_at(data, cuts):
            decoder.feed(piece)
        decoder.close()
    except EventStreamError:
        pass


@given(
    headers=st.binary(max_size=60),
    payload=st.binary(max_size=40),
)
def test_valid_crcs_around_garbage_headers(headers: bytes, payload: bytes) -> None:
    """Corrupt header bytes inside correct CRCs: still only `EventStreamError`."""
    total = 16 + len(headers) + len(payload)
    prelude = struct.pack(">II", total, len(headers))
    head = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + payload
    raw = head + struct.pack(">I", zlib.crc32(head))
    with contextlib.suppress(EventStreamError):
        decode([raw])
