"""Shape's near-miss paths, found without formatting every string's path, equal the
full walk's (`_strings` + `format_path`), also where two paths format alike."""

from __future__ import annotations

import zlib
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from extproc.policies.cache.key import (
    DIRECTORIES,
    SHAPE_DEPTH,
    Shape,
    ShapeMemo,
    _strings,
    format_path,
)


def _shape(body: dict[str, Any]) -> Shape:
    checksums = [zlib.crc32(text.encode()) for _, text in _strings(body, ())]
    return Shape(digest="d", checksums=checksums, body=body)


def _reference(before: dict[str, Any], after: dict[str, Any]) -> tuple[list[str], list[str]]:
    old = [text for _, text in _strings(before, ())]
    new = list(_strings(after, ()))
    changed = sorted(format_path(p) for i, (p, t) in enumerate(new) if old[i] != t)
    wanted = set(changed)
    dirs = sorted(
        format_path(p) for p, t in new if format_path(p) in wanted and DIRECTORIES.search(t)
    )
    return changed, dirs


def _body(home: str, tail: str) -> dict[str, Any]:
    return {
        "a.b": "/home/x1/z",  # formats like a -> b below
        "a": {"b": home, "c": ["same", {"": home}]},
        "": {"x": "/tmp/q7"},
        "x": "keep",
        "messages": [{"content": [{"text": "t"}, {"text": tail}]}],
    }


def test_paths_match_the_full_walk() -> None:
    cases = [
        (_body("/home/u1/p", "turn 1"), _body("/home/u2/p", "turn 1")),
        (_body("/home/u1/p", "turn 1"), _body("/home/u1/p", "turn 2")),
        (_body("/home/u1/p", "turn 1"), _body("/home/u3/p", "turn 9")),
    ]
    for before, after in cases:
        shape = _shape(after)
        changed = shape.defeated_by(_shape(before).encode("k1"), "k2")
        assert (changed, shape.directory_fields(changed)) == _reference(before, after)
    # every path, with the ambiguous ones ("a.b", ".x" after an empty key)
    body = _body("/home/u1/p", "t")
    every = [format_path(p) for p, _ in _strings(body, ())]
    expected = sorted(
        format_path(p)
        for p, t in _strings(body, ())
        if format_path(p) in set(every) and DIRECTORIES.search(t)
    )
    assert _shape(body).directory_fields(every) == expected


def _reference_shape(body: dict[str, Any]) -> tuple[bytes, list[int]]:
    """The whole body's shape bytes and checksums, computed in one piece."""
    from extproc.policies.cache.key import _DIRECTORIES_JSON, _HEXISH

    dumped = orjson.dumps(body)
    for directories in _DIRECTORIES_JSON:
        dumped = directories.sub(b"~", dumped)
    return dumped.translate(_HEXISH), [zlib.crc32(t.encode()) for _, t in _strings(body, ())]


def _turns() -> list[dict[str, Any]]:
    tool = {"name": "Bash", "input_schema": {"type": "object", "properties": {"a1": {}}}}
    big = "naïve café ✓ " * 40 + "see /home/alice/src and C:\\Users\\bob\\x /tmp/abc123"
    messages: list[dict[str, Any]] = []
    bodies = []
    for turn in range(6):
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": big},
                    {"type": "tool_result", "content": [{"type": "text", "text": big * 2}]},
                    {"type": "text", "text": f"turn {turn} at /Users/u{turn}/p", "n": [1, 2.5]},
                ],
            }
        )
        messages.append({"role": "assistant", "content": f"ok {turn} " + big})
        body: dict[str, Any] = {
            "model": "m-2024",
            "system": [{"type": "text", "text": big, "/home/k1/x": "key with a path"}],
            "tools": [tool] * 3,
            "messages": [dict(m) for m in messages],
            "deep": [[[[[[[{"x": big, "y": [[["/tmp/deep7"]]]}]]]]]]],
            "empty": {},
            "none": None,
        }
        bodies.append(orjson.loads(orjson.dumps(body)))  # fresh objects, like a parsed body
    return bodies


def test_memo_shape_is_the_whole_bodys() -> None:
    for memo in (ShapeMemo(), ShapeMemo(max_bytes=4096), ShapeMemo(min_bytes=0)):
        for body in _turns() * 2:
            assert memo.shape(body, SHAPE_DEPTH) == _reference_shape(body)


_PATHISH = "/\\:homeUsrtpvaflcj.-~ \"'`TPx"


@given(st.text(alphabet=_PATHISH, max_size=60))
def test_directory_test_is_the_patterns(text: str) -> None:
    """`_has_directory` (each alternative behind its leading literal) agrees with
    `DIRECTORIES.search`, also on texts made of the patterns' own characters."""
    from extproc.policies.cache.key import _has_directory

    for probe in (text, "/home/" + text, "C:\\Users\\" + text, "/var/folders/" + text):
        assert _has_directory(probe) == (DIRECTORIES.search(probe) is not None)
