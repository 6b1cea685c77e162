"""HPACK (RFC 7541) for the server: decode the peer's header blocks with the `hpack`
package (dynamic table, Huffman), encode our few response fields as literals.

Envoy's gRPC client sends nearly the same header block on every stream; after the
first, each field is a one-byte index into its dynamic table, except `:path` and a few
others that it sends as Huffman literals without indexing, the same bytes each time. A
block of indexed fields and unindexed literals does not change the table, so its
decoding is kept and reused until the next block that does (the `hpack` package is
pure Python: a full decode of Envoy's usual block costs more than the rest of a
stream's transport work).
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
        if _keeps_table(block):
            if len(self._indexed) >= _CACHE_LIMIT:
                self._indexed.clear()
            self._indexed[block] = headers
        else:
            self._indexed.clear()  # the dynamic table may have changed
        return headers


def _keeps_table(block: bytes) -> bool:
    """Whether decoding `block` (already decoded once, so well-formed) leaves the dynamic
    table as it was: only indexed fields (RFC 7541 6.1) and literals without or never
    indexing (6.2.2, 6.2.3). A literal with incremental indexing (6.2.1) or a table size
    update (6.3) changes it."""
    pos, end = 0, len(block)
    try:
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed: 1xxxxxxx
                pos = _skip_integer(block, pos, 0x7F)
            elif first & 0xE0:  # 01xxxxxx (indexing) or 001xxxxx (size update)
                return False
            else:  # 0000xxxx / 0001xxxx: a name index (0: a literal name), then the value
                named = first & 0x0F
                pos = _skip_integer(block, pos, 0x0F)
                if not named:
                    pos = _skip_string(block, pos)
                pos = _skip_string(block, pos)
    except IndexError:
        return False
    return pos == end


def _skip_integer(block: bytes, pos: int, mask: int) -> int:
    """The offset after the HPACK integer at `pos` (RFC 7541 5.1) with a `mask` prefix."""
    if block[pos] & mask != mask:
        return pos + 1
    pos += 1
    while block[pos] & 0x80:
        pos += 1
    return pos + 1


def _skip_string(block: bytes, pos: int) -> int:
    """The offset after the HPACK string literal at `pos` (RFC 7541 5.2)."""
    length, shift = block[pos] & 0x7F, 0
    pos += 1
    if length == 0x7F:
        while True:
            byte = block[pos]
            pos += 1
            length += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
    return pos + length


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
