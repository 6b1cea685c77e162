"""The HPACK block cache (extproc.transport.headers): which blocks may be reused, checked
against the `hpack` decoder's own dynamic table, and Envoy's recorded blocks."""

from __future__ import annotations

from typing import Any

import hpack
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.transport.headers import HeaderDecoder, _keeps_table

# Two streams' HEADERS blocks as Envoy 1.40's gRPC client sent them on one connection
# (recorded from the e2e stack): the first indexes its fields; the next are indexed fields
# and `:path` as a Huffman literal without indexing.
ENVOY_FIRST = bytes.fromhex(
    "8304a560b5773fa5d05b3b98855cbe5315761c8bf7657c1e525b2a1d1aec390a841ec635d87215084185"
    "2f94d761c98640027465864d833505b11f5f8b1d75d0620d263d4c4d6564408cf2b16aee7f4b1aa496ca"
    "8747834d9697408bf2b4a7b3c0ec90b22d29ec870be25c0b89717f"
)
ENVOY_NEXT = bytes.fromhex(
    "8304a560b5773fa5d05b3b98855cbe5315761c8bf7657c1e525b2a1d1aec390a841ec635d8721508c286c1c0bfbe"
)

# One header field representation (RFC 7541 6): ("indexed", static index), or a literal
# (its first byte's pattern, static name index or 0 for a literal name, value, Huffman).
_LITERALS = {"none": (0x00, 4), "never": (0x10, 4), "incremental": (0x40, 6)}
indexed = st.tuples(st.just("indexed"), st.integers(1, 61))
literal = st.tuples(
    st.sampled_from(sorted(_LITERALS)),
    st.integers(0, 61),
    st.text("abcxyz/-:", max_size=300),
    st.booleans(),
)
size_update = st.integers(0, 8192)


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    out = hpack.hpack.encode_integer(value, prefix_bits)
    out[0] |= first
    return bytes(out)


def _string(text: str, huffman: bool) -> bytes:
    raw = text.encode()
    if huffman:
        raw = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(raw)
    return _integer(len(raw), 7, 0x80 if huffman else 0) + raw


def _field(field: tuple[Any, ...]) -> bytes:
    if field[0] == "indexed":
        return _integer(field[1], 7, 0x80)
    kind, index, value, huffman = field
    first, prefix_bits = _LITERALS[kind]
    name = b"" if index else _string("x-name", huffman)
    return _integer(index, prefix_bits, first) + name + _string(value, huffman)


def _table(decoder: hpack.Decoder) -> tuple[object, ...]:
    table = decoder.header_table
    return (tuple(table.dynamic_entries), table.maxsize)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.none() | size_update, st.lists(indexed | literal, min_size=1, max_size=6)),
        min_size=1,
        max_size=5,
    )
)
def test_reused_blocks_are_exactly_those_that_leave_the_table_alone(
    blocks: list[tuple[int | None, list[tuple[Any, ...]]]],
) -> None:
    reference, cached = hpack.Decoder(), HeaderDecoder(64 * 1024)
    reference.max_allowed_table_size = cached._decoder.max_allowed_table_size = 8192
    for size, block in blocks + blocks:  # the second pass repeats blocks: cache hits
        data = b"".join(_field(field) for field in block)
        if size is not None:
            data = _integer(size, 5, 0x20) + data
        before = _table(reference)
        expected = [(str(name), str(value)) for name, value in reference.decode(data)]
        keeps = _keeps_table(data)
        if keeps:
            assert _table(reference) == before
        if size is None and all(field[0] != "incremental" for field in block):
            assert keeps
        assert cached.decode(data) == expected


def test_envoys_repeated_block_is_served_from_the_cache() -> None:
    decoder = HeaderDecoder(64 * 1024)
    first = decoder.decode(ENVOY_FIRST)
    assert not _keeps_table(ENVOY_FIRST)
    assert _keeps_table(ENVOY_NEXT)
    again = decoder.decode(ENVOY_NEXT)
    assert again == first
    assert decoder.decode(ENVOY_NEXT) is again  # the cached decoding
    assert dict(again)[":path"] == "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


def test_a_table_size_update_or_a_truncated_block_is_not_reused() -> None:
    assert not _keeps_table(b"\x3f\xe1\x1f")  # size update to 4096
    assert not _keeps_table(b"\x04\x85")  # a 5-byte value that is not there
    assert not _keeps_table(b"\x0f")  # a name index cut short
    assert _keeps_table(b"\x82\x86\x84")
