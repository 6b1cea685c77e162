"""The Postgres audit sink's local spool: JSON lines waiting for the database.

Each process appends to its own file, `audit-<pid>-<token>-<n>.jsonl` in the spool directory,
and holds an exclusive `flock` on it while it is the current file, so several workers
(or a restarted gateway) can share one directory: a file is replayed only by a process
that can lock it, which is never one another live process is still appending to.
`rotate()` closes the current file so it can be replayed; a replayed file is deleted
once every record in it is in Postgres. Replaying twice is harmless: the insert
ignores a (request_id, time) already stored.

fsync policy: `append(..., sync=True)` (the sink's writer thread, one call per batch)
fsyncs the file; `sync=False` (the request path, only when the memory queue is full)
leaves the write in the OS page cache for the next synced append. A gateway crash
loses nothing that was appended; a machine crash can lose the appends since the last
fsync (at most one flush interval).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

log = logging.getLogger("extproc.audit")

PATTERN = "audit-*.jsonl"


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._seq = 0
        self._token = uuid.uuid4().hex[:8]
        self.appended = 0

    def append(self, lines: list[bytes], *, sync: bool) -> None:
        """Append encoded records (each ending in a newline)."""
        with self._lock:
            stream = self._file or self._open()
            stream.write(b"".join(lines))
            stream.flush()
            if sync:
                os.fsync(stream.fileno())
            self.appended += len(lines)

    def _open(self) -> IO[bytes]:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        # The pid and a token of this instance: a restarted container is pid 1 again, and
        # must not append to the file it is about to replay.
        self._path = self.directory / f"audit-{os.getpid()}-{self._token}-{self._seq}.jsonl"
        stream = self._path.open("ab")
        fcntl.flock(stream.fileno(), fcntl.LOCK_EX)
        self._file = stream
        return stream

    def rotate(self) -> None:
        """Close the current file (fsynced) so that it can be replayed."""
        with self._lock:
            if self._file is not None:
                os.fsync(self._file.fileno())
                self._file.close()  # releases the flock
                self._file = None
                self._path = None

    def pending(self) -> list[Path]:
        """Spool files other than the one being appended to, oldest first."""
        if not self.directory.is_dir():
            return []
        with self._lock:
            current = self._path
        files = [p for p in self.directory.glob(PATTERN) if p != current]
        return sorted(files, key=lambda p: p.stat().st_mtime if p.exists() else 0.0)

    def waiting(self) -> bool:
        """Whether any record waits in a spool file (this process's current one included)."""
        return self._file is not None or bool(self.pending())

    @contextlib.contextmanager
    def claim(self, path: Path, batch: int) -> Iterator[Iterator[list[bytes]] | None]:
        """The lines of a spool file nobody else holds, in batches read as they are
        consumed (None if someone holds it, or it is gone); the file is deleted if the
        block finishes without an exception."""
        try:
            stream = path.open("rb")
        except FileNotFoundError:
            yield None
            return
        with stream:
            try:
                fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            if not path.exists():  # replayed and deleted while we waited for the lock
                yield None
                return
            yield _batches(stream, batch)
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.rotate()


def _batches(stream: IO[bytes], size: int) -> Iterator[list[bytes]]:
    """Non-empty lines, `size` at a time: memory stays bounded whatever the file's size."""
    batch: list[bytes] = []
    for line in stream:
        if line.strip():
            batch.append(line.rstrip(b"\n"))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
