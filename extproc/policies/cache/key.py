"""The response cache's pure parts: the key, the stored entry, and cache-key hygiene.

The key (`cache_key`) is the SHA-256 of a canonical JSON document (keys sorted,
no insignificant whitespace, so key order and formatting never matter) holding:

- `v`: the key format version, `api`, `endpoint`;
- `scope`: the tenant (team, else key id, else user; `shared` when the route opts in);
- `body`: the request body after model mapping (so `model` is the *served* model:
  system, messages, tools, tool_choice, temperature, top_p, top_k, max_tokens,
  stop sequences, thinking, output config and any other field), minus per-run noise:
  `stream` (a JSON answer and a stream are interchangeable), `metadata.user_id`
  (Claude Code puts a fresh session id there every run), and for OpenAI also
  `stream_options`, `user`, `store` and `metadata`;
- `headers`: `anthropic-version` and `anthropic-beta` (beta flags sorted), which
  change behaviour.

Opt-in per-route `normalize` rules rewrite volatile values (timestamps, UUIDs,
long hex or numeric ids, or custom regexes) in every string before hashing; the
request sent upstream is never changed.

Hygiene (`Shape`): a miss whose body matches a recent request of the same caller
once digits, hex letters and home/temporary directories are masked was defeated by
volatile values (timestamps, dates, UUIDs, hashes, numeric ids, a fresh HOME or
TMPDIR per run); the field paths that differed are reported so the prompt can be
fixed or the values normalised (`{builtin: paths}` for directories).
"""

from __future__ import annotations

import functools
import hashlib
import re
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.apis import ApiKind, Endpoint, dialect_of
from extproc.config import UNIX_DIRECTORIES, WINDOWS_DIRECTORIES, NormalizeRule

KEY_VERSION = 1


def _without_noise(api: ApiKind, body: Mapping[str, Any]) -> dict[str, Any]:
    return dialect_of(api).cache_view(body)


def _map_strings(value: Any, rules: Sequence[tuple[re.Pattern[str], str]]) -> Any:
    if isinstance(value, str):
        for regex, replacement in rules:
            value = regex.sub(replacement, value)
        return value
    if isinstance(value, list):
        return [_map_strings(item, rules) for item in value]
    if isinstance(value, dict):
        return {k: _map_strings(v, rules) for k, v in value.items()}
    return value


def part_digest(value: Any, normalize: Sequence[NormalizeRule] = ()) -> dict[str, str]:
    """What a cache key holds in place of a big top-level value the worker process left
    serialized (extproc/offload.py): the digest of its normalized, key-sorted JSON. Such
    a body's key differs from the key of the same body parsed whole, but a body's size
    alone decides which it gets, so equal bodies still share one."""
    if normalize:
        value = _map_strings(value, [(rule.regex(), rule.replace) for rule in normalize])
    encoded = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    return {"json_sha256": hashlib.sha256(encoded).hexdigest()}


def cache_key(
    api: ApiKind,
    endpoint: Endpoint,
    scope: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    normalize: Sequence[NormalizeRule] = (),
) -> str:
    clean: Any = _without_noise(api, body)
    if normalize:
        clean = _map_strings(clean, [(rule.regex(), rule.replace) for rule in normalize])
    document = {
        "v": KEY_VERSION,
        "api": dialect_of(api).cache_schema(),
        "endpoint": endpoint.value,
        "scope": scope,
        "body": clean,
        "headers": dialect_of(api).cache_headers(headers, body),
    }
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).hexdigest()


