"""Helpers shared by the API-shape tests: recorded fixtures and chunked stream folding."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

from extproc.apis.sse import SseEvent, SseParser

FIXTURES = Path(__file__).parent / "fixtures"


class Feeds(Protocol):
    def feed(self, event: SseEvent) -> None: ...


_A = TypeVar("_A", bound=Feeds)


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return orjson.loads(fixture_bytes(name))


def feed_chunked(raw: bytes, cuts: list[int] | None, accumulator: _A) -> _A:
    """Parse `raw` as SSE, split at `cuts`, and feed every event to `accumulator`."""
    bounds = [0, *sorted({c % (len(raw) + 1) for c in cuts or []}), len(raw)]
    parser = SseParser()
    for a, b in itertools.pairwise(bounds):
        for event in parser.feed(raw[a:b]):
            accumulator.feed(event)
    for event in parser.close():
        accumulator.feed(event)
    return accumulator
