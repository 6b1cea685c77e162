"""Bounded work per request: a huge body is checked and screened off the event loop.

One event loop serves every caller of a process, and the CPU-heavy steps of a request
body (parsing, the duplicate-key check, walking every text, redaction and injection
regexes) hold the GIL: `re` and `orjson` never release it, so a thread pool would not
free the loop. A body that is large (over `OFFLOAD_BYTES`) or may hold many JSON values
(over `INLINE_VALUES` by a C-speed upper bound) is therefore sent, as bytes, to a worker
process, which parses it, refuses it past `limits.max_json_values` (413) or
`limits.max_scan_chars` (413) or with a duplicate key (400), and returns the guard's
`Inspection` (verdicts, masks and the edits to make: small). Only a body that passed is
parsed on the loop, so the loop's own work per request is bounded by the caps.

Measured on an idle 2-core machine (tests/service/test_guard_and_bounds.py, a caller
sending a request every 5 ms, open loop): while a 31 MiB body of 1.2 million tiny
content blocks was refused, that caller's p99 was 2-4 ms (its worst 5-9 ms); while the
heaviest legal body (31 MiB, 180,000 values, 15 M characters to scan) was screened, its
p99 was 116-160 ms: the loop still parses that body once and hashes it for the cache
key, in one pause. One worker: huge bodies queue for it.

The worker is started with `spawn` (the server runs gRPC threads, which a fork would
not carry): a program that embeds the server must guard its entry point with
`if __name__ == "__main__":`, as `extproc`'s own entry points do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extproc.apis import ApiKind
from extproc.apis.anthropic import split_billing_block
from extproc.apis.walk import WalkLimits
from extproc.config import LimitsConfig
from extproc.errors import BadRequest, GatewayError, PayloadTooLarge, Unavailable
from extproc.policies.guard import Guard, GuardConfig, Inspection
from extproc.policies.request import parse_json_object

log = logging.getLogger(__name__)

OFFLOAD_BYTES = 256 << 10  # bodies over 256 KiB are parsed and screened in the worker first
INLINE_VALUES = 20_000  # ...and bodies that may hold more JSON values than this
OFFLOAD_SECONDS = 60.0  # Envoy's message timeout is extended by this while the worker works


def value_bound(raw: bytes, enough: int) -> int:
    """An upper bound on the JSON values in `raw`, at C speed: every value but the root
    takes a byte and follows its own `[`, `,` or `:` (those inside strings only make the
    bound looser). Below `enough` the cheaper length bound is returned."""
    if len(raw) // 2 + 1 <= enough:
        return len(raw) // 2 + 1
    return 1 + raw.count(b"[") + raw.count(b",") + raw.count(b":")


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


@dataclass(frozen=True, slots=True)
class Checked:
    """The worker's answer: a refusal (status, message, reason) or the guard's findings."""

    error: tuple[int, str, str] | None = None
    inspection: Inspection | None = None


_ERRORS: dict[int, type[GatewayError]] = {400: BadRequest, 413: PayloadTooLarge}
_worker_guard: Guard | None = None


def _init_worker(config: GuardConfig | None, hash_key: bytes | None) -> None:
    global _worker_guard
    _worker_guard = Guard(config, hash_key=hash_key) if config is not None else None


def check_body(
    raw: bytes | str, api: ApiKind, profile: str | None, guarded: bool, limits: LimitsConfig
) -> Checked:
    """Parse, bound and screen one body (runs in the worker process); `raw` is the body,
    or the path of the memory file holding it."""
    if isinstance(raw, str):
        with open(raw, "rb") as file:
            raw = file.read()
    try:
        body = parse_json_object(raw)
        check_values(body, limits.max_json_values)
        if not guarded or _worker_guard is None:
            return Checked()
        policy = _worker_guard.profile(profile)
        walk_limits = WalkLimits(limits.max_scan_chars)
        screened, billing = split_billing_block(body)  # forwarded as sent, never screened
        inspected = screened if billing is not None else body
        return Checked(inspection=policy.inspect(inspected, api, walk_limits))
    except GatewayError as error:
        return Checked(error=(error.status, error.message, error.reason))


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

    async def check(
        self, raw: bytes, api: ApiKind, profile: str | None, guarded: bool, limits: LimitsConfig
    ) -> Inspection | None:
        """The guard's findings for `raw` (None without a guard); the refusal it earned."""
        loop = asyncio.get_running_loop()
        path = await asyncio.to_thread(_spill, raw)
        try:
            checked = await loop.run_in_executor(
                self._executor(), check_body, path or raw, api, profile, guarded, limits
            )
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
        return checked.inspection

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
