"""The report's HTML page rendered by a real headless Chromium: it opens offline, asks
for nothing beyond itself, logs no console error, and shows its charts and tables."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from extproc.report import html
from extproc.report.summary import SCOPES, summarize
from tests.chromium import chromium_binary, inspect_page
from tests.unit.test_report import NOW, RECORDS, SINCE

pytestmark = pytest.mark.skipif(
    chromium_binary() is None, reason="Chromium is not installed (scripts/test installs it)"
)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_the_checker_sees_console_errors_and_failed_loads(tmp_path: Path) -> None:
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><body><img src='missing.png'>"
        "<script>console.error('control-error'); notAFunction();</script></body>"
    )
    report = inspect_page(page.as_uri(), tmp_path / "bad.png", height=400)
    joined = "\n".join(report.problems)
    assert "console.error: control-error" in joined
    assert "notAFunction" in joined
    assert "ERR_FILE_NOT_FOUND" in joined


def test_report_page_renders_offline_without_console_errors(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(html.render(summarize(RECORDS, SINCE, NOW, "day"), SCOPES, 10))
    shot = tmp_path / "report.png"
    report = inspect_page(page.as_uri(), shot)
    assert report.problems == []
    assert report.requested == [page.as_uri()]  # no CDN, no font, no favicon fetch
    for heading in (
        "Spend by day",
        "Spend by team",
        "Top sessions by cost",
        "Guardrail hits",
        "Rejections by reason",
        "budget_exceeded",
        "$2.25",
    ):
        assert heading in report.text
    assert report.svg_count >= 10
    width, height = png_size(shot.read_bytes())
    assert width == 1400
    assert height > 1000  # the whole page, not one viewport
