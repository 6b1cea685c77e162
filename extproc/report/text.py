"""The report as plain-text tables for a terminal."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from extproc.report.summary import Summary, Tally, ranked

TALLY_HEADERS = ("requests", "input tok", "output tok", "cost", "saved")


def money(value: float) -> str:
    if value == 0:
        return "$0"
    return f"${value:,.4f}" if abs(value) < 1 else f"${value:,.2f}"


def tally_cells(tally: Tally) -> list[str]:
    return [
        f"{tally.requests:,}",
        f"{tally.input_tokens:,}",
        f"{tally.output_tokens:,}",
        money(tally.cost_usd),
        money(tally.saved_usd),
    ]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the rest right."""
    if not rows:
        return "  (none)"
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  " + "  ".join([first, *rest]).rstrip()

    rule = "  " + "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def window_title(summary: Summary) -> str:
    span = summary.until - summary.since
    fmt = "%Y-%m-%d %H:%M"
    scope = "".join(f", {kind}={value}" for kind, value in summary.only.items())
    window = f"{summary.since:{fmt}} to {summary.until:{fmt}} UTC"
    return f"{window} ({_span(span)}, by {summary.bucket}{scope})"


def _span(span: dt.timedelta) -> str:
    hours = span.total_seconds() / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} hours"


def headline(summary: Summary) -> list[tuple[str, str]]:
    """The totals shown at the top of both renderings."""
    total = summary.total
    ratio = summary.cache_hit_ratio
    rejected = sum(summary.rejections.values())
    return [
        ("requests", f"{total.requests:,}"),
        ("spend", money(total.cost_usd)),
        ("saved by the cache", money(total.saved_usd)),
        ("cache hit ratio", "-" if ratio is None else f"{ratio:.0%}"),
        ("tokens in / out", f"{total.input_tokens:,} / {total.output_tokens:,}"),
        ("rejected", f"{rejected:,}"),
    ]


def render(summary: Summary, scopes: Sequence[str], top: int) -> str:
    out = [f"extproc report: {window_title(summary)}", ""]
    out += [f"  {name:<20} {value}" for name, value in headline(summary)]
    out += _section(
        f"Spend by {summary.bucket}",
        ("start", *TALLY_HEADERS),
        [[f"{t:%Y-%m-%d %H:%M}", *tally_cells(v)] for t, v in summary.timeline() if v.requests],
    )
    for kind in scopes:
        rows = [[name, *tally_cells(t)] for name, t in summary.top(summary.by_scope[kind], top)]
        out += _section(f"Spend by {kind} (top {top})", (kind, *TALLY_HEADERS), rows)
    rows = [[name, *tally_cells(t)] for name, t in summary.top(summary.by_session, top)]
    out += _section(f"Top sessions by cost (top {top})", ("session", *TALLY_HEADERS), rows)
    rows = [[name, *tally_cells(t)] for name, t in summary.top(summary.by_model, top)]
    out += _section("Spend by model", ("model", *TALLY_HEADERS), rows)
    out += _section(
        "Cache", ("result", "requests"), [[k, f"{v:,}"] for k, v in ranked(summary.cache)]
    )
    out += _section(
        "Guardrail hits",
        ("where", "rule", "action", "hits"),
        [[d, r, a, f"{n:,}"] for (d, r, a), n in ranked(summary.guard_hits)],
    )
    out += _section(
        "Rejections by reason",
        ("reason", "requests"),
        [[k, f"{v:,}"] for k, v in ranked(summary.rejections)],
    )
    out += _section(
        "Outcomes",
        ("outcome", "requests"),
        [[k, f"{v:,}"] for k, v in ranked(summary.outcomes)],
    )
    return "\n".join(out) + "\n"


def _section(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["", title, table(headers, rows)]
