"""Request and answer bodies are decoded in bounded steps (extproc.apis.encoding)."""

from __future__ import annotations

import gzip
import zlib

import pytest

from extproc.apis.encoding import StreamDecoder, decode_body, encodings
from extproc.errors import BadRequest, PayloadTooLarge, UnsupportedEncoding

BODY = b'{"model":"claude-sonnet-4-6","messages":[]}' * 100


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("label", "encoded"),
    [
        ("gzip", gzip.compress(BODY)),
        ("x-gzip", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),
        ("deflate", _raw_deflate(BODY)),
        ("gzip, gzip", gzip.compress(gzip.compress(BODY))),
        ("identity", BODY),
        ("GZIP", gzip.compress(BODY)),
    ],
)
def test_decodes_what_it_names(label: str, encoded: bytes) -> None:
    assert decode_body(encoded, label, 1 << 20) == BODY


def test_a_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (50 << 20))
    with pytest.raises(PayloadTooLarge, match=r"limits\.max_body_bytes"):
        decode_body(bomb, "gzip", 1 << 20)


@pytest.mark.parametrize("label", ["compress", "br, compress", "gzip, gzip, gzip"])
def test_unknown_or_deep_encodings_are_415(label: str) -> None:
    with pytest.raises(UnsupportedEncoding):
        decode_body(BODY, label, 1 << 20)


def test_a_plain_body_labelled_gzip_is_400() -> None:
    with pytest.raises(BadRequest, match="not valid gzip"):
        decode_body(BODY, "gzip", 1 << 20)


def test_a_stream_decodes_piece_by_piece() -> None:
    encoded = gzip.compress(BODY)
    decoder = StreamDecoder("gzip", 1 << 20)
    out = b"".join(decoder.feed(encoded[i : i + 7]) for i in range(0, len(encoded), 7))
    assert out + decoder.close() == BODY
    assert encodings("identity, gzip") == ["gzip"]