# -- stored entries -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """A complete, successful answer in its non-streaming form."""

    api: ApiKind
    answer: dict[str, Any]
    created_at: float

    def encode(self) -> bytes:
        document = {"v": KEY_VERSION, "api": self.api, "at": self.created_at, "answer": self.answer}
        return _deflate(orjson.dumps(document))

    @classmethod
    def decode(cls, raw: bytes) -> Entry | None:
        """None for anything unreadable (an old format, a corrupt value): a miss, not an error."""
        try:
            document = orjson.loads(zlib.decompress(raw))
            if document.get("v") != KEY_VERSION:
                return None
            return cls(api=document["api"], answer=document["answer"], created_at=document["at"])
        except (zlib.error, orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return None


def _deflate(data: bytes) -> bytes:
    """zlib at level 6 with a window no larger than the data: `zlib.compress` sets up (and
    clears) a 256 KiB state for every call, ~80 µs for a 2 KB answer; a window that fits
    costs ~20 µs for the same output size. `zlib.decompress` reads any window size."""
    wbits = min(15, max(9, len(data).bit_length()))
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits, max(1, min(8, wbits - 6)))
    return packer.compress(data) + packer.flush()


# -- hygiene ----------------------------------------------------------------------------------

Path = tuple[str | int, ...]


def _strings(value: Any, path: Path) -> Iterator[tuple[Path, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, (*path, index))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, (*path, key))


def _checksums(value: Any) -> list[int]:
    """`crc32` of every string of `value`, in `_strings` order, without building the
    paths (only a near miss needs them): half the time of a 117 KB request's walk."""
    out: list[int] = []
    stack = [value]
    while stack:  # iterative: a deeply nested body cannot exhaust the C stack
        node = stack.pop()
        if isinstance(node, str):
            out.append(zlib.crc32(node.encode()))
        elif isinstance(node, list):
            stack.extend(reversed(node))
        elif isinstance(node, dict):
            stack.extend(reversed(node.values()))
    return out


def _located(value: Any, wanted: set[int], total: int) -> list[tuple[int, Path, str]]:
    """The path and text of each string of `value` whose `_strings` index is in `wanted`
    (`total`: how many strings `value` has), without building the path of any other
    string: a near miss's changed strings are a few of many thousand. The walk starts
    at the end nearer to the farthest wanted index (a new turn changes the last strings),
    and stops once every wanted string is found."""
    backwards = total - 1 - min(wanted) < max(wanted)
    step, index = (-1, total - 1) if backwards else (1, 0)
    found: list[tuple[int, Path, str]] = []
    stack: list[tuple[Path, str | int | None, Any]] = [((), None, value)]
    while stack and len(found) < len(wanted):  # iterative, like `_checksums`
        parent, name, node = stack.pop()
        if isinstance(node, str):
            if index in wanted:
                found.append((index, parent if name is None else (*parent, name), node))
            index += step
            continue
        if isinstance(node, list):
            children: Any = enumerate(node)
        elif isinstance(node, dict):
            children = node.items()
        else:
            continue
        path = parent if name is None else (*parent, name)
        pairs = [(path, k, item) for k, item in children]
        stack.extend(pairs if backwards else reversed(pairs))
    return found


def _named(value: Any, name: str) -> list[str]:
    """The text of every string of `value` whose `format_path` is `name` (two paths format
    alike only when a key is empty or holds `.` or `[`), found by following `name` down
    instead of formatting the path of every string."""
    found: list[str] = []
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        out, node = stack.pop()
        if isinstance(node, str):
            if out == name:
                found.append(node)
        elif isinstance(node, list):
            index = _INDEX.match(name, len(out))
            if index is not None and int(index[1]) < len(node):
                stack.append((out + index[0], node[int(index[1])]))
        elif isinstance(node, dict):
            for key, item in node.items():
                piece = f"{out}.{key}" if out else key
                if name.startswith(piece):
                    stack.append((piece, item))
    return found


_INDEX = re.compile(r"\[(0|[1-9][0-9]*)\]")


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


