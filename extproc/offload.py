"""Bounded work per request: a huge body is checked and screened off the event loop.

One event loop serves every caller of a process, and the CPU-heavy steps of a request
body (parsing, the duplicate-key check, walking every text, redaction and injection
regexes) hold the GIL: `re` and `orjson` never release it, so a thread pool would not
free the loop. A body that is large (over `OFFLOAD_BYTES`) or may hold many JSON values
(over `INLINE_VALUES` by a C-speed upper bound) is therefore sent, as bytes, to a worker
process, which parses it, refuses it past `limits.max_json_values` (413) or
`limits.max_scan_chars` (413) or with a duplicate key (400), screens it and applies the
redaction, and returns a `Summary`: the guard's `Inspection`, what the request path
would otherwise measure on the loop (model, stream flag, input-token estimate, the cache
key's digests, the hygiene shape), the small top-level values, and the big ones
serialized. The loop parses only the small values (`Summary.parsed`: the big ones become
`orjson.Fragment`s), so it never walks a heavy body.

Measured on a shared 2-core machine (tests/service/test_guard_and_bounds.py, a caller
sending a request every 5 ms, open loop): while a 31 MiB body of 1.2 million tiny
content blocks was refused, that caller's p99 was 2-6 ms; while the heaviest legal body
(31 MiB, 180,000 values, 15 M characters to scan) was screened, 9-23 ms (the loop's
longest step ~5 ms of CPU; 116-170 ms when the loop still parsed and hashed that body).
Threshold: with the guard on, the inline path costs the loop ~0.1 ms per KiB of text it
has not seen; offloaded, ~1 ms of loop CPU and 2-6 ms more latency (README, "One request
cannot stall the others"). The guard's per-turn caches make a seen history far cheaper
(a repeated 117 KB turn ~0.4 ms), but a new body pays the cold rate, and that sets the
threshold: 117 KB Claude Code requests stay inline, 1 MB ones go to the worker (whose
guard keeps its own caches for the next turn).
One worker: huge bodies queue for it.

The worker is started with `spawn` (the server runs gRPC threads, which a fork would
not carry): a program that embeds the server must guard its entry point with
`if __name__ == "__main__":`, as `extproc`'s own entry points do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from extproc.apis import ApiKind, Endpoint
from extproc.apis.anthropic import split_billing_block
from extproc.apis.clouds import CloudPath
from extproc.apis.dialect import dialect_of
from extproc.apis.walk import WalkLimits
from extproc.config import LimitsConfig, NormalizeRule
from extproc.errors import BadRequest, GatewayError, PayloadTooLarge, Unavailable
from extproc.policies.cache.key import Shape, part_digest
from extproc.policies.cache.run import SHAPE_MAX_BODY
from extproc.policies.guard import Guard, GuardConfig, Inspection
from extproc.policies.guard.redact import apply_plan
from extproc.policies.request import (
    ParsedRequest,
    WorkerFacts,
    parse_cloud_request,
    parse_request,
)

log = logging.getLogger(__name__)

OFFLOAD_BYTES = 256 << 10  # bodies over 256 KiB are parsed and screened in the worker first
INLINE_VALUES = 20_000  # ...and bodies that may hold more JSON values than this
OFFLOAD_SECONDS = 60.0  # Envoy's message timeout is extended by this while the worker works


_NOT_SEPARATORS = bytes(b for b in range(256) if b not in b"[,:")


def value_bound(raw: bytes, enough: int) -> int:
    """An upper bound on the JSON values in `raw`, at C speed: every value but the root
    takes a byte and follows its own `[`, `,` or `:` (those inside strings only make the
    bound looser). Below `enough` the cheaper length bound is returned."""
    if len(raw) // 2 + 1 <= enough:
        return len(raw) // 2 + 1
    # The count of `[`, `,` and `:` in one pass (three `count`s: 0.11 ms for 117 KB):
    # deleting every other byte writes out only the separators, a quarter fewer
    # instructions than deleting the separators and writing out the rest.
    return 1 + len(raw.translate(None, _NOT_SEPARATORS))


def _values(value: Any) -> Iterator[Any]:
    stack = [value]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def check_values(body: Any, cap: int) -> None:
    """`PayloadTooLarge` when the parsed body holds more than `cap` JSON values."""
    for count, _ in enumerate(_values(body), 1):
        if count > cap:
            raise PayloadTooLarge(
                f"the request body has over {cap} JSON values (content blocks, strings, "
                "numbers...); the gateway accepts at most that many (limits.max_json_values)",
                reason="too_many_values",
            )


# Top-level values the request path reads or rewrites as objects (model policy, output
# cap, stream usage, cache view, pricing): always parsed on the loop. Any other top-level
# value over `PART_BYTES` of JSON (messages, system, tools...) stays serialized there.
_READ_ON_LOOP = frozenset(
    {"model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n"}
    | {"metadata", "thinking", "user", "store"}
)
PART_BYTES = 16 << 10


@dataclass(frozen=True, slots=True)
class Summary:
    """A checked body as the event loop takes it: the small top-level values as JSON,
    the big ones serialized apart, and what the request path would otherwise measure."""

    order: tuple[str, ...]  # top-level keys, as sent
    light: bytes  # JSON object of the keys not in `parts`
    parts: dict[str, bytes]
    digests: dict[str, Any]
    model: str | None
    stream: bool
    input_tokens: int
    changed: bool
    shape: Shape | None

    def parsed(self) -> ParsedRequest:
        """The request, without parsing the big values: they are `orjson.Fragment`s
        (forwarded as they are when the body is re-serialized)."""
        light = orjson.loads(self.light)
        parts = self.parts
        body = {k: orjson.Fragment(parts[k]) if k in parts else light[k] for k in self.order}
        facts = WorkerFacts(parts, self.digests, self.input_tokens, self.changed, self.shape)
        return ParsedRequest(body, self.model, self.stream, facts)


@dataclass(frozen=True, slots=True)
class Checked:
    """The worker's answer: a refusal (status, message, reason), or the guard's findings
    and the body's summary."""

    error: tuple[int, str, str] | None = None
    inspection: Inspection | None = None
    summary: Summary | None = None


