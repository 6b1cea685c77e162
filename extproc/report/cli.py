"""`extproc report` and `extproc audit migrate`.

extproc report [--config FILE] [--source PATH|URL]... [--since 7d] [--until ISO]
               [--bucket day|hour] [--by team,user] [--top N] [--html FILE]
extproc audit migrate --config FILE      create the Postgres table, partitions; apply retention
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from extproc.admin_cli import AdminError, parse_duration
from extproc.config import Config
from extproc.credentials import Credential
from extproc.report import html, text
from extproc.report.sources import SourceError, is_postgres, read_records
from extproc.report.summary import SCOPES, summarize


def add_parsers(commands: Any) -> None:
    report = commands.add_parser(
        "report", help="spend, savings and rejections from the audit store"
    )
    report.add_argument("--config", help="gateway config: its audit sink is the default source")
    report.add_argument(
        "--source",
        action="append",
        help="a JSON-lines audit file or a postgresql:// URL (repeatable)",
    )
    report.add_argument(
        "--since", default="7d", help="start: a duration back from now (24h, 7d) or an ISO time"
    )
    report.add_argument("--until", help="end: an ISO time (default: now)")
    report.add_argument(
        "--bucket", choices=("day", "hour"), help="time buckets (default: by window)"
    )
    report.add_argument(
        "--by", default=",".join(SCOPES), help=f"scopes to break spend down by ({','.join(SCOPES)})"
    )
    report.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="KIND=ID",
        help="only this scope's requests, e.g. team=search (repeatable: all must match)",
    )
    report.add_argument("--top", type=int, default=10, help="rows per ranking")
    report.add_argument("--html", help="also write a self-contained HTML page with charts here")
    audit = commands.add_parser("audit", help="manage the PostgreSQL audit store")
    actions = audit.add_subparsers(dest="action", required=True)
    migrate = actions.add_parser(
        "migrate", help="create the table, indexes and partitions; drop expired ones"
    )
    migrate.add_argument("--config", required=True, help="gateway config with audit.sink")


def window(args: argparse.Namespace, now: float) -> tuple[dt.datetime, dt.datetime]:
    until = _moment(args.until, "--until") if args.until else dt.datetime.fromtimestamp(now, dt.UTC)
    try:
        since = dt.datetime.fromtimestamp(until.timestamp() - parse_duration(args.since), dt.UTC)
    except AdminError:
        since = _moment(args.since, "--since")
    if since >= until:
        raise AdminError(f"--since {args.since!r} is not before --until")
    return since, until


def _moment(value: str, flag: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise AdminError(f"{flag} {value!r}: use a duration (7d, 24h) or an ISO time") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _only(pairs: list[str]) -> dict[str, str]:
    only = {}
    for pair in pairs:
        kind, sep, value = pair.partition("=")
        if not sep or kind not in SCOPES or not value:
            raise AdminError(f"--scope {pair!r}: use KIND=ID with KIND one of {', '.join(SCOPES)}")
        only[kind] = value
    return only


def _sources(args: argparse.Namespace, config: Config) -> list[str]:
    if args.source:
        return list(args.source)
    sink = config.audit.sink
    if sink in ("stdout", "none"):
        raise AdminError(
            f"the config's audit.sink is {sink!r}: pass --source FILE or --source postgresql://..."
        )
    return [sink]


def _records(
    sources: list[str], config: Config, since: dt.datetime, until: dt.datetime
) -> Iterator[dict[str, Any]]:
    source = config.audit.password
    for location in sources:
        password = None
        if is_postgres(location) and source is not None:
            password = Credential(source).get()
        yield from read_records(location, since, until, password=password, table=config.audit.table)


def run_report(args: argparse.Namespace, config: Config) -> int:
    try:
        since, until = window(args, time.time())
        scopes = [s.strip() for s in args.by.split(",") if s.strip()]
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown or args.top < 1:
            raise AdminError(f"--by takes {', '.join(SCOPES)}; --top at least 1")
        bucket = args.bucket or ("hour" if until - since <= dt.timedelta(hours=48) else "day")
        records = _records(_sources(args, config), config, since, until)
        summary = summarize(records, since, until, bucket, _only(args.scope))
        if args.html:
            Path(args.html).write_text(html.render(summary, scopes, args.top), encoding="utf-8")
    except (AdminError, SourceError, OSError) as exc:
        print(f"extproc report: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text.render(summary, scopes, args.top))
    if args.html:
        print(f"\nwrote {args.html}")
    return 0


def run_audit(args: argparse.Namespace, config: Config) -> int:
    from extproc.telemetry import audit_schema
    from extproc.telemetry.audit import postgres_settings
    from extproc.telemetry.audit_store import connect

    if not config.audit.postgres:
        print(
            "extproc audit migrate: the config's audit.sink is not a postgresql:// URL",
            file=sys.stderr,
        )
        return 2
    import psycopg

    settings = postgres_settings(config.audit)
    today = dt.datetime.now(dt.UTC).date()
    try:
        with connect(settings) as conn:
            audit_schema.migrate(conn, settings.table, today, settings.partitions_ahead_days)
            dropped = audit_schema.drop_expired(
                conn, settings.table, today, settings.retention_days
            )
            kept = audit_schema.partitions(conn, settings.table)
    except psycopg.Error as exc:
        print(f"extproc audit migrate: {exc}".strip(), file=sys.stderr)
        return 2
    print(f"{settings.table}: {len(kept)} daily partitions ({kept[0][1]} to {kept[-1][1]})")
    for name in dropped:
        print(f"dropped {name} (older than {settings.retention_days} days)")
    return 0
