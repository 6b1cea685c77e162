"""The incremental SSE parser and encoder (extproc.apis.sse) against the WHATWG rules."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.apis.sse import SseError, SseEvent, SseParser, encode_event


def parse(chunks: list[bytes], max_bytes: int | None = None) -> list[SseEvent]:
    parser = SseParser() if max_bytes is None else SseParser(max_bytes)
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events + parser.close()


def split_at(raw: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted({c % (len(raw) + 1) for c in cuts}), len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(bounds)]


def ev(data: str, event: str | None = None, id_: str | None = None) -> SseEvent:
    return SseEvent(event=event, data=data, id=id_)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(b"data: hi\n\n", [ev("hi")], id="basic"),
        pytest.param(b"data:hi\n\n", [ev("hi")], id="no-space"),
        pytest.param(b"data:  hi\n\n", [ev(" hi")], id="only-one-space-removed"),
        pytest.param(b"data: a\ndata: b\n\n", [ev("a\nb")], id="multi-line-data"),
        pytest.param(b"data\n\n", [ev("")], id="field-without-colon"),
        pytest.param(b"data:\n\n", [ev("")], id="empty-data"),
        pytest.param(b"data\ndata\n\n", [ev("\n")], id="two-empty-data-lines"),
        pytest.param(b"event: e\n\n", [], id="no-data-no-dispatch"),
        pytest.param(b"event: e\n\ndata: x\n\n", [ev("x")], id="event-name-reset"),
        pytest.param(b"event: ping\ndata: {}\n\n", [ev("{}", "ping")], id="named"),
        pytest.param(b"event:\ndata: x\n\n", [ev("x")], id="empty-event-name-is-none"),
        pytest.param(b": comment\ndata: x\n:\n\n", [ev("x")], id="comments"),
        pytest.param(b"data: a\r\n\r\n", [ev("a")], id="crlf"),
        pytest.param(b"data: a\r\rdata: b\r\r", [ev("a"), ev("b")], id="cr"),
        pytest.param(b"data: a\r\n\rdata: b\n\r\n", [ev("a"), ev("b")], id="mixed-endings"),
        pytest.param(b"foo: bar\ndata: x\n\n", [ev("x")], id="unknown-field"),
        pytest.param(b"data: a:b: c\n\n", [ev("a:b: c")], id="colon-in-value"),
        pytest.param(b"DATA: x\n\n", [], id="field-names-are-case-sensitive"),
        pytest.param(b" data: x\n\n", [], id="leading-space-is-part-of-name"),
        pytest.param(b"data: x", [ev("x")], id="close-flushes-unterminated-event"),
        pytest.param(b"data: x\n", [ev("x")], id="close-flushes-missing-blank-line"),
        pytest.param(b"\xef\xbb\xbfdata: x\n\n", [ev("x")], id="bom"),
        pytest.param(b"data: \xef\xbb\xbfx\n\n", [ev("\ufeffx")], id="bom-inside-kept"),
        pytest.param(
            b"data: x\n\n\xef\xbb\xbfdata: y\n\n", [ev("x")], id="bom-after-start-not-stripped"
        ),
        pytest.param(b"data: caf\xc3\xa9 \xe2\x82\xac\n\n", [ev("café €")], id="utf8"),
        pytest.param(b"data: \xff\xfe\n\n", [ev("\ufffd\ufffd")], id="invalid-utf8-replaced"),
        pytest.param(b"data: x\0y\n\n", [ev("x\0y")], id="nul-in-data"),
    ],
)
def test_parse_cases(raw: bytes, expected: list[SseEvent]) -> None:
    assert parse([raw]) == expected
    assert parse([raw[i : i + 1] for i in range(len(raw))]) == expected


def test_cr_at_chunk_end_and_lf_at_next_start_are_one_line_ending() -> None:
    # Were the LF a second line ending, it would be a blank line dispatching "a" alone.
    assert parse([b"data: a\r", b"\ndata: b\n\n"]) == [ev("a\nb")]
    assert parse([b"data: a\r", b"\n", b"\r\n"]) == [ev("a")]


def test_multibyte_character_split_across_chunks() -> None:
    raw = "data: ☃ 🎉\n\n".encode()
    for cut in range(len(raw) + 1):
        assert parse([raw[:cut], raw[cut:]]) == [ev("☃ 🎉")]


def test_bom_arriving_byte_by_byte() -> None:
    assert parse([b"\xef", b"\xbb", b"\xbf", b"data: x\n\n"]) == [ev("x")]
    assert parse([b"\xef\xbb", b"\xbfdata: x\n\n"]) == [ev("x")]


def test_partial_bom_is_not_stripped() -> None:
    # Only a complete BOM is dropped; a partial one starts a (garbage) field name.
    assert parse([b"\xef", b"data: x\n\n"]) == []
    assert parse([b"\xef", b"\xbbdata: x\n\n"]) == []


def test_events_are_returned_by_the_chunk_that_completes_them() -> None:
    parser = SseParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\ndata: b\n\nda") == [ev("a"), ev("b")]
    assert parser.feed(b"ta: c\n\n") == [ev("c")]
    assert parser.close() == []


def test_id_persists_across_events_and_nul_ids_are_ignored() -> None:
    raw = b"id: 1\ndata: a\n\ndata: b\n\nid: 2\0\ndata: c\n\nid\ndata: d\n\n"
    assert parse([raw]) == [ev("a", id_="1"), ev("b", id_="1"), ev("c", id_="1"), ev("d", id_="")]


def test_retry_field_is_recorded_when_all_digits() -> None:
    parser = SseParser()
    parser.feed(b"retry: 3000\n\nretry: 12x\n\n")
    assert parser.retry == 3000


def test_close_does_not_dispatch_a_pending_event_without_data() -> None:
    parser = SseParser()
    parser.feed(b"event: e\nid: 9")
    assert parser.close() == []


def test_pending_line_over_limit_raises() -> None:
    parser = SseParser(max_bytes=10)
    parser.feed(b"data: 1234")
    with pytest.raises(SseError):
        parser.feed(b"5")


def test_pending_line_within_limit_many_chunks() -> None:
    parser = SseParser(max_bytes=1000)
    for _ in range(99):
        assert parser.feed(b"x" * 10) == []
    assert parser.feed(b"\n") == []


def test_event_data_over_limit_raises() -> None:
    parser = SseParser(max_bytes=20)
    with pytest.raises(SseError):
        parser.feed(b"data: 12345\n" * 4)


def test_sse_error_is_a_value_error() -> None:
    assert issubclass(SseError, ValueError)


@pytest.mark.parametrize(
    ("event", "data", "raw"),
    [
        ("stop", '{"type":"stop"}', b'event: stop\ndata: {"type":"stop"}\n\n'),
        (None, "[DONE]", b"data: [DONE]\n\n"),
        (None, "a\r\nb\rc\nd", b"data: a\ndata: b\ndata: c\ndata: d\n\n"),
        (None, "", b"data: \n\n"),
    ],
)
def test_encode_event(event: str | None, data: str, raw: bytes) -> None:
    assert encode_event(event, data) == raw


def test_encode_event_rejects_line_breaks_in_event_name() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        encode_event("a\nb", "x")


# ASCII plus the awkward: multibyte UTF-8 of every length, BOM, NUL, and characters
# that str.splitlines() would (wrongly, for SSE) treat as line breaks.
_chars = st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from(
    ["é", "€", "☃", "🎉", "\ufeff", "\0", "\t", "\x0b", "\x0c", "\x1c", "\x85", "\u2028"]
)
_text = st.text(_chars, max_size=20)
_name = st.text(_chars, min_size=1, max_size=12).filter(lambda s: "\r" not in s and "\n" not in s)
_id = st.text(_chars, max_size=8).filter(lambda s: not {"\r", "\n", "\0"} & set(s))


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[SseEvent]]:
    """A valid event stream in a random dialect, and the events it must parse to."""
    ending = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    spaced = draw(st.booleans())
    lines: list[str] = ["\ufeff"] if draw(st.booleans()) else [""]
    expected: list[SseEvent] = []
    last_id: str | None = None
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.none() | _name)
        data_lines = draw(st.lists(_text, min_size=1, max_size=3))
        if draw(st.booleans()):
            lines.append(": comment" + ending)
        if name is not None:
            lines.append(f"event:{' ' if spaced else ''}{name}{ending}")
        new_id = draw(st.none() | _id)
        if new_id is not None:
            lines.append(f"id: {new_id}{ending}")
            last_id = new_id
        for line in data_lines:
            space = " " if spaced or line.startswith(" ") else ""
            lines.append(f"data:{space}{line}{ending}")
        lines.append(ending)
        event_name = name.removeprefix(" ") if name is not None and not spaced else name
        expected.append(SseEvent(event_name or None, "\n".join(data_lines), last_id))
    return "".join(lines).encode(), expected


@given(streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_chunking_gives_the_events_of_the_whole(
    stream: tuple[bytes, list[SseEvent]], cuts: list[int]
) -> None:
    raw, expected = stream
    assert parse([raw]) == expected
    assert parse(split_at(raw, cuts)) == expected


@given(streams())
def test_byte_at_a_time_gives_the_events_of_the_whole(stream: tuple[bytes, list[SseEvent]]) -> None:
    raw, expected = stream
    assert parse([raw[i : i + 1] for i in range(len(raw))]) == expected


@given(
    st.lists(st.tuples(st.none() | _name, st.text(_chars | st.sampled_from("\r\n"))), max_size=5),
    st.lists(st.integers(0, 999)),
)
def test_encode_then_parse_round_trips(
    events: list[tuple[str | None, str]], cuts: list[int]
) -> None:
    raw = b"".join(encode_event(name, data) for name, data in events)
    expected = [
        SseEvent(name or None, data.replace("\r\n", "\n").replace("\r", "\n"))
        for name, data in events
    ]
    assert parse(split_at(raw, cuts)) == expected
