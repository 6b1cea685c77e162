"""The Postgres audit table: schema, daily partitions, retention, and the batch insert.

One row per request, partitioned by day on `time` (declarative range partitions named
`<table>_pYYYYMMDD`, created `partitions_ahead_days` ahead and on demand for the days a
batch touches); partitions older than `retention_days` are dropped whole, which is
cheap and leaves no bloat. The whole record is kept in `record` (jsonb); the columns a
report or a Grafana panel filters on are copied out of it by the INSERT itself, so the
Python side only sends one JSON array per batch. The primary key (request_id, time)
makes the insert idempotent: a spooled batch replayed twice stores each request once.
DDL runs under an advisory lock so replicas starting together do not race.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from psycopg import Connection, sql

# (column, type, expression over the record `r`): the columns copied out of the record.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("time", "timestamptz NOT NULL", "(r->>'time')::timestamptz"),
    ("request_id", "text NOT NULL", "r->>'request_id'"),
    ("route", "text", "r->>'route'"),
    ("api", "text", "r->>'api'"),
    ("endpoint", "text", "r->>'endpoint'"),
    ("outcome", "text", "r->>'outcome'"),
    ("status", "integer", "(r->>'status')::integer"),
    ("caller", "text", "r->>'caller'"),
    ("key_id", "text", "r->>'key_id'"),
    ("user_name", "text", "r->>'user'"),
    ("team", "text", "r->>'team'"),
    ("project", "text", "r->>'project'"),
    ("pipeline", "text", "r->'scopes'->>'pipeline'"),
    ("session_id", "text", "r->>'session_id'"),
    ("provider", "text", "r->>'provider'"),
    ("requested_model", "text", "r->>'requested_model'"),
    ("served_model", "text", "r->>'served_model'"),
    ("input_tokens", "bigint", "(r->>'input_tokens')::bigint"),
    ("output_tokens", "bigint", "(r->>'output_tokens')::bigint"),
    ("cache_read_input_tokens", "bigint", "(r->>'cache_read_input_tokens')::bigint"),
    ("cache_creation_input_tokens", "bigint", "(r->>'cache_creation_input_tokens')::bigint"),
    ("cost_usd", "numeric(20,9)", "(r->>'cost_usd')::numeric"),
    ("cost_saved_usd", "numeric(20,9)", "(r->>'cost_saved_usd')::numeric"),
    ("latency_ms", "double precision", "(r->>'latency_ms')::double precision"),
    ("cache", "text", "r->>'cache'"),
    ("record", "jsonb NOT NULL", "r"),
)

# Indexes on the parent table (Postgres creates them on every partition).
INDEXES: tuple[tuple[str, str], ...] = (
    ("time", "time"),
    ("key", "key_id, time"),
    ("user", "user_name, time"),
    ("team", "team, time"),
    ("project", "project, time"),
    ("pipeline", "pipeline, time"),
    ("session", "session_id, time"),
    ("outcome", "outcome, time"),
)


def _create_table(table: str) -> sql.Composed:
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(kind)) for name, kind, _ in COLUMNS
    )
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY (request_id, time)) "
        "PARTITION BY RANGE (time)"
    ).format(sql.Identifier(table), columns)


def _create_indexes(table: str) -> list[sql.Composed]:
    return [
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
            sql.Identifier(f"{table}_{name}_idx"),
            sql.Identifier(table),
            sql.SQL(columns),
        )
        for name, columns in INDEXES
    ]


def partition_name(table: str, day: dt.date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def _create_partition(table: str, day: dt.date) -> sql.Composed:
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})"
    ).format(
        sql.Identifier(partition_name(table, day)),
        sql.Identifier(table),
        sql.Literal(f"{day.isoformat()} 00:00:00+00"),
        sql.Literal(f"{(day + dt.timedelta(days=1)).isoformat()} 00:00:00+00"),
    )


def _locked(conn: Connection[Any], table: str) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"extproc-audit:{table}",))


def migrate(conn: Connection[Any], table: str, today: dt.date, ahead: int) -> None:
    """Create the table, its indexes and the partitions from `today` to `ahead` days on."""
    with conn.transaction():
        _locked(conn, table)
        conn.execute(_create_table(table))
        for statement in _create_indexes(table):
            conn.execute(statement)
        for offset in range(ahead + 1):
            conn.execute(_create_partition(table, today + dt.timedelta(days=offset)))


def ensure_partitions(conn: Connection[Any], table: str, days: Iterable[dt.date]) -> None:
    with conn.transaction():
        _locked(conn, table)
        for day in sorted(set(days)):
            conn.execute(_create_partition(table, day))


def partitions(conn: Connection[Any], table: str) -> list[tuple[str, dt.date]]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s",
        (table,),
    ).fetchall()
    prefix = f"{table}_p"
    found = []
    for (name,) in rows:
        suffix = str(name).removeprefix(prefix)
        if len(suffix) == 8 and suffix.isdigit():
            found.append((str(name), dt.datetime.strptime(suffix, "%Y%m%d").date()))
    return sorted(found, key=lambda item: item[1])


def drop_expired(conn: Connection[Any], table: str, today: dt.date, keep_days: int) -> list[str]:
    """Drop the day partitions older than `keep_days` (today counts as one); their names."""
    oldest_kept = today - dt.timedelta(days=keep_days - 1)
    dropped = []
    with conn.transaction():
        _locked(conn, table)
        for name, day in partitions(conn, table):
            if day < oldest_kept:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
                dropped.append(name)
    return dropped


def insert_statement(table: str) -> sql.Composed:
    """INSERT of a JSON array of records (one parameter), skipping rows already stored."""
    names = sql.SQL(", ").join(sql.Identifier(name) for name, _, _ in COLUMNS)
    values = sql.SQL(", ").join(sql.SQL(expr) for _, _, expr in COLUMNS)
    return sql.SQL(
        "INSERT INTO {} ({}) SELECT {} FROM jsonb_array_elements(%s::jsonb) AS t(r) "
        "ON CONFLICT DO NOTHING"
    ).format(sql.Identifier(table), names, values)


def record_day(line: bytes) -> dt.date | None:
    """The UTC day of an encoded record, read from its leading `time` field."""
    start = line.find(b'"time":"')
    if start < 0:
        return None
    try:
        stamp = dt.datetime.fromisoformat(line[start + 8 : start + 8 + 29].split(b'"')[0].decode())
    except ValueError:
        return None
    return stamp.astimezone(dt.UTC).date()
