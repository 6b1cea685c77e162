"""The audit record's `time` (extproc.stream.record_time): the same text as
`datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")`, for every float."""

from __future__ import annotations

import datetime as dt
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.stream import record_time


def _datetime_text(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")


# Microsecond rounding edges (half to even, a carry into the next second or millisecond).
EDGES = [0.0, -0.0, 1.0, 0.9999995, 0.0000005, -0.5e-6, -1.9999995, 1764660769.9999995]
EDGES += [1764660769.0004995, 1764660769.9995, 1.5e9 + 0.5e-6]


def test_rounding_edges_match_datetime() -> None:
    for base in EDGES:
        for timestamp in (base, math.nextafter(base, -math.inf), math.nextafter(base, math.inf)):
            assert record_time(timestamp) == _datetime_text(timestamp), timestamp


@settings(max_examples=2000, deadline=None)
@given(st.floats(min_value=-1e9, max_value=4e9, allow_nan=False))
def test_any_timestamp_matches_datetime(timestamp: float) -> None:
    assert record_time(timestamp) == _datetime_text(timestamp)


def test_same_second_then_the_next() -> None:
    assert record_time(1764660769.25) == "2025-12-02T07:32:49.250+00:00"
    assert record_time(1764660769.999) == "2025-12-02T07:32:49.999+00:00"
    assert record_time(1764660770.001) == "2025-12-02T07:32:50.001+00:00"
