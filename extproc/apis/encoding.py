"""Content-Encoding: the gateway only ever applies policy to plain bytes.

Requests: gzip and deflate bodies are decoded here (stdlib zlib, in bounded steps, so
the decoded size is checked against `limits.max_body_bytes` before it is held: a
compression bomb is a 413, never memory); the shipped Envoy configs decode brotli and
zstd before the body reaches the gateway and drop the label. Any other label still
present is refused with 415 naming it, rather than being misread as JSON.

Answers: the gateway asks every provider for `accept-encoding: identity`. A provider
(or a proxy) that compresses anyway is decoded here for gzip and deflate, and by
Envoy's decompressor filters for brotli and zstd, before any answer-side policy reads
it; the client receives the decoded answer without the label.
"""

from __future__ import annotations

import zlib
from typing import Final

from extproc.errors import BadRequest, PayloadTooLarge, UnsupportedEncoding

__all__ = ["StreamDecoder", "check_request_encoding", "decode_body", "encodings", "is_decodable"]

# zlib window bits: 16+ reads a gzip wrapper, 15 a zlib (RFC 1950) wrapper, -15 raw deflate.
_WBITS: Final = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}
_PLAIN: Final = frozenset({"", "identity"})
_STEP: Final = 64 * 1024  # decoded bytes produced per step: memory stays bounded
_MAX_LAYERS: Final = 2


def encodings(header: str) -> list[str]:
    """The codings of a Content-Encoding header in the order they were applied."""
    return [c.strip().lower() for c in header.split(",") if c.strip().lower() not in _PLAIN]


def is_decodable(header: str) -> bool:
    codings = encodings(header)
    return len(codings) <= _MAX_LAYERS and all(c in _WBITS for c in codings)


def check_request_encoding(header: str) -> None:
    """Refuse (415) a request body the gateway cannot decode, before reading it."""
    codings = encodings(header)
    unknown = [c for c in codings if c not in _WBITS]
    if unknown:
        raise UnsupportedEncoding(
            f"request Content-Encoding {unknown[0]!r} is not supported; send the body "
            "uncompressed or as gzip, deflate, br or zstd"
        )
    if len(codings) > _MAX_LAYERS:
        raise UnsupportedEncoding(f"request Content-Encoding {header!r} has too many layers")


def decode_body(body: bytes, header: str, limit: int) -> bytes:
    """The decoded request body; 413 past `limit` decoded bytes, 400 when corrupt."""
    check_request_encoding(header)
    for coding in reversed(encodings(header)):
        decoder = StreamDecoder(coding, limit)
        body = decoder.feed(body) + decoder.close()
    return body


class StreamDecoder:
    """Decodes one gzip or deflate stream fed in pieces, refusing to grow past `limit`."""

    def __init__(self, coding: str, limit: int) -> None:
        self.coding = coding
        self.limit = limit
        self.size = 0
        self._raw = False
        self._pending = b""
        self._inflate = zlib.decompressobj(_WBITS[coding])

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        try:
            piece = self._inflate.decompress(data, _STEP)
            while True:
                self._grow(len(piece))
                out.append(piece)
                tail = self._inflate.unconsumed_tail
                if not tail and len(piece) < _STEP:
                    break
                piece = self._inflate.decompress(tail, _STEP)
        except zlib.error as exc:
            if self.coding == "deflate" and not self._raw and self.size == 0:
                # Some senders label raw deflate (no zlib header) as deflate.
                self._raw = True
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.feed(data)
            raise BadRequest(
                f"the body is not valid {self.coding} data: {exc}", reason="bad_encoding"
            ) from exc
        return b"".join(out)

    def close(self) -> bytes:
        tail = self._inflate.flush()
        self._grow(len(tail))
        return tail

    def _grow(self, count: int) -> None:
        self.size += count
        if self.size > self.limit:
            raise PayloadTooLarge(
                f"the {self.coding}-encoded body decodes to more than {self.limit} bytes "
                "(limits.max_body_bytes)"
            )
