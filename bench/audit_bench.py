"""What the audit sinks cost per request, on the request path and in total.

`sink.write(record)` runs in stream close, after the reply, on the event loop: that is
the hot-path cost (target: <= 0.1 ms CPU per request, issue 16). Cases, each over the
same realistic record (every field the gateway writes, with guard verdicts and scopes):

- `json lines file`: the JsonLinesSink (serialise + append + flush, on the caller);
- `postgres enqueue`: PostgresSink.write with Postgres up (a deque append);
- `postgres enqueue, Postgres down`: the same while the writer thread spools to disk;
- `postgres overflow to spool`: the queue is full, so write() appends to the spool file;
- `postgres total CPU / record`: the whole process's CPU (caller + writer thread:
  serialise, batch INSERT, partitions) divided by the records delivered;
- `driver: psycopg` / `driver: asyncpg`: client CPU per record of the batch insert alone,
  500 records per statement, to choose the driver (asyncpg only if installed).

Run: `python bench/audit_bench.py [--quick]` (starts a throwaway PostgreSQL on a free
loopback port); results go to bench/RESULTS.md (section "audit").
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from _common import ROOT, load_average, machine_facts, table, write_section

from extproc.telemetry import audit_schema
from extproc.telemetry.audit import JsonLinesSink
from extproc.telemetry.audit_store import PostgresSettings, PostgresSink, connect, encode
from tests.postgres_server import PostgresServer


def sample_record(n: int) -> dict[str, Any]:
    return {
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        "request_id": f"bench-{n}-{time.monotonic_ns()}",
        "route": "agent",
        "api": "anthropic",
        "endpoint": "messages",
        "path": "/v1/messages",
        "caller": "key:k-ana",
        "identity": "key",
        "key_id": "k-ana",
        "user": "ana",
        "team": "search",
        "project": "alpha",
        "tier": "standard",
        "session_id": "0b6c1b8e-6a47-4a7e-9a3c-5d1f0b7e2c11",
        "provider": "anthropic",
        "requested_model": "claude-opus-4-8",
        "served_model": "claude-opus-4-8",
        "status": 200,
        "streamed": True,
        "outcome": "ok",
        "input_tokens": 41_250,
        "output_tokens": 812,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 38_000,
        "latency_ms": 2412.5,
        "ttft_ms": 612.25,
        "scopes": {"key": "k-ana", "user": "ana", "team": "search", "pipeline": "nightly"},
        "cost_usd": 0.0923,
        "guard": {"profile": "default", "output": [],
                  "input": [{"rule": "email", "action": "redact", "count": 1}]},
        "cache": "miss",
        "cache_key": "c0ffee" * 10,
        "cache_scope": "team:search",
        "cache_stored": True,
    }  # fmt: skip


def per_call(write: Callable[[dict[str, Any]], None], n: int) -> tuple[float, float]:
    """(mean CPU ms, p99 wall ms) of `write` on this thread, records prepared beforehand."""
    records = [sample_record(i) for i in range(n)]
    walls = []
    cpu_start = time.thread_time()
    for record in records:
        started = time.perf_counter()
        write(record)
        walls.append(time.perf_counter() - started)
    cpu = (time.thread_time() - cpu_start) / n * 1000
    return cpu, statistics.quantiles(walls, n=100)[98] * 1000


def wait_delivered(sink: PostgresSink, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sink.inserted < count and time.monotonic() < deadline:
        time.sleep(0.01)


def run_cases(server: PostgresServer, n: int, work: Path) -> list[list[str]]:
    rows = []
    file_sink = JsonLinesSink(str(work / "audit.jsonl"))
    rows.append(["json lines file", *_fmt(per_call(file_sink.write, n))])
    file_sink.close()

    url = server.create_database()
    sink = PostgresSink(PostgresSettings(url, spool_dir=work / "spool-up"))
    sink.write(sample_record(-1))
    wait_delivered(sink, 1)  # schema and partitions exist before timing
    rows.append(["postgres enqueue", *_fmt(per_call(sink.write, n))])
    wait_delivered(sink, n + 1)
    cpu_start = time.process_time()
    per_call(sink.write, n)
    wait_delivered(sink, 2 * n + 1)
    total = (time.process_time() - cpu_start) / n * 1000
    rows.append(["postgres total CPU / record (caller + writer)", f"{total:.4f}", "-"])
    sink.close()

    server.crash()
    down = PostgresSink(PostgresSettings(url, spool_dir=work / "spool-down", retry_seconds=60))
    rows.append(["postgres enqueue, Postgres down (spooling)", *_fmt(per_call(down.write, n))])
    down.close()
    full = PostgresSink(
        PostgresSettings(url, spool_dir=work / "spool-full", queue_max=100, retry_seconds=60)
    )
    full.write(sample_record(-1))
    for i in range(200):
        full.write(sample_record(i))
    rows.append(["postgres overflow to spool (queue full)", *_fmt(per_call(full.write, n))])
    full.close()
    server.start()
    return rows + drivers(server, min(n, 5000))


def _fmt(result: tuple[float, float]) -> list[str]:
    return [f"{result[0]:.4f}", f"{result[1]:.4f}"]


def drivers(server: PostgresServer, n: int) -> list[list[str]]:
    """Client CPU per record of the batch INSERT itself, psycopg vs asyncpg."""
    url = server.create_database()
    settings = PostgresSettings(url)
    today = dt.datetime.now(dt.UTC).date()
    with connect(settings) as conn:
        audit_schema.migrate(conn, settings.table, today, 1)
    batches = [
        "[" + ",".join(encode(sample_record(i + b)).decode().strip() for i in range(500)) + "]"
        for b in range(0, n, 500)
    ]
    statement = audit_schema.insert_statement(settings.table)
    rows = []
    with connect(settings) as conn:
        start = time.thread_time()
        for payload in batches:
            conn.execute(statement, (payload,))
        rows.append(["driver: psycopg, 500 per INSERT", f"{_per(start, n):.4f}", "-"])
    try:
        import asyncpg  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        return rows
    sql_text = statement.as_string(None).replace("%s", "$1")
    batches = [
        "[" + ",".join(encode(sample_record(i + b)).decode().strip() for i in range(500)) + "]"
        for b in range(0, n, 500)
    ]

    async def insert_all() -> float:
        conn = await asyncpg.connect(url)
        start = time.thread_time()
        for payload in batches:
            await conn.execute(sql_text, payload)
        spent = _per(start, n)
        await conn.close()
        return spent

    rows.append(["driver: asyncpg, 500 per INSERT", f"{asyncio.run(insert_all()):.4f}", "-"])
    return rows


def _per(start: float, n: int) -> float:
    return (time.thread_time() - start) / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 2000 if args.quick else 20000
    with tempfile.TemporaryDirectory() as work, PostgresServer() as server:
        rows = run_cases(server, n, Path(work))
    facts = machine_facts({})
    text = "\n".join(
        [
            "## Audit sinks: cost per request (hot path and total)",
            "",
            f"Command: `python bench/audit_bench.py{' --quick' if args.quick else ''}`; "
            f"{n:,} records per case; {facts['CPU']}, {facts['cores (nproc)']} cores, Python "
            f"{facts['Python']}, commit {facts['extproc commit']}, load {load_average()}.",
            "CPU is this thread's CPU time per `write()` (the request path, in stream close);"
            " the total row is the process's CPU (caller and writer thread) per record"
            " delivered to PostgreSQL.",
            "",
            table(["case", "CPU ms / record", "p99 wall ms / call"], rows),
        ]
    )
    print(text)
    write_section(ROOT / "bench" / "RESULTS.md", "audit", text, "Benchmark results")
    print(orjson.dumps({"cases": len(rows)}).decode())


if __name__ == "__main__":
    main()
