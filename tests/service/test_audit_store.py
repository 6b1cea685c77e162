"""The PostgreSQL audit sink against a real PostgreSQL: batching, schema, partitions,
retention, the spool through an outage and a restart, and a never-blocking write()."""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from extproc.config import ConfigError, parse_config
from extproc.telemetry.audit import open_sink
from extproc.telemetry.audit_store import PostgresSettings, PostgresSink, encode
from tests.harness import free_port
from tests.postgres_server import PostgresServer, pg_url, postgres

__all__ = ["pg_url", "postgres"]


def record(n: int, when: dt.datetime | None = None, **extra: Any) -> dict[str, Any]:
    stamp = (when or dt.datetime.now(dt.UTC)).isoformat(timespec="milliseconds")
    return {
        "time": stamp,
        "request_id": f"req-{n}",
        "outcome": "ok",
        "status": 200,
        "user": "ana",
        "team": "search",
        "scopes": {"team": "search", "pipeline": "nightly"},
        "input_tokens": 10,
        "output_tokens": 5,
        "cost_usd": 0.25,
        **extra,
    }


def settings(url: str, spool: Path, **overrides: Any) -> PostgresSettings:
    values: dict[str, Any] = {"spool_dir": spool, "flush_seconds": 0.05, "retry_seconds": 0.2}
    return PostgresSettings(url, **{**values, **overrides})


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def count(url: str) -> int:
    """Rows in the audit table (-1 while it does not exist)."""
    try:
        return int(query(url, "SELECT count(*) FROM extproc_audit")[0][0])
    except psycopg.errors.UndefinedTable:
        return -1


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_records_arrive_in_batches_with_their_columns(pg_url: str, tmp_path: Path) -> None:
    sink = PostgresSink(settings(pg_url, tmp_path, batch_size=100))
    for n in range(250):
        sink.write(record(n, key_id="k1", session_id=f"s{n % 3}"))
    wait_for(lambda: sink.inserted == 250)
    sink.close()
    rows = query(
        pg_url,
        "SELECT count(*), count(DISTINCT request_id), sum(cost_usd), min(user_name), "
        "min(team), min(pipeline), min(key_id), count(DISTINCT session_id), "
        "min(record->>'outcome') FROM extproc_audit",
    )
    assert rows[0] == (250, 250, pytest.approx(62.5), "ana", "search", "nightly", "k1", 3, "ok")
    assert not list(tmp_path.glob("audit-*.jsonl"))


def test_schema_has_daily_partitions_ahead_and_indexes(pg_url: str, tmp_path: Path) -> None:
    sink = PostgresSink(settings(pg_url, tmp_path, partitions_ahead_days=2))
    # Created at start, before any record, in one transaction with its partitions.
    wait_for(lambda: bool(query(pg_url, "SELECT 1 FROM pg_class WHERE relname = 'extproc_audit'")))
    sink.close()
    today = dt.datetime.now(dt.UTC).date()
    expected = {f"extproc_audit_p{today + dt.timedelta(days=n):%Y%m%d}" for n in range(3)}
    parts = query(
        pg_url,
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'extproc_audit'",
    )
    assert expected <= {name for (name,) in parts}
    indexes = {n for (n,) in query(pg_url, "SELECT indexname FROM pg_indexes")}
    assert {"extproc_audit_time_idx", "extproc_audit_team_idx", "extproc_audit_pkey"} <= indexes


def test_retention_drops_old_day_partitions(pg_url: str, tmp_path: Path) -> None:
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    sink = PostgresSink(settings(pg_url, tmp_path))
    sink.write(record(1, when=old))  # an old spooled record gets its own partition
    sink.write(record(2))
    wait_for(lambda: sink.inserted == 2)
    sink.close()
    assert count(pg_url) == 2
    later = PostgresSink(settings(pg_url, tmp_path, retention_days=30))
    later.write(record(3))
    wait_for(lambda: later.inserted == 1)
    later.close()
    assert [r for (r,) in query(pg_url, "SELECT request_id FROM extproc_audit ORDER BY 1")] == [
        "req-2",
        "req-3",
    ]
    tables = {name for (name,) in query(pg_url, "SELECT relname FROM pg_class")}
    assert f"extproc_audit_p{old:%Y%m%d}" not in tables


