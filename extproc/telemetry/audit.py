"""Audit records: one JSON line per request, written to stdout or a file.

Records never hold credentials. Prompt and completion text appear only when
`audit.record_text` is true. Writes are small appends of one line each; a file
sink is opened in append mode and flushed per record so a crash loses at most
the line being written, and `reopen()` (on SIGHUP) supports log rotation.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import IO, Any, Protocol

import orjson


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
        return path.open("ab")

    def write(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        with self._lock:
            self._stream.write(line)
            self._stream.flush()

    def reopen(self) -> None:
        if self._target == "stdout":
            return
        with self._lock:
            self._stream.close()
            self._stream = self._open()

    def close(self) -> None:
        if self._target != "stdout":
            with self._lock:
                self._stream.close()


def open_sink(target: str) -> AuditSink:
    """`stdout`, `none`, or a file path."""
    if target == "none":
        return NullSink()
    return JsonLinesSink(target)
