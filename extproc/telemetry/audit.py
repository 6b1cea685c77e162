"""Audit records: one JSON line per request, written to stdout or a file, or rows in
PostgreSQL (`audit_store.PostgresSink`).

Records never hold credentials. Prompt and completion text appear only on routes
that record text (see `record.py`). Writes are small appends of one line each; a file
sink is opened unbuffered in append mode, so each record reaches the kernel in one
`write` as it is made and a crash loses at most the line being written (stdout is
flushed per record). Rotate a file sink with copy-and-truncate (logrotate's
`copytruncate`): the sink keeps its descriptor open in append mode.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import orjson

from extproc.credentials import Credential

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from extproc.config import AuditConfig
    from extproc.telemetry.audit_store import PostgresSettings


class AuditSink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullSink:
    def write(self, record: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class JsonLinesSink:
    """Appends one JSON object per line to a stream (stdout) or a file path."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._lock = threading.Lock()
        self._stream: IO[bytes] = self._open()

    def _open(self) -> IO[bytes]:
        if self._target == "stdout":
            return sys.stdout.buffer
        path = Path(self._target)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unbuffered: a flush per record would make the same one `write` per record,
        # after copying the line into a buffer first (about 1 µs a record).
        return path.open("ab", buffering=0)

    def write(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        with self._lock:
            written = self._stream.write(line)
            while written < len(line):  # an unbuffered file can take part (a signal)
                written += self._stream.write(line[written:])
            self._stream.flush()  # stdout's buffer; nothing to do for a file

    def close(self) -> None:
        if self._target != "stdout":
            with self._lock:
                self._stream.close()


def open_sink(
    config: AuditConfig,
    environ: Mapping[str, str] | None = None,
    registry: CollectorRegistry | None = None,
) -> AuditSink:
    """`stdout`, `none`, a file path, or a `postgresql://` URL (the durable store, which
    counts its records in `registry`)."""
    if config.postgres:
        from extproc.telemetry.audit_store import PostgresSink

        return PostgresSink(postgres_settings(config, environ), registry=registry)
    if config.sink == "none":
        return NullSink()
    return JsonLinesSink(config.sink)


def postgres_settings(
    config: AuditConfig, environ: Mapping[str, str] | None = None
) -> PostgresSettings:
    from extproc.telemetry.audit_store import PostgresSettings

    source = config.password
    return PostgresSettings(
        config.sink,
        password=Credential(source, environ).get() if source is not None else None,
        table=config.table,
        spool_dir=config.spool_dir,
        retention_days=config.retention_days,
        partitions_ahead_days=config.partitions_ahead_days,
        batch_size=config.batch_size,
        flush_seconds=config.flush_seconds,
        queue_max=config.queue_max,
        retry_seconds=config.retry_seconds,
    )
