"""The JSON-lines audit sink: one whole line per record, on disk as soon as it is written."""

from __future__ import annotations

from pathlib import Path

import orjson

from extproc.telemetry.audit import JsonLinesSink


class _Trickle:
    """A raw stream that takes at most 7 bytes per write, as a signal can make it."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> int:
        self.data += bytes(data[:7])
        return min(len(data), 7)

    def flush(self) -> None:
        return None


def test_each_record_is_in_the_file_before_write_returns(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.jsonl"
    sink = JsonLinesSink(str(path))
    sink.write({"request_id": "a", "status": 200})
    assert orjson.loads(path.read_bytes()) == {"request_id": "a", "status": 200}
    sink.write({"request_id": "b"})
    assert path.read_bytes().count(b"\n") == 2  # no close needed: nothing is held back
    sink.close()


def test_a_partial_write_is_finished(tmp_path: Path) -> None:
    sink = JsonLinesSink(str(tmp_path / "audit.jsonl"))
    sink.close()
    trickle = _Trickle()
    sink._stream = trickle  # type: ignore[assignment]
    sink.write({"request_id": "r" * 40})
    assert trickle.data == orjson.dumps({"request_id": "r" * 40}) + b"\n"
