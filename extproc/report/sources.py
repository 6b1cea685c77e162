"""Where `extproc report` reads audit records: JSON-lines files or the Postgres table."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

log = logging.getLogger("extproc.report")


class SourceError(Exception):
    """The audit store cannot be read (unreachable database, missing table)."""


def is_postgres(source: str) -> bool:
    return urlsplit(source).scheme in ("postgresql", "postgres")


def read_records(
    source: str,
    since: dt.datetime,
    until: dt.datetime,
    *,
    password: str | None = None,
    table: str = "extproc_audit",
) -> Iterator[dict[str, Any]]:
    if is_postgres(source):
        yield from _postgres(source, since, until, password, table)
    else:
        yield from _json_lines(Path(source))


def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """Every record of a JSON-lines file; lines that are not a JSON object are skipped."""
    skipped = 0
    with path.open("rb") as stream:
        for line in stream:
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                skipped += 1
                continue
            if isinstance(record, dict):
                yield record
    if skipped:
        log.warning("%s: skipped %d lines that are not JSON", path, skipped)


def _postgres(
    url: str, since: dt.datetime, until: dt.datetime, password: str | None, table: str
) -> Iterator[dict[str, Any]]:
    """The window's records, streamed through a server-side cursor (partition pruning on
    `time` keeps it to the days asked for)."""
    import psycopg
    from psycopg import sql

    extra: dict[str, Any] = {} if password is None else {"password": password}
    query = sql.SQL("SELECT record FROM {} WHERE time >= %s AND time < %s").format(
        sql.Identifier(table)
    )
    try:
        with (
            psycopg.connect(url, connect_timeout=10, **extra) as conn,
            conn.cursor(name="extproc_report") as cursor,
        ):
            cursor.itersize = 5000
            cursor.execute(query, (since, until))
            yield from (record for (record,) in cursor)
    except psycopg.Error as exc:  # the message names host and database, never a password
        raise SourceError(f"PostgreSQL {table}: {exc}".strip()) from exc