_ERRORS: dict[int, type[GatewayError]] = {400: BadRequest, 413: PayloadTooLarge}
_worker_guard: Guard | None = None


def _init_worker(config: GuardConfig | None, hash_key: bytes | None) -> None:
    global _worker_guard
    # Bulk checking yields the CPU to the event loop's process: when cores are short,
    # the callers waiting on the loop come first.
    with contextlib.suppress(OSError):
        os.nice(10)
    _worker_guard = Guard(config, hash_key=hash_key) if config is not None else None


@dataclass(frozen=True, slots=True)
class Job:
    """One body to check: how the request path would parse and screen it."""

    api: ApiKind
    endpoint: Endpoint
    model_in_body: bool
    profile: str | None
    guarded: bool
    limits: LimitsConfig
    normalize: tuple[NormalizeRule, ...] = ()  # the profile's cache key rules
    cloud: CloudPath | None = None  # a Bedrock or Vertex client's URL (model, streaming)

    def parse(self, raw: bytes) -> ParsedRequest:
        """As the request path parses it (`RequestStream._parse_body`)."""
        if self.cloud is not None:
            return parse_cloud_request(raw, self.endpoint, self.cloud)
        return parse_request(raw, self.endpoint, model_in_body=self.model_in_body)


def check_body(raw: bytes | str, job: Job) -> Checked:
    """Parse, bound, screen and summarize one body (runs in the worker process); `raw`
    is the body, or the path of the memory file holding it."""
    if isinstance(raw, str):
        with open(raw, "rb") as file:
            raw = file.read()
    try:
        request = job.parse(raw)
        check_values(request.body, job.limits.max_json_values)
        inspection, body = _screen(request.body, job)
        changed = body is not request.body
        return Checked(inspection=inspection, summary=_summary(request, body, changed, raw, job))
    except GatewayError as error:
        return Checked(error=(error.status, error.message, error.reason))


