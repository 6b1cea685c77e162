"""W3C trace context on the request path: which `traceparent` values are followed."""

from __future__ import annotations

import pytest

from extproc.telemetry.otel import TRACE_ID_LIMIT, parse_traceparent, start_trace

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def test_valid_traceparent_is_parsed() -> None:
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-01") == (int(TRACE, 16), int(SPAN, 16), 1)
    # A later version may append fields; its first four are read as version 00's.
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-00-extra") == (int(TRACE, 16), int(SPAN, 16), 0)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        f"00-{TRACE}-{SPAN}",
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"ff-{TRACE}-{SPAN}-01",  # forbidden version
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper-case hex is invalid
        f"00-{TRACE[:-1]}g-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-1",
        f"0-{TRACE}-{SPAN}-011",
    ],
)
def test_invalid_traceparent_is_ignored(value: str | None) -> None:
    assert parse_traceparent(value) is None
    headers = {"traceparent": value} if value is not None else {}
    trace = start_trace(headers, bound=TRACE_ID_LIMIT + 1)
    assert trace.parent_id is None  # a new trace, not a broken one
    assert trace.traceparent != value


def test_child_keeps_trace_and_follows_the_callers_sampling() -> None:
    for flags, sampled in (("01", True), ("00", False)):
        headers = {"traceparent": f"00-{TRACE}-{SPAN}-{flags}", "tracestate": "vendor=1"}
        trace = start_trace(headers, bound=0 if sampled else TRACE_ID_LIMIT + 1)
        assert trace.sampled is sampled
        assert trace.tracestate == "vendor=1"
        assert (trace.parent_id, trace.parent_flags) == (int(SPAN, 16), int(flags, 16))
        version, trace_id, span_id, out_flags = trace.traceparent.split("-")
        assert (version, trace_id, out_flags) == ("00", TRACE, flags)
        assert span_id != SPAN


def test_new_traces_are_sampled_by_ratio() -> None:
    assert all(start_trace({}, bound=TRACE_ID_LIMIT + 1).sampled for _ in range(50))
    assert not any(start_trace({}, bound=0).sampled for _ in range(50))
    half = sum(start_trace({}, bound=(TRACE_ID_LIMIT + 1) // 2).sampled for _ in range(2000))
    assert 800 < half < 1200
