"""`extproc report`: the aggregation core, the terminal tables, the HTML page's safety
and self-containment, and the command line."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from extproc.cli import main
from extproc.report import html, text
from extproc.report.summary import SCOPES, summarize

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
SINCE = NOW - dt.timedelta(days=7)


def rec(hours_ago: float, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "time": (NOW - dt.timedelta(hours=hours_ago)).isoformat(timespec="milliseconds"),
        "request_id": f"r{hours_ago}",
        "outcome": "ok",
        "input_tokens": 100,
        "output_tokens": 10,
    }
    return {**base, **fields}


RECORDS = [
    rec(1, user="ana", team="search", cost_usd=1.5, session_id="s1",
        scopes={"user": "ana", "team": "search", "pipeline": "nightly", "key": "k1"}),
    rec(2, user="ana", team="search", cost_usd=0.5, session_id="s1", key_id="k1"),
    rec(30, user="bo", team="pay", cost_usd=3.0, session_id="s2", cache="miss"),
    rec(5, user="bo", team="pay", outcome="cache_hit", cache="hit", cost_usd=0.0,
        cost_saved_usd=2.25),
    rec(3, user="eve", outcome="rejected_budget_exceeded", cost_usd=0.0),
    rec(4, user="eve", outcome="rejected_guard_blocked",
        guard={"input": [{"rule": "aws_key", "action": "block", "count": 2}], "output": []}),
    rec(6, user="eve", outcome="rejected_prompt_injection",
        guard={"input": [], "output": [], "injection": {"rules": ["ignore_previous"],
                                                         "action": "block", "score": 0.9}}),
    rec(24 * 9, user="old", cost_usd=100.0),  # outside the window
    {"time": "not a time", "request_id": "bad"},
]  # fmt: skip


def summary() -> Any:
    return summarize(RECORDS, SINCE, NOW, "day")


def test_spend_by_scope_window_and_savings() -> None:
    s = summary()
    assert s.total.requests == 7
    assert s.total.cost_usd == pytest.approx(5.0)
    assert s.total.saved_usd == pytest.approx(2.25)
    assert s.by_scope["user"]["ana"].cost_usd == pytest.approx(2.0)
    assert s.by_scope["team"]["pay"].requests == 2
    assert s.by_scope["key"]["k1"].requests == 2  # from scopes, then from key_id
    assert dict(s.by_scope["pipeline"]).keys() == {"nightly"}
    assert "old" not in s.by_scope["user"]
    assert [name for name, _ in s.top(s.by_scope["user"], 2)] == ["bo", "ana"]
    assert s.cache_hit_ratio == pytest.approx(0.5)
    days = {start.date(): tally.cost_usd for start, tally in s.timeline()}
    assert days[NOW.date()] == pytest.approx(2.0)
    assert days[(NOW - dt.timedelta(days=1)).date()] == pytest.approx(3.0)
    assert len(days) == 8  # every day of the window, empty ones included


def test_rejections_and_guardrail_hits() -> None:
    s = summary()
    assert s.rejections == {"budget_exceeded": 1, "guard_blocked": 1, "prompt_injection": 1}
    assert s.guard_hits == {
        ("input", "aws_key", "block"): 2,
        ("injection", "ignore_previous", "block"): 1,
    }


def test_terminal_tables() -> None:
    out = text.render(summary(), SCOPES, 5)
    assert "requests             7" in out
    assert "saved by the cache   $2.25" in out
    team = out.split("Spend by team")[1].split("\n\n")[0]
    lines = [line.split() for line in team.splitlines()[3:]]
    assert [line[0] for line in lines] == ["pay", "search"]
    assert lines[0][-2:] == ["$3.00", "$2.25"]
    assert "budget_exceeded" in out.split("Rejections by reason")[1]
    assert "aws_key" in out.split("Guardrail hits")[1]


def test_html_escapes_record_values_and_needs_nothing_from_the_network() -> None:
    hostile = rec(1, session_id='<script>alert("x")</script>', user="<b>u</b>", cost_usd=1.0)
    page = html.render(summarize([*RECORDS, hostile], SINCE, NOW, "day"), SCOPES, 10)
    assert "<script" not in page
    assert "&lt;script&gt;" in page
    assert "<b>u</b>" not in page
    references = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert all(ref.startswith("data:") for ref in references), references
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    assert page.count("<svg") >= 10


def write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + b"not json\n")
    return path


def test_cli_reads_json_lines_and_writes_html(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write(tmp_path / "audit.jsonl", RECORDS)
    page = tmp_path / "report.html"
    until = NOW.isoformat()
    code = main(["report", "--source", str(source), "--until", until, "--html", str(page)])
    out = capsys.readouterr().out
    assert code == 0
    assert "requests             7" in out
    assert "by day" in out
    assert page.read_text().startswith("<!DOCTYPE html>")
    code = main(["report", "--source", str(source), "--until", until, "--since", "3h"])
    out = capsys.readouterr().out
    assert "requests             3" in out
    assert "by hour" in out
    code = main(["report", "--source", str(source), "--until", until, "--scope", "team=pay"])
    out = capsys.readouterr().out
    assert "requests             2" in out
    assert "spend                $3.00" in out
    assert "by day, team=pay)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "--since 'yesterday'"),
        (["--until", "1d"], "--until '1d'"),
        (["--since", "2026-12-02"], "is not before --until"),
        (["--by", "planet"], "--by takes"),
        (["--scope", "planet=mars"], "--scope 'planet=mars'"),
        (["--source", "/nonexistent/audit.jsonl"], "No such file"),
    ],
)
def test_cli_mistakes_exit_2_with_the_reason(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write(tmp_path / "audit.jsonl", RECORDS)
    argv = ["report", "--source", str(source), "--until", NOW.isoformat(), *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_without_a_readable_sink_says_what_to_pass(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["report"]) == 2  # default config: audit.sink is stdout
    assert "--source" in capsys.readouterr().err