_HEXISH = bytes.maketrans(b"0123456789abcdefABCDEF", b"0" * 22)
# Home and temporary directories (the `paths` normalize rule), masked in the shape so a
# miss caused by a fresh HOME or TMPDIR per run is explained too: one literal-led pattern
# per pass over the serialized body (where a Windows path's backslashes are escaped).
DIRECTORIES = NormalizeRule(builtin="paths").regex()
# DIRECTORIES' two alternatives apart, each with the literal it starts with, for telling
# whether a text holds a directory: `re` tries the alternation at every position of the
# text (~5x slower on a long one), and `in` (memchr) rules a text out faster still than
# `re` skipping to a literal. A text matches DIRECTORIES exactly when it matches one of them.
_DIRECTORY_ALTERNATIVES = (
    ("/", re.compile(UNIX_DIRECTORIES)),
    (":\\Users\\", re.compile(WINDOWS_DIRECTORIES)),
)
_DIRECTORIES_JSON = (
    re.compile(UNIX_DIRECTORIES.encode()),
    re.compile(WINDOWS_DIRECTORIES.replace(r"\\", r"\\\\", 2).encode()),
)


def _has_directory(text: str) -> bool:
    """`DIRECTORIES.search(text)` as a truth value, by `_DIRECTORY_ALTERNATIVES`."""
    return any(lead in text and regex.search(text) for lead, regex in _DIRECTORY_ALTERNATIVES)


# The literal each of `_DIRECTORIES_JSON` starts with: most values hold neither, and
# `find` tells so faster than a `sub` that finds nothing (`in` is slower on bytes: it
# first tries its operand as an integer, raising and clearing a TypeError).
_DIRECTORY_JSON_LEADS = (b"/", b":\\\\Users\\\\")


def _mask(dumped: bytes) -> bytes:
    """A shape's bytes of some JSON: directories, then digits and hex letters masked."""
    unix, windows = _DIRECTORIES_JSON
    unix_lead, windows_lead = _DIRECTORY_JSON_LEADS
    if dumped.find(unix_lead) >= 0:
        dumped = unix.sub(b"~", dumped)
    if dumped.find(windows_lead) >= 0:
        dumped = windows.sub(b"~", dumped)
    return dumped.translate(_HEXISH)


@functools.lru_cache(maxsize=4096)
def _masked_key(key: str) -> bytes:
    """A dict key's shape bytes with its colon: bodies use a few hundred keys."""
    return _mask(orjson.dumps(key)) + b":"


# The containers a shape is made of, taken from `ShapeMemo` down to this depth (body,
# messages, a message, its content, a block, a part of it): a new turn masks and
# checksums only its new blocks.
SHAPE_DEPTH = 6