def _screen(body: dict[str, Any], job: Job) -> tuple[Inspection | None, dict[str, Any]]:
    """The guard's findings, and the body with its redaction applied (as the request
    path's `GuardRun` would; the billing block is forwarded as sent, never screened)."""
    if not job.guarded or _worker_guard is None:
        return None, body
    policy = _worker_guard.profile(job.profile)
    screened, billing = split_billing_block(body)
    inspected = screened if billing is not None else body
    inspection = policy.inspect(inspected, job.api, WalkLimits(job.limits.max_scan_chars))
    replaced = apply_plan(inspected, inspection.redaction).body
    if replaced is None:
        return inspection, body
    if billing is not None:
        replaced["system"] = [billing, *replaced.get("system", [])]
    return inspection, replaced


def _summary(
    request: ParsedRequest, body: dict[str, Any], changed: bool, raw: bytes, job: Job
) -> Summary:
    parts: dict[str, bytes] = {}
    digests: dict[str, Any] = {}
    light: dict[str, Any] = {}
    for key, value in body.items():
        encoded = b"" if key in _READ_ON_LOOP else orjson.dumps(value)
        if len(encoded) > PART_BYTES:
            parts[key] = encoded
            digests[key] = part_digest(value, job.normalize)
        else:
            light[key] = value
    dialect = dialect_of(job.api)
    shape = Shape.of(job.api, body) if len(raw) <= SHAPE_MAX_BODY else None
    return Summary(
        order=tuple(body),
        light=orjson.dumps(light),
        parts=parts,
        digests=digests,
        model=request.model,
        stream=request.stream,
        input_tokens=dialect.estimate_input_tokens(body, len(raw)),
        changed=changed,
        shape=shape,
    )


def _noop() -> None:
    return None


_MEMORY_DIR = Path("/dev/shm")  # noqa: S108 - tmpfs: the body never reaches a disk


def _spill(raw: bytes) -> str | None:
    """Hand the body over through a private memory file (tmpfs), written in a thread:
    `write` releases the GIL, where pickling 31 MiB into the worker's pipe held it for
    20-40 ms. None where there is no tmpfs: the body is pickled instead."""
    if not _MEMORY_DIR.is_dir():
        return None
    try:
        fd, path = tempfile.mkstemp(prefix="extproc-body-", dir=_MEMORY_DIR)  # mode 0600
    except OSError:
        return None
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
    except OSError:  # full: pickle it instead
        os.unlink(path)
        return None
    finally:
        os.close(fd)
    return path


class Offload:
    """A one-process pool for heavy request bodies, started on first use (or `warm`)."""

    def __init__(self, guard: GuardConfig | None, hash_key: bytes | None) -> None:
        self._args = (guard, hash_key)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: the parent runs gRPC threads, which do not survive a fork.
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=self._args,
            )
        return self._pool

    async def warm(self) -> None:
        """Start the worker now, so the first huge request does not wait for it."""
        await asyncio.get_running_loop().run_in_executor(self._executor(), _noop)

    async def check(self, raw: bytes, job: Job) -> Checked:
        """The guard's findings for `raw` (None without a guard) and the body's summary;
        the refusal it earned."""
        loop = asyncio.get_running_loop()
        path = await asyncio.to_thread(_spill, raw)
        try:
            checked = await loop.run_in_executor(self._executor(), check_body, path or raw, job)
        except BrokenProcessPool as exc:
            self._pool = None  # a new worker for the next request
            log.error("the request-check worker died; the next request starts a new one")
            raise Unavailable(
                "the gateway could not check this request; retry", reason="worker_died"
            ) from exc
        finally:
            if path is not None:
                os.unlink(path)
        if checked.error is not None:
            status, message, reason = checked.error
            raise _ERRORS.get(status, BadRequest)(message, reason=reason)
        return checked

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