def test_outage_spools_and_delivers_when_postgres_returns(
    postgres: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    sink = PostgresSink(settings(pg_url, tmp_path, batch_size=50), registry=registry)
    for n in range(100):
        sink.write(record(n))
    wait_for(lambda: sink.inserted == 100)
    postgres.crash()
    try:
        for n in range(100, 300):
            sink.write(record(n))
        wait_for(lambda: sink.spool.appended >= 200)
    finally:
        postgres.start()
    wait_for(lambda: count(pg_url) == 300)
    sink.close()
    assert query(pg_url, "SELECT count(DISTINCT request_id) FROM extproc_audit")[0][0] == 300
    counted = {
        result: registry.get_sample_value("extproc_audit_records_total", {"result": result})
        for result in ("stored", "spooled")
    }
    assert counted == {"stored": 300.0, "spooled": 200.0}
    assert not list(tmp_path.glob("audit-*.jsonl"))


def test_restart_replays_the_spool_once(pg_url: str, tmp_path: Path) -> None:
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    sink = PostgresSink(settings(down, tmp_path))
    for n in range(120):
        sink.write(record(n))
    sink.close()  # Postgres never answered: everything is on disk
    spooled = list(tmp_path.glob("audit-*.jsonl"))
    assert sum(len(p.read_bytes().splitlines()) for p in spooled) == 120
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in spooled:  # the same records again, as a crash mid-replay would leave them
        shutil.copy(path, copy / path.name.replace("audit-", "audit-9"))
    for path in copy.iterdir():
        path.rename(tmp_path / path.name)
    restarted = PostgresSink(settings(pg_url, tmp_path))
    wait_for(lambda: not list(tmp_path.glob("audit-*.jsonl")))
    restarted.close()
    assert count(pg_url) == 120


def test_write_never_waits_on_a_hung_postgres(
    postgres: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    sink = PostgresSink(settings(pg_url, tmp_path, queue_max=100, statement_timeout_ms=500))
    sink.write(record(0))
    wait_for(lambda: sink.inserted == 1)
    postgres.pause()
    try:
        started = time.perf_counter()
        for n in range(1, 1001):
            sink.write(record(n))
        elapsed = time.perf_counter() - started
        assert elapsed < 0.5, f"1000 writes took {elapsed:.3f}s"
        assert sink.overflowed >= 800  # the memory queue stayed bounded
    finally:
        postgres.resume()
    wait_for(lambda: count(pg_url) == 1001, timeout=30)
    sink.close()


def test_shutdown_during_a_hang_spools_the_batch_in_flight(
    postgres: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    sink = PostgresSink(settings(pg_url, tmp_path, batch_size=20, close_seconds=0.5))
    sink.write(record(0))
    wait_for(lambda: sink.inserted == 1)
    postgres.pause()
    try:
        for n in range(1, 101):
            sink.write(record(n))
        wait_for(lambda: sink.busy)  # the writer is stuck inside an INSERT
        sink.close()
        spooled = b"".join(p.read_bytes() for p in tmp_path.glob("audit-*.jsonl"))
        assert len(set(spooled.splitlines())) == 100  # the batch in flight and the queue
    finally:
        postgres.resume()
    restarted = PostgresSink(settings(pg_url, tmp_path))
    wait_for(lambda: count(pg_url) == 101)
    wait_for(lambda: not list(tmp_path.glob("audit-*.jsonl")))
    restarted.close()
    assert count(pg_url) == 101


def test_a_dropped_table_is_recreated_and_nothing_is_set_aside(pg_url: str, tmp_path: Path) -> None:
    sink = PostgresSink(settings(pg_url, tmp_path))
    sink.write(record(0))
    wait_for(lambda: sink.inserted == 1)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE extproc_audit")
    for n in range(1, 6):
        sink.write(record(n))
    wait_for(lambda: sink.spool.appended == 5)  # not a data error: spooled, retried
    wait_for(lambda: count(pg_url) == 5)
    sink.close()
    assert sink.rejected == 0
    assert not (tmp_path / "rejected.jsonl").exists()


def test_a_record_postgres_refuses_is_kept_aside(pg_url: str, tmp_path: Path) -> None:
    sink = PostgresSink(settings(pg_url, tmp_path))
    sink.write(record(1))
    sink.write(record(2, prompt={"messages": [{"content": "nul \x00 byte"}]}))
    sink.write(record(3))
    wait_for(lambda: sink.rejected == 1 and sink.inserted == 2)
    sink.close()
    assert count(pg_url) == 2
    assert b"req-2" in (tmp_path / "rejected.jsonl").read_bytes()


def test_config_opens_a_postgres_sink_with_its_password_from_env(
    pg_url: str, tmp_path: Path
) -> None:
    config = parse_config(
        {
            "audit": {
                "sink": pg_url,
                "password": {"env": "AUDIT_PG_PASSWORD"},
                "spool_dir": str(tmp_path),
                "table": "calls",
            }
        }
    )
    sink = open_sink(config.audit, {"AUDIT_PG_PASSWORD": "unused-with-trust"})
    assert isinstance(sink, PostgresSink)
    assert sink.settings.password == "unused-with-trust"
    sink.write(record(1))
    sink.close()
    assert query(pg_url, "SELECT count(*) FROM calls")[0][0] == 1


def test_report_reads_the_postgres_store_like_the_json_lines_file(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from extproc.cli import main
    from tests.unit.test_report import NOW, RECORDS

    sink = PostgresSink(settings(pg_url, tmp_path / "spool"))
    valid = [r for r in RECORDS if r["request_id"] != "bad"]
    for r in valid:
        sink.write(r)
    wait_for(lambda: sink.inserted == len(valid))
    sink.close()
    lines = tmp_path / "audit.jsonl"
    lines.write_bytes(b"".join(encode(r) for r in valid))
    window = ["--until", NOW.isoformat(), "--since", "7d"]
    assert main(["report", "--source", pg_url, *window]) == 0
    from_postgres = capsys.readouterr().out
    assert main(["report", "--source", str(lines), *window]) == 0
    assert from_postgres == capsys.readouterr().out
    assert "requests             7" in from_postgres


def test_an_unwritable_spool_stops_the_gateway_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"audit\.spool_dir"):
        PostgresSink(settings(f"postgresql://u@127.0.0.1:{free_port()}/x", blocker / "spool"))


def test_audit_migrate_prepares_the_table_ahead_of_the_gateway(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from extproc.cli import main

    config = tmp_path / "gateway.yaml"
    config.write_text(
        f"audit: {{sink: '{pg_url}', spool_dir: '{tmp_path}', partitions_ahead_days: 5}}\n"
    )
    assert main(["audit", "migrate", "--config", str(config)]) == 0
    assert "extproc_audit: 6 daily partitions" in capsys.readouterr().out
    assert count(pg_url) == 0
    config.write_text("audit: {sink: stdout}\n")
    assert main(["audit", "migrate", "--config", str(config)]) == 2
    assert "not a postgresql://" in capsys.readouterr().err
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    config.write_text(f"audit: {{sink: '{down}', spool_dir: '{tmp_path}'}}\n")
    assert main(["audit", "migrate", "--config", str(config)]) == 2
    assert "Connection refused" in capsys.readouterr().err
    assert main(["report", "--source", down]) == 2
    assert "Connection refused" in capsys.readouterr().err