class ShapeMemo:
    """The masked JSON and string checksums of containers already shaped, by their JSON
    (`orjson.dumps`), least recently used evicted: agents resend the whole conversation
    every turn. Both are functions of the JSON alone, and a container's are its parts'
    joined the way `orjson.dumps` joins them (compact: `[a,b]`, `{"k":v}`), since no
    directory match crosses a quote: so a hit or a join gives the whole body's bytes."""

    def __init__(self, max_bytes: int = 16 << 20, min_bytes: int = 256) -> None:
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self._items: OrderedDict[bytes, tuple[bytes, list[int]]] = OrderedDict()
        self._bytes = 0

    def shape(self, body: dict[str, Any], depth: int) -> tuple[bytes, list[int]]:
        """`body`'s masked JSON and checksums (`_mask`, `_checksums`), its containers
        down to `depth` taken from the memo or kept in it."""
        out: list[bytes] = []
        checksums: list[int] = []
        self._fields(body, depth - 1, out, checksums)
        return b"".join(out), checksums

    def _part(self, value: Any, depth: int, out: list[bytes], checksums: list[int]) -> None:
        if isinstance(value, list) and depth > 0:  # grows every turn (messages, content)
            out.append(b"[")
            for index, item in enumerate(value):
                if index:
                    out.append(b",")
                self._part(item, depth - 1, out, checksums)
            out.append(b"]")
            return
        if not isinstance(value, dict) or depth <= 0:
            out.append(_mask(orjson.dumps(value)))
            checksums += _checksums(value)
            return
        masked, sums = self._dict(value, depth)
        out.append(masked)
        checksums += sums

    def _dict(self, value: dict[Any, Any], depth: int) -> tuple[bytes, list[int]]:
        raw = orjson.dumps(value)
        kept = len(raw) >= self.min_bytes  # a smaller part is shaped faster than looked up
        if not kept:
            return _mask(raw), _checksums(value)
        found = self._items.get(raw)
        if found is not None:
            self._items.move_to_end(raw)
            return found
        if depth > 1 and _holds_containers(value):
            parts: list[bytes] = []
            checksums: list[int] = []
            self._fields(value, depth - 1, parts, checksums)
            made = (b"".join(parts), checksums)
        else:  # none of its parts would be kept: shaped whole, from the JSON at hand
            made = (_mask(raw), _checksums(value))
        self._put(raw, made)
        return made

    def _fields(
        self, value: dict[Any, Any], depth: int, out: list[bytes], checksums: list[int]
    ) -> None:
        out.append(b"{")
        for index, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                orjson.dumps(value)  # not JSON: orjson's error, as before
            if index:
                out.append(b",")
            out.append(_masked_key(key))
            self._part(item, depth, out, checksums)
        out.append(b"}")

    def _put(self, raw: bytes, made: tuple[bytes, list[int]]) -> None:
        size = len(raw) + len(made[0])
        if size > self.max_bytes:
            return
        self._items[raw] = made
        self._bytes += size
        while self._bytes > self.max_bytes:
            old, (masked, _) = self._items.popitem(last=False)
            self._bytes -= len(old) + len(masked)


def _holds_containers(value: dict[Any, Any]) -> bool:
    for item in value.values():  # noqa: SIM110 (a loop: `any()` would add a generator)
        if isinstance(item, (list, dict)):
            return True
    return False


_SHAPES = ShapeMemo()


@dataclass(frozen=True, slots=True)
class Shape:
    """A request with every digit and hex letter masked (its shape), and a checksum of
    each string in it.

    Two requests of the same shape whose strings differ can only differ in runs of
    digits and hex letters: timestamps, dates, UUIDs, hashes, numeric ids. Masking
    bytes (`bytes.translate`) and checksumming (`crc32`) keep this to about a
    millisecond for a 117 KB request, where regexes over every string took 15 ms; the
    memo of blocks already shaped (`ShapeMemo`) to about 0.2 ms for a new turn.
    """

    digest: str
    checksums: list[int]
    body: dict[str, Any]

    @classmethod
    def of(cls, api: ApiKind, body: Mapping[str, Any]) -> Shape:
        clean = _without_noise(api, body)
        masked, checksums = _SHAPES.shape(clean, SHAPE_DEPTH)
        digest = hashlib.sha256(masked).hexdigest()
        return cls(digest=digest, checksums=checksums, body=clean)

    def encode(self, key: str) -> bytes:
        return orjson.dumps({"key": key, "checksums": self.checksums})

    def defeated_by(self, recent: bytes, key: str) -> list[str]:
        """Field paths whose volatile values alone made this request miss a recent one."""
        try:
            previous = orjson.loads(recent)
        except orjson.JSONDecodeError:
            return []
        before = previous.get("checksums") if isinstance(previous, dict) else None
        if previous.get("key") == key or not isinstance(before, list):
            return []
        if len(before) != len(self.checksums):
            return []
        changed = {i for i, (a, b) in enumerate(zip(before, self.checksums, strict=True)) if a != b}
        if not changed:
            return []
        located = _located(self.body, changed, len(self.checksums))
        return sorted(format_path(path) for _, path, _ in located)

    def directory_fields(self, fields: Sequence[str]) -> list[str]:
        """Which of `fields` hold a home or temporary directory path (see `paths`)."""
        wanted = set(fields)
        return sorted(
            name for name in wanted for text in _named(self.body, name) if _has_directory(text)
        )
