"""The report as one self-contained HTML page: inline CSS and inline SVG charts, no script
and nothing fetched, so it opens offline and can be mailed as one file. Every value
from a record (a session id comes from a request header) is HTML-escaped."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from html import escape

from extproc.report.summary import Summary, Tally, ranked
from extproc.report.text import TALLY_HEADERS, headline, money, tally_cells, window_title

COST = "#3b6fd8"
SAVED = "#2f9e6b"
ALERT = "#d9534f"
GUARD = "#c58a12"

CSS = """
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f6fa;
color:#1d2533}
header{background:#1d2533;color:#fff;padding:18px 28px}
header h1{margin:0;font-size:20px}header p{margin:4px 0 0;color:#b9c3d6}
main{padding:20px 28px;display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));
gap:18px}
.kpis{grid-column:1/-1;display:flex;flex-wrap:wrap;gap:12px}
.kpi{background:#fff;border-radius:8px;padding:12px 16px;min-width:150px;
box-shadow:0 1px 2px #0002}
.kpi b{display:block;font-size:20px}.kpi span{color:#5b6578;font-size:12px}
section{background:#fff;border-radius:8px;padding:14px 16px;box-shadow:0 1px 2px #0002;
overflow:hidden}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:0 0 10px}
table{border-collapse:collapse;width:100%;font-size:12px;margin-top:8px}
th,td{padding:3px 6px;border-bottom:1px solid #e6e9ef;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left;max-width:220px;overflow:hidden;
text-overflow:ellipsis}
th{color:#5b6578;font-weight:600}
.empty{color:#8a93a5;font-style:italic}
svg text{font:11px system-ui,sans-serif;fill:#3c4556}
.legend{font-size:12px;color:#5b6578}.legend i{display:inline-block;width:10px;height:10px;
margin:0 4px 0 10px;border-radius:2px}
"""


def render(summary: Summary, scopes: Sequence[str], top: int) -> str:
    title = f"extproc report: {window_title(summary)}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>LLM gateway spend report</h1><p>{escape(window_title(summary))}</p></header>",
        "<main>",
        _kpis(summary),
        _timeline_section(summary),
    ]
    for kind in scopes:
        rows = summary.top(summary.by_scope[kind], top)
        parts.append(_tally_section(f"Spend by {kind}", kind, rows))
    parts.append(
        _tally_section("Top sessions by cost", "session", summary.top(summary.by_session, top))
    )
    parts.append(_tally_section("Spend by model", "model", summary.top(summary.by_model, top)))
    parts.append(_count_section("Cache", "result", ranked(summary.cache), SAVED))
    parts.append(_guard_section(summary, top))
    parts.append(
        _count_section("Rejections by reason", "reason", ranked(summary.rejections), ALERT)
    )
    parts.append(_count_section("Outcomes", "outcome", ranked(summary.outcomes), COST))
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _kpis(summary: Summary) -> str:
    cards = "".join(
        f'<div class="kpi"><span>{escape(name)}</span><b>{escape(value)}</b></div>'
        for name, value in headline(summary)
    )
    return f'<div class="kpis">{cards}</div>'


def _timeline_section(summary: Summary) -> str:
    points = summary.timeline()
    legend = (
        f'<div class="legend"><i style="background:{COST}"></i>spend'
        f'<i style="background:{SAVED}"></i>saved by the cache</div>'
    )
    rows = [[f"{t:%Y-%m-%d %H:%M}", *tally_cells(v)] for t, v in points if v.requests]
    return (
        f'<section class="wide"><h2>Spend by {escape(summary.bucket)}</h2>{legend}'
        f"{timeline_svg(points, summary.bucket)}"
        f"{_table(('start', *TALLY_HEADERS), rows)}</section>"
    )


def timeline_svg(points: Sequence[tuple[dt.datetime, Tally]], bucket: str) -> str:
    """Paired bars per bucket: spend and cache savings, with a labelled y axis."""
    width, height, left, bottom = 900, 220, 64, 28
    if not points:
        return '<p class="empty">no requests in this window</p>'
    peak = max(max(t.cost_usd, t.saved_usd) for _, t in points) or 1.0
    slot = (width - left - 10) / len(points)
    bar = max(1.0, slot * 0.4)
    plot = height - bottom - 10
    out = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img">']
    for fraction in (0.0, 0.5, 1.0):
        y = 10 + plot * (1 - fraction)
        out.append(
            f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e6e9ef"/>'
        )
        tick = money(peak * fraction)
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick}</text>')
    label_every = max(1, len(points) // 12)
    fmt = "%m-%d %H:00" if bucket == "hour" else "%m-%d"
    for i, (start, tally) in enumerate(points):
        x = left + i * slot + slot * 0.1
        for offset, value, color, name in (
            (0.0, tally.cost_usd, COST, "spend"),
            (bar, tally.saved_usd, SAVED, "saved"),
        ):
            h = plot * value / peak
            tip = f"{start:%Y-%m-%d %H:%M} {name} {money(value)} ({tally.requests} requests)"
            out.append(
                f'<rect x="{x + offset:.1f}" y="{10 + plot - h:.1f}" width="{bar:.1f}" '
                f'height="{h:.1f}" fill="{color}"><title>{escape(tip)}</title></rect>'
            )
        if i % label_every == 0:
            day = f"{start:{fmt}}"
            out.append(
                f'<text x="{x + bar:.1f}" y="{height - 10}" text-anchor="middle">{day}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def hbars_svg(items: Sequence[tuple[str, float]], color: str, label: Callable[[float], str]) -> str:
    """Horizontal bars, one per (name, value), longest first as given."""
    if not items:
        return '<p class="empty">none in this window</p>'
    width, row, left = 440, 22, 170
    peak = max(value for _, value in items) or 1.0
    out = [f'<svg viewBox="0 0 {width} {row * len(items) + 4}" width="100%" role="img">']
    for i, (name, value) in enumerate(items):
        y = i * row + 2
        w = (width - left - 80) * value / peak
        short = name if len(name) <= 26 else name[:25] + "…"
        out.append(
            f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(short)}</text>'
            f'<rect x="{left}" y="{y + 3}" width="{max(w, 1.0):.1f}" height="{row - 8}" '
            f'fill="{color}" rx="2"><title>{escape(name)}: {escape(label(value))}</title></rect>'
            f'<text x="{left + w + 6:.1f}" y="{y + 14}">{escape(label(value))}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _tally_section(title: str, name: str, rows: Sequence[tuple[str, Tally]]) -> str:
    by_cost = any(t.cost_usd for _, t in rows)
    bars = [(n, t.cost_usd if by_cost else float(t.requests)) for n, t in rows]
    chart = hbars_svg(bars, COST, money if by_cost else (lambda v: f"{v:,.0f} requests"))
    table = _table((name, *TALLY_HEADERS), [[n, *tally_cells(t)] for n, t in rows])
    return f"<section><h2>{escape(title)}</h2>{chart}{table}</section>"


def _count_section(title: str, name: str, rows: Sequence[tuple[str, int]], color: str) -> str:
    chart = hbars_svg([(n, float(v)) for n, v in rows], color, _count)
    table = _table((name, "count"), [[n, f"{v:,}"] for n, v in rows])
    return f"<section><h2>{escape(title)}</h2>{chart}{table}</section>"


def _guard_section(summary: Summary, top: int) -> str:
    hits = ranked(summary.guard_hits, top)
    chart = hbars_svg([(f"{r}: {a}", float(n)) for (_, r, a), n in hits], GUARD, _count)
    rows = [[d, r, a, f"{n:,}"] for (d, r, a), n in hits]
    table = _table(("where", "rule", "action", "hits"), rows)
    return f"<section><h2>Guardrail hits</h2>{chart}{table}</section>"


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
