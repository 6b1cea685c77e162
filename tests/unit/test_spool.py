"""The audit spool: files held by a live writer are never replayed from under it."""

from __future__ import annotations

from pathlib import Path

import pytest

from extproc.telemetry.spool import Spool


def test_a_file_being_appended_is_not_claimed_until_rotated(tmp_path: Path) -> None:
    writer, replayer = Spool(tmp_path), Spool(tmp_path)
    writer.append([b'{"n":1}\n', b'{"n":2}\n'], sync=True)
    (held,) = replayer.pending()
    with replayer.claim(held, 10) as batches:
        assert batches is None  # locked by the writer (another process, in production)
    assert held.exists()
    writer.rotate()
    with replayer.claim(held, 1) as batches:
        assert list(batches or ()) == [[b'{"n":1}'], [b'{"n":2}']]
    assert not held.exists()  # delivered: deleted


def test_a_failed_replay_keeps_the_file(tmp_path: Path) -> None:
    writer = Spool(tmp_path)
    writer.append([b'{"n":1}\n'], sync=False)
    writer.rotate()
    (path,) = writer.pending()
    with pytest.raises(RuntimeError), writer.claim(path, 10):
        raise RuntimeError("Postgres went away")
    assert path.exists()


def test_a_restarted_process_with_the_same_pid_writes_a_new_file(tmp_path: Path) -> None:
    before = Spool(tmp_path)
    before.append([b'{"n":1}\n'], sync=True)
    before.close()
    after = Spool(tmp_path)  # same pid, as a container's pid 1 after a restart
    (left,) = after.pending()
    after.append([b'{"n":2}\n'], sync=True)
    assert left.read_bytes() == b'{"n":1}\n'
    assert after.waiting()
    assert len(list(tmp_path.glob("audit-*.jsonl"))) == 2
