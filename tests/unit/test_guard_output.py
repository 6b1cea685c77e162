"""Output screening: streamed == whole for any chunking; deny rules; schema subset."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.policies.guard import Guard, GuardConfig
from extproc.policies.guard.output import (
    OutputScreener,
    check_schema_supported,
    phrase_rule,
    regex_rule,
    validate_json_schema,
    validate_structured,
)

GH = "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
SK = "sk-proj-abcDEF1234567890abcdEFGH1234567890xyzXYZ"
PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQ" + "Ab1/" * 20 + "\n-----END PRIVATE KEY-----"

SCREENER = OutputScreener(
    [
        phrase_rule("no_rm", "rm -rf /", "block"),
        phrase_rule("codename", "Project Falcon", "redact"),
        regex_rule("ticket", r"JIRA-[0-9]{1,6}", 16, "redact"),
    ]
)


def _stream(screener: OutputScreener, text: str, bounds: list[int]) -> tuple[str, str | None]:
    s = screener.stream()
    out: list[str] = []
    blocked = None
    for a, b in itertools.pairwise(bounds):
        chunk = s.feed(text[a:b])
        out.append(chunk.text)
        blocked = blocked or chunk.blocked
    tail = s.flush()
    out.append(tail.text)
    return "".join(out), blocked or tail.blocked


# Phrases led by punctuation and text whose lower-casing changes length ('İ') take
# other code paths; both screeners must stay chunking-invariant.
PUNCT = OutputScreener(
    [phrase_rule("ghp_talk", "ghp token", "redact"), phrase_rule("pem", "-----begin", "block")]
)
pieces = st.sampled_from(
    [
        GH,
        SK,
        PEM,
        GH[:10],
        "ghp_",
        "sk-",
        "sk-proj-",
        "sk-ant-",
        "-----BEGIN ",
        "-----END PRIVATE KEY-----",
        "Project ",
        "falcon",
        "PROJECT  FALCON",
        "rm -rf /",
        "RM  -RF /",
        "rm -rf /tmp",
        "JIRA-123",
        "JIRA-",
        "hello ",
        "x",
        " ",
        "\n",
        "abc123",
        "-",
        "_",
        "=",
        "é",
        "İ",
        "eyJ",
        "AKIAQYLPMN5HFIQR7XYZ",
        "ghp token",
        "GHP",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(pieces, max_size=25),
    cuts=st.lists(st.integers(0, 2000), max_size=15),
    screener=st.sampled_from([SCREENER, PUNCT]),
)
def test_any_chunking_gives_the_whole_text_result(
    parts: list[str], cuts: list[int], screener: OutputScreener
) -> None:
    text = "".join(parts)
    whole, _ = screener.screen_text(text)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    assert _stream(screener, text, bounds) == (whole.text, whole.blocked)


def test_secret_split_across_chunks_is_redacted() -> None:
    text = f"use {GH} please"
    out, blocked = _stream(SCREENER, text, [0, 8, 9, 20, 30, len(text)])
    assert GH not in out
    assert "[REDACTED:github_token:" in out
    assert blocked is None


PHRASES_AND_SECRETS = OutputScreener([phrase_rule("no_rm", "rm -rf /", "block")])


def test_text_that_cannot_start_a_match_is_released_at_once() -> None:
    s = PHRASES_AND_SECRETS.stream()
    assert s.feed("Hello world. ").text == "Hello world. "
    assert s.feed("The key is gh").text == "The key is "  # only 'gh' is held
    assert s.feed("x and more").text == "ghx and more"
    assert s.feed("; rm -r").text == "; "  # a possible phrase prefix is held
    assert s.feed("emote").text == "rm -remote"


def test_regex_deny_rules_hold_their_window() -> None:
    s = SCREENER.stream()
    assert s.feed("0123456789abcdefghij").text == "0123"  # 16 = the rule's max_len


def test_block_stops_the_stream_after_the_safe_prefix() -> None:
    s = PHRASES_AND_SECRETS.stream()
    first = s.feed("run rm -r")
    second = s.feed("f / now")
    assert first.text == "run "
    assert second.text == ""
    assert second.blocked == "no_rm"
    assert s.feed("more").text == ""
    assert s.flush().blocked == "no_rm"


def test_whole_json_answer_is_screened() -> None:
    g = Guard(
        GuardConfig.model_validate(
            {"profiles": {"default": {"output": {"deny": [{"id": "no_rm", "phrase": "rm -rf /"}]}}}}
        )
    )
    body: dict[str, Any] = {
        "content": [
            {"type": "text", "text": f"key {GH}"},
            {"type": "tool_use", "id": "t", "name": "Bash", "input": {"command": "ls"}},
        ]
    }
    result = g.profile().screen_response(body, "anthropic")
    assert result.body is not None
    assert GH not in result.body["content"][0]["text"]
    assert result.body["content"][1] is body["content"][1]
    bad = {
        "choices": [
            {
                "message": {
                    "content": "ok",
                    "tool_calls": [
                        {"function": {"name": "sh", "arguments": '{"cmd": "rm -rf /"}'}}
                    ],
                }
            }
        ]
    }
    assert g.profile().screen_response(bad, "openai").blocked == "no_rm"


SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 20},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "uniqueItems": True},
        "owner": {"$ref": "#/$defs/person"},
        "kind": {"anyOf": [{"const": "x"}, {"type": "integer"}]},
    },
    "required": ["title", "score"],
    "additionalProperties": False,
    "$defs": {
        "person": {
            "type": "object",
            "properties": {"name": {"type": "string", "pattern": "^[A-Z]"}},
            "required": ["name"],
        }
    },
}


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ('{"title": "t", "score": 0.5}', True),
        (
            '  {"title": "t", "score": 1, "tags": ["a"], "owner": {"name": "Ann"}, "kind": 3}\n',
            True,
        ),
        ('{"title": "", "score": 2}', False),
        ('{"title": "t"}', False),
        ('{"title": "t", "score": 0.5, "extra": 1}', False),
        ('{"title": "t", "score": 0.5, "tags": ["a", "a"]}', False),
        ('{"title": "t", "score": 0.5, "owner": {"name": "ann"}}', False),
        ('{"title": "t", "score": true}', False),
        ('{"title": "t", "score": 0.5, "kind": "y"}', False),
        ("not json", False),
    ],
)
def test_schema_subset(text: str, ok: bool) -> None:
    verdict = validate_structured(text, SCHEMA)
    assert verdict.ok is ok
    assert all('"' not in e or "property" in e for e in verdict.errors)  # paths, not values


def test_schema_errors_name_paths_not_values() -> None:
    verdict = validate_json_schema({"title": "secret-value-123", "score": 5}, SCHEMA)
    assert verdict.errors == ("$.score: violates maximum",)


def test_unsupported_schema_is_rejected_at_load() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        check_schema_supported({"type": "object", "if": {}, "then": {}})
    with pytest.raises(ValueError, match="local"):
        check_schema_supported({"$ref": "https://example.com/s.json"})
    g = Guard(GuardConfig.model_validate({"profiles": {"default": {"output": {"schema": SCHEMA}}}}))
    assert g.profile().check_structured('{"title": "t", "score": 0}') is not None
