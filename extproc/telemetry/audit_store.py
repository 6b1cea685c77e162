"""The durable audit sink: PostgreSQL, batched, with a local spool for outages.

`write()` runs on the request path (stream close, after the reply): it appends the
record to a bounded in-memory queue and returns; nothing there waits on the network.
One writer thread takes batches off the queue (`batch_size` records or every
`flush_seconds`) and inserts each as one statement. When Postgres is down, slow
(statement timeout) or refuses the batch's connection, the batch goes to the spool
(JSON lines, fsynced) and the thread retries every `retry_seconds`; once an insert
succeeds again the spool is replayed. A full queue (Postgres slow for long) sends the
overflowing record to the spool from the request path: a buffered file append, still
no network. On start every spool file left by an earlier run is replayed, and on
shutdown the queue is flushed to Postgres or, failing that, to the spool, so a
Postgres outage or a gateway restart loses nothing; the insert is idempotent, so a
replay never duplicates.

The thread uses psycopg 3 (synchronous, its own connection): the insert work never
runs on the gRPC event loop, and shutdown can drain the queue from a plain `close()`.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psycopg
from prometheus_client import CollectorRegistry, Counter

from extproc.telemetry import audit_schema as schema
from extproc.telemetry.spool import Spool

log = logging.getLogger("extproc.audit")

_MAINTAIN_SECONDS = 3600.0


def encode(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


class PostgresSettings:
    """What the sink needs from `audit:` (kept apart from the pydantic model for tests)."""

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        table: str = "extproc_audit",
        spool_dir: Path = Path("audit-spool"),
        retention_days: int = 90,
        partitions_ahead_days: int = 3,
        batch_size: int = 500,
        flush_seconds: float = 1.0,
        queue_max: int = 20_000,
        retry_seconds: float = 5.0,
        statement_timeout_ms: int = 5000,
        close_seconds: float = 10.0,
    ) -> None:
        self.url = url
        self.password = password
        self.table = table
        self.spool_dir = spool_dir
        self.retention_days = retention_days
        self.partitions_ahead_days = partitions_ahead_days
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.queue_max = queue_max
        self.retry_seconds = retry_seconds
        self.statement_timeout_ms = statement_timeout_ms
        # How long close() waits for the writer before spooling what it holds.
        self.close_seconds = close_seconds


def connect(settings: PostgresSettings, autocommit: bool = True) -> psycopg.Connection[Any]:
    extra: dict[str, Any] = {} if settings.password is None else {"password": settings.password}
    return psycopg.connect(
        settings.url,
        autocommit=autocommit,
        connect_timeout=3,
        options=f"-c statement_timeout={settings.statement_timeout_ms}",
        application_name="extproc-audit",
        **extra,
    )


class _Undelivered(Exception):
    """A spooled batch could not be delivered: keep its file."""


class PostgresSink:
    def __init__(
        self,
        settings: PostgresSettings,
        wall_clock: Callable[[], float] = time.time,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self._records = _records_counter(registry)
        self._wall_clock = wall_clock
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.spool = Spool(settings.spool_dir)
        self._conn: psycopg.Connection[Any] | None = None
        self._days: set[dt.date] = set()
        self._retry_at = 0.0
        self._inflight: list[bytes] = []
        self._maintained_at = -_MAINTAIN_SECONDS
        self.inserted = 0
        self.overflowed = 0
        self.rejected = 0
        self.lost = 0
        _check_writable(settings.spool_dir)
        self._thread = threading.Thread(target=self._run, name="audit-postgres", daemon=True)
        self._thread.start()

    # -- request path -------------------------------------------------------------------

    def write(self, record: dict[str, Any]) -> None:
        queue = self._queue
        if len(queue) >= self.settings.queue_max:
            self.overflowed += 1
            self._spool([encode(record)], sync=False)
            return
        queue.append(record)
        if len(queue) == self.settings.batch_size:
            self._wake.set()

    @property
    def busy(self) -> bool:
        """Whether the writer is delivering a batch right now."""
        return bool(self._inflight)

    def close(self) -> None:
        """Flush the queue (to Postgres, else the spool) and stop the writer thread."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(self.settings.close_seconds)
        leftover = [encode(r) for r in self._take(len(self._queue))]
        if self._thread.is_alive():  # stuck on a hung Postgres: its batch may never land
            leftover = self._inflight + leftover  # a replay that repeats it stores it once
        if leftover:
            self._spool(leftover, sync=True)
        self.spool.close()
        if self._conn is not None and not self._thread.is_alive():
            self._conn.close()

    def _count(self, result: str, n: int) -> None:
        if self._records is not None:
            self._records.labels(result).inc(n)

    def _spool(self, lines: list[bytes], *, sync: bool) -> None:
        try:
            self.spool.append(lines, sync=sync)
            self._count("spooled", len(lines))
        except OSError as exc:  # a full or read-only disk: nothing left to keep them in
            self.lost += len(lines)
            self._count("lost", len(lines))
            log.error("audit: %d records lost: cannot write the spool (%s)", len(lines), exc)

    # -- writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        self._safely(self._prepare)  # schema and partitions before the first record
        self._safely(self._replay)  # what an earlier run left behind
        while True:
            stopping = self._stopping.is_set()
            batch = self._take(self.settings.batch_size)
            if batch:
                self._deliver([encode(r) for r in batch])
            elif stopping:
                return
            if not stopping:
                self._safely(self._idle)

    def _prepare(self) -> None:
        try:
            self._connection()
        except psycopg.Error as exc:
            self._failed(exc)

    def _safely(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:  # never let the writer die: every record would only spool
            log.exception("audit: writer error; retrying in %.0fs", self.settings.retry_seconds)
            self._retry_at = time.monotonic() + self.settings.retry_seconds

    def _idle(self) -> None:
        if len(self._queue) < self.settings.batch_size:
            self._wake.wait(self.settings.flush_seconds)
            self._wake.clear()
        due = self._healthy() or time.monotonic() >= self._retry_at
        if due and self.spool.waiting():
            self._replay()

    def _take(self, limit: int) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        queue = self._queue
        while queue and len(batch) < limit:
            batch.append(queue.popleft())
        return batch

    def _healthy(self) -> bool:
        return self._retry_at == 0.0

    def _deliver(self, lines: list[bytes]) -> None:
        """Insert a batch, or spool it when Postgres cannot take it now."""
        if not self._healthy() and time.monotonic() < self._retry_at:
            self._spool(lines, sync=True)
            return
        self._inflight = lines
        try:
            delivered = self._insert(lines)
        except Exception:
            log.exception("audit: writer error; spooling the batch")
            delivered = False
        self._inflight = []
        if not delivered:
            self._spool(lines, sync=True)

    def _replay(self) -> None:
        """Deliver every spool file no other process holds; stop at the first failure."""
        self.spool.rotate()
        for path in self.spool.pending():
            if not self._replay_file(path):
                return

    def _replay_file(self, path: Path) -> bool:
        delivered = 0
        try:
            with self.spool.claim(path, self.settings.batch_size) as batches:
                for lines in batches or ():  # the file is deleted unless an exception leaves
                    if not self._insert(lines):
                        raise _Undelivered
                    delivered += len(lines)
        except _Undelivered:
            return False
        if delivered:
            log.info("audit: delivered %d spooled records from %s", delivered, path.name)
        return True

    def _insert(self, lines: list[bytes]) -> bool:
        """True when Postgres stored (or already had) every record of the batch."""
        try:
            self._store(lines)
        except psycopg.Error as exc:
            self._failed(exc)
            return False
        if not self._healthy():
            log.warning("audit: Postgres is back; delivering spooled records")
        self._retry_at = 0.0
        return True

    def _store(self, lines: list[bytes]) -> None:
        conn = self._connection()
        self._ensure_days(conn, lines)
        try:
            self._execute(conn, lines)
        except psycopg.errors.DataError as exc:  # a record it refuses (a NUL, a torn line)
            log.warning("audit: Postgres refused a batch (%s); inserting one by one", exc)
            for line in lines:
                self._store_one(conn, line)

    def _execute(self, conn: psycopg.Connection[Any], lines: list[bytes]) -> None:
        payload = b"[" + b",".join(line.rstrip(b"\n") for line in lines) + b"]"
        conn.execute(schema.insert_statement(self.settings.table), (payload.decode(),))
        self.inserted += len(lines)
        self._count("stored", len(lines))

    def _store_one(self, conn: psycopg.Connection[Any], line: bytes) -> None:
        try:
            self._execute(conn, [line])
        except psycopg.errors.DataError as exc:  # anything else: spool the batch and retry
            self.rejected += 1
            self._count("rejected", 1)
            rejected = self.settings.spool_dir / "rejected.jsonl"
            with rejected.open("ab") as stream:
                stream.write(line if line.endswith(b"\n") else line + b"\n")
            log.error("audit: Postgres refused a record (%s); kept in %s", exc, rejected)

    def _failed(self, exc: Exception) -> None:
        if self._healthy():
            log.warning(
                "audit: Postgres unavailable (%s); spooling to %s", exc, self.spool.directory
            )
        self._retry_at = time.monotonic() + self.settings.retry_seconds
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.settings)
            self._days = set()
            self._maintained_at = -_MAINTAIN_SECONDS
        if time.monotonic() - self._maintained_at >= _MAINTAIN_SECONDS:
            self._maintain(self._conn)
        return self._conn

    def _maintain(self, conn: psycopg.Connection[Any]) -> None:
        """Schema, partitions ahead, retention: at connect and then hourly."""
        today = dt.datetime.fromtimestamp(self._wall_clock(), dt.UTC).date()
        settings = self.settings
        try:
            schema.migrate(conn, settings.table, today, settings.partitions_ahead_days)
            dropped = schema.drop_expired(conn, settings.table, today, settings.retention_days)
        except (psycopg.OperationalError, psycopg.InterfaceError):
            raise
        except psycopg.Error as exc:  # e.g. no DDL privilege: `extproc audit migrate` did it
            log.warning("audit: could not maintain %s (%s)", settings.table, exc)
            dropped = []
        if dropped:
            log.info("audit: retention dropped partitions %s", ", ".join(dropped))
        self._days.update(
            today + dt.timedelta(days=n) for n in range(settings.partitions_ahead_days)
        )
        self._maintained_at = time.monotonic()

    def _ensure_days(self, conn: psycopg.Connection[Any], lines: list[bytes]) -> None:
        days = {day for line in lines if (day := schema.record_day(line)) is not None}
        missing = days - self._days
        if missing:
            schema.ensure_partitions(conn, self.settings.table, missing)
            self._days |= missing


def _check_writable(directory: Path) -> None:
    """Refuse to start with a spool that could not take records during an outage."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{threading.get_native_id()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        from extproc.config import ConfigError

        problem = f"audit.spool_dir: {exc}; point it at a writable, persistent directory"
        raise ConfigError(str(directory), [problem]) from exc


def _records_counter(registry: CollectorRegistry | None) -> Counter | None:
    """`extproc_audit_records_total{result}`: stored (delivered to Postgres, replays
    included), spooled, rejected (refused by Postgres, kept aside), lost (spool unwritable)."""
    if registry is None:
        return None
    return Counter(
        "extproc_audit_records",
        "Audit records by what the Postgres sink did with them.",
        ["result"],
        registry=registry,
    )
