"""Redaction walks request bodies, keeps JSON valid, never touches what it must not."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.policies.guard import Guard, GuardConfig
from extproc.policies.guard.redact import MaskBook, Unmasker, collect_texts, redaction_placeholder
from tests.data.claude_code_request import (
    build_openai_request,
    build_request,
    build_request_bytes,
)

GH = "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
MAIL = "jane.doe@acme-corp.io"


def _guard(profile: dict[str, Any] | None = None) -> Guard:
    return Guard(GuardConfig.model_validate({"profiles": {"default": profile or {}}}))


def _body() -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "system": [
            {"type": "text", "text": f"ops contact {MAIL}", "cache_control": {"type": "ephemeral"}}
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": f"token {GH}", "cache_control": {"type": "ephemeral"}},
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": "c2stcHJvai1hYmNERUYxMjM0NTY3ODkwYWJjZEVGR0g=",
                        },
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": f"the key is {GH}", "signature": "sig"},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "Bash",
                        "input": {"command": f"echo {GH}", "timeout": 5, GH: "key stays"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": GH}],
                    },
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": f"mail {MAIL}"},
                ],
            },
        ],
    }


def test_claude_code_request_passes_default_profile_untouched() -> None:
    body = build_request()
    before = orjson.dumps(body)
    result = _guard().profile().redact_request(body, "anthropic")
    assert result.body is None
    assert result.blocked is None
    assert all(v.action == "log" for v in result.verdicts)
    assert orjson.dumps(body) == before
    assert 110_000 < len(build_request_bytes()) < 125_000


def test_openai_shape_of_the_same_request_passes_untouched() -> None:
    result = _guard().profile().redact_request(build_openai_request(), "openai")
    assert result.body is None
    assert result.blocked is None


def test_redaction_replaces_only_matches_and_keeps_everything_else() -> None:
    body = _body()
    original = copy.deepcopy(body)
    result = _guard().profile().redact_request(body, "anthropic")
    assert body == original  # input never mutated
    new = orjson.loads(orjson.dumps(result.body))  # still valid JSON
    tag = redaction_placeholder("github_token", GH)
    assert new["system"][0]["text"] == f"ops contact {redaction_placeholder('email', MAIL)}"
    assert new["system"][0]["cache_control"] == {"type": "ephemeral"}
    user = new["messages"][0]["content"]
    assert user[0] == {
        "type": "text",
        "text": f"token {tag}",
        "cache_control": {"type": "ephemeral"},
    }
    assert user[1] == body["messages"][0]["content"][1]  # image untouched
    thinking, tool_use = new["messages"][1]["content"]
    # Thinking reaches the model too: redacted, its signature left as it was.
    assert thinking == {"type": "thinking", "thinking": f"the key is {tag}", "signature": "sig"}
    # A tool input's keys are the caller's text as much as its values.
    assert tool_use["input"] == {"command": f"echo {tag}", "timeout": 5, tag: "key stays"}
    assert new["messages"][2]["content"][0]["content"][0]["text"] == tag
    assert {(v.rule, v.action, v.count) for v in result.verdicts} == {
        ("github_token", "redact", 5),
        ("email", "redact", 2),
    }
    # untouched subtrees are shared, not copied
    assert result.body is not None
    assert result.body["messages"][0]["content"][1] is body["messages"][0]["content"][1]


def test_placeholder_hash_is_stable_keyed_and_short() -> None:
    a = redaction_placeholder("github_token", GH)
    assert a == redaction_placeholder("github_token", GH)
    assert a != redaction_placeholder("github_token", GH, b"k")
    assert a.startswith("[REDACTED:github_token:")
    assert len(a.rsplit(":", 1)[1]) == 5


def test_block_action_names_rule_not_value() -> None:
    result = (
        _guard({"actions": {"github_token": "block"}})
        .profile()
        .redact_request(_body(), "anthropic")
    )
    assert result.body is None
    assert result.blocked == "github_token"
    assert GH not in repr(result)


def test_log_action_changes_nothing() -> None:
    result = (
        _guard({"actions": {"secret": "log", "pii": "log"}})
        .profile()
        .redact_request(_body(), "anthropic")
    )
    assert result.body is None
    assert result.blocked is None
    assert result.verdicts


def test_tool_definitions_are_scanned_unless_disabled() -> None:
    body = {
        "tools": [
            {
                "name": "t",
                "description": f"ask {MAIL}",
                "input_schema": {
                    "type": "object",
                    "properties": {"x": {"type": "string", "description": f"or {MAIL}"}},
                },
            }
        ],
        "messages": [],
    }
    # name, description, the property name and its description
    assert collect_texts(body, "anthropic") == ["t", f"ask {MAIL}", "x", f"or {MAIL}"]
    assert _guard().profile().redact_request(body, "anthropic").changed
    assert (
        not _guard({"scan_tool_definitions": False})
        .profile()
        .redact_request(body, "anthropic")
        .changed
    )


def test_openai_arguments_stay_valid_json() -> None:
    args = orjson.dumps({"cmd": f"export T={GH}", "n": 1, "nested": [{"to": MAIL}]}).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "image_url": {"url": "data:x"}},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "sh", "arguments": args}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": f"done {GH}"},
        ]
    }
    result = _guard().profile().redact_request(body, "openai")
    assert result.body is not None
    new_args = orjson.loads(result.body["messages"][1]["tool_calls"][0]["function"]["arguments"])
    assert new_args["n"] == 1
    assert GH not in new_args["cmd"]
    assert MAIL not in str(new_args)
    assert result.body["messages"][0] == body["messages"][0]
    assert GH not in result.body["messages"][2]["content"]


def test_masking_round_trip_json_and_stream() -> None:
    profile = _guard({"masking": {"enabled": True}}).profile()
    result = profile.redact_request(_body(), "anthropic")
    assert result.body is not None
    assert result.masks == {"[EMAIL_1]": MAIL}
    assert "[EMAIL_1]" in result.body["system"][0]["text"]
    assert result.body["messages"][0]["content"][0]["text"].startswith("token [REDACTED:")
    answer = {
        "content": [
            {"type": "text", "text": "Mail [EMAIL_1] now"},
            {"type": "tool_use", "id": "t", "name": "mail", "input": {"to": "[EMAIL_1]"}},
        ]
    }
    restored = profile.unmasker(result.masks).response(answer, "anthropic")
    assert restored is not None
    assert restored["content"][0]["text"] == f"Mail {MAIL} now"
    assert restored["content"][1]["input"] == {"to": MAIL}


def test_mask_numbers_skip_existing_placeholder_text() -> None:
    book = MaskBook(["user wrote [EMAIL_1] literally"])
    assert book.placeholder("EMAIL", "a@b.io") == "[EMAIL_2]"
    assert book.placeholder("EMAIL", "a@b.io") == "[EMAIL_2]"


def test_unmask_openai_arguments_escapes_json() -> None:
    u = Unmasker({"[NAME_1]": 'Jo "the" Doe'})
    body = {
        "choices": [
            {
                "message": {
                    "content": "hi [NAME_1]",
                    "tool_calls": [{"function": {"name": "f", "arguments": '{"who": "[NAME_1]"}'}}],
                }
            }
        ]
    }
    out = u.response(body, "openai")
    assert out is not None
    assert orjson.loads(out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]) == {
        "who": 'Jo "the" Doe'
    }


MAP = {"[EMAIL_1]": "a@x.io", "[EMAIL_12]": "b@y.io", "[PHONE_1]": "+1 202 555 0147"}
pieces = st.sampled_from(
    [
        "[EMAIL_1]",
        "[EMAIL_12]",
        "[PHONE_1]",
        "[EMAIL_",
        "[",
        "]",
        "EMAIL",
        "_1",
        "text ",
        "[NOPE_1]",
        "x",
        "\n",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(pieces, max_size=30),
    cuts=st.lists(st.integers(0, 400), max_size=12),
    escape=st.booleans(),
)
def test_stream_unmask_equals_whole_for_any_chunking(
    parts: list[str], cuts: list[int], escape: bool
) -> None:
    text = "".join(parts)
    u = Unmasker(MAP)
    stream = u.stream(json_escape=escape)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    out = "".join(stream.feed(text[a:b]) for a, b in itertools.pairwise(bounds))
    assert out + stream.flush() == u.text(text, json_escape=escape)


def test_stream_unmask_holds_only_a_possible_prefix() -> None:
    stream = Unmasker(MAP).stream()
    assert stream.feed("hello [EM") == "hello "
    assert stream.feed("AIL_1] and [x") == "a@x.io and [x"
    assert stream.feed("[") == ""  # '[' may start a placeholder
    assert stream.feed("y") == "[y"


@pytest.mark.parametrize("api", ["anthropic", "openai"])
def test_empty_and_odd_bodies(api: str) -> None:
    profile = _guard().profile()
    for body in ({}, {"messages": None}, {"messages": [None, 3, {"content": 5}]}, {"system": 7}):
        assert profile.redact_request(body, api).body is None  # type: ignore[arg-type]
