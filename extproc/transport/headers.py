"""HPACK (RFC 7541) for the server: decode the peer's header blocks with the `hpack`
package (dynamic table, Huffman), encode our few response fields as literals.

Envoy's gRPC client sends nearly the same header block on every stream; after the
first, each field is a one-byte index into its dynamic table. A block made only of
indexed fields does not change the table, so its decoding is kept and reused until
the next block that does.
"""

from __future__ import annotations

import hpack

from extproc.transport.frames import ConnectionFault, ErrorCode

Headers = list[tuple[str, str]]
_CACHE_LIMIT = 64


class HeaderDecoder:
    """One connection's HPACK decoder (its dynamic table), with the indexed-block cache."""

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._indexed: dict[bytes, Headers] = {}

    def decode(self, block: bytes) -> Headers:
        cached = self._indexed.get(block)
        if cached is not None:
            return cached
        try:
            headers: Headers = self._decoder.decode(block)  # type: ignore[assignment]
        except (hpack.HPACKError, UnicodeDecodeError) as exc:
            raise ConnectionFault(ErrorCode.COMPRESSION_ERROR, f"header block: {exc}") from exc
        if _only_indexed(block):
            if len(self._indexed) >= _CACHE_LIMIT:
                self._indexed.clear()
            self._indexed[block] = headers
        else:
            self._indexed.clear()  # the dynamic table may have changed
        return headers


def _only_indexed(block: bytes) -> bool:
    """Whether `block` is only one-byte indexed fields (RFC 7541 6.1: top bit set, index
    below 127), which read the dynamic table but never change it."""
    return bool(block) and min(block) >= 0x80 and 0xFF not in block


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with `first`'s high bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: str, value: str) -> bytes:
    """A literal field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    raw_name, raw_value = name.encode("ascii"), value.encode("utf-8")
    return (
        b"\x00"
        + _integer(len(raw_name), 7, 0)
        + raw_name
        + _integer(len(raw_value), 7, 0)
        + raw_value
    )


STATUS_200 = b"\x88"  # static table index 8: ":status: 200"


def status(code: int) -> bytes:
    """`:status` as a literal with the static table's name (index 8)."""
    return b"\x08" + _integer(len(str(code)), 7, 0) + str(code).encode("ascii")
