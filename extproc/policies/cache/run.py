"""The response cache over the store: lookups, single-flight, writes, hygiene, purge.

Store layout:

    extproc:cache:<scope>:<key>          a compressed `Entry`, with the route's TTL
    extproc:cache-lock:{extproc:cache:<scope>:<key>}
                                         single-flight lock, owner = request id
    extproc:cache-shape:<scope>:<digest> the last request of that shape (hygiene)

The lock's hash tag is its entry's whole name (which has no tag, so Redis Cluster hashes
all of it): the two share a slot, so the lookup and the lock are one store call
(`get_or_lock`), and so are the write and the release (`set_and_release`). (Versions
before 2026-12-02 named the lock `extproc:cache-lock:<key>`: while replicas of both run
together they do not see each other's locks, which costs at most a duplicate upstream
call per key, never a wrong answer; locks live `cache.lock_seconds`.)

Round trips per request: a hit is one call; a miss that leads is three (`get_or_lock`,
the hygiene record's `swap` when hygiene is on, `set_and_release`).

Single-flight: the first request for a key takes the lock and goes upstream; an
identical request arriving meanwhile waits for the entry (polling the store, so it
works across replicas). If the lock disappears without an entry (the first call
failed, or was not cacheable), one waiter takes the lock and goes upstream itself,
so waiters never all fail with the first call. A waiter that runs out of
`cache.wait_seconds` goes upstream uncached.

The cache never fails a request: a store error is logged, counted, and the
request goes on as a bypass.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote

from extproc.apis import ApiKind
from extproc.config import CacheConfig, CacheSettings
from extproc.policies.auth import Identity
from extproc.policies.cache.key import Entry, Shape, cache_key
from extproc.policies.guard.run import GuardRun
from extproc.policies.step import Ending, Exchange, Reply, Run
from extproc.store import Store, StoreError

log = logging.getLogger(__name__)

ENTRY_PREFIX = "extproc:cache:"
LOCK_PREFIX = "extproc:cache-lock:"
SHAPE_PREFIX = "extproc:cache-shape:"
# Hygiene is bounded: bodies over SHAPE_MAX_BODY bytes are not shaped (the work grows with
# the body), and a shape record over SHAPE_MAX_ENTRY bytes is not stored.
SHAPE_MAX_BODY = 1 << 20
SHAPE_MAX_ENTRY = 64 << 10
_POLL = 0.05


@functools.lru_cache(maxsize=1024)
def _quoted(scope: str) -> str:
    """A scope as it appears in store keys; a gateway serves a few scopes (its teams and
    keys), quoted 2-4 times per request each."""
    return quote(scope, safe="=")


def entry_name(scope: str, key: str) -> str:
    return f"{ENTRY_PREFIX}{_quoted(scope)}:{key}"


def lock_name(entry: str) -> str:
    """The single-flight lock of the entry named `entry`, in its Redis Cluster slot."""
    return f"{LOCK_PREFIX}{{{entry}}}"


@dataclass(frozen=True, slots=True)
class WaitResult:
    entry: Entry | None
    leader: bool


class ResponseCache:
    def __init__(
        self, store: Store, settings: CacheSettings, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.settings = settings
        self.wall = wall_clock

    async def lookup(self, scope: str, key: str) -> Entry | None:
        raw = await self.store.get(entry_name(scope, key))
        return Entry.decode(raw) if raw is not None else None

    async def lookup_or_lock(self, scope: str, key: str, owner: str) -> WaitResult:
        """The entry; or, on a miss, whether this request took the single-flight lock (one
        store call: the lock is taken only when the entry is absent)."""
        name = entry_name(scope, key)
        raw, leader = await self.store.get_or_lock(
            name, lock_name(name), owner, self.settings.lock_seconds
        )
        return WaitResult(Entry.decode(raw) if raw is not None else None, leader)

    async def exists(self, scope: str, key: str) -> bool:
        return await self.store.get(entry_name(scope, key)) is not None

    async def acquire(self, scope: str, key: str, owner: str) -> bool:
        lock = lock_name(entry_name(scope, key))
        return await self.store.acquire_lock(lock, owner, self.settings.lock_seconds)

    async def release(self, scope: str, key: str, owner: str) -> None:
        await self.store.release_lock(lock_name(entry_name(scope, key)), owner)

    async def wait(self, scope: str, key: str, owner: str, seconds: float) -> WaitResult:
        """Wait for the in-flight identical request's entry, or take over its lock."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while loop.time() < deadline:
            # The leader writes its entry and frees the lock in one step, and this reads
            # the entry and takes a free lock in one: a free lock without an entry means
            # the first call ended without one; this request goes upstream instead.
            found = await self.lookup_or_lock(scope, key, owner)
            if found.entry is not None or found.leader:
                return found
            await asyncio.sleep(_POLL)
        return WaitResult(None, leader=False)

    async def save(
        self, scope: str, key: str, entry: Entry, ttl: float, owner: str | None = None
    ) -> bool:
        """Store `entry` (False: not cacheable, nothing stored); and free `owner`'s lock
        when given, in the same store call when the entry is stored."""
        raw = self._encoded(entry)
        name = entry_name(scope, key)
        if raw is None:
            if owner is not None:
                await self.store.release_lock(lock_name(name), owner)
            return False
        if owner is None:
            await self.store.set(name, raw, ttl)
        else:
            await self.store.set_and_release(name, raw, ttl, lock_name(name), owner)
        return True

    def _encoded(self, entry: Entry) -> bytes | None:
        try:
            raw = entry.encode()
        except TypeError as exc:  # e.g. an integer JSON cannot carry: not cacheable
            log.info("answer not cached: %s", exc)
            return None
        if len(raw) > self.settings.max_entry_bytes:
            log.info("answer not cached: %d bytes compressed > cache.max_entry_bytes", len(raw))
            return None
        return raw

    async def volatile_paths(self, scope: str, shape: Shape, key: str) -> list[str]:
        """Paths whose volatile values alone separate this miss from a recent request."""
        name = f"{SHAPE_PREFIX}{_quoted(scope)}:{shape.digest}"
        record = shape.encode(key)
        if len(record) > SHAPE_MAX_ENTRY:
            return []
        recent = await self.store.swap(name, record, self.settings.hygiene_window_seconds)
        return shape.defeated_by(recent, key) if recent is not None else []

    async def purge(self, scope: str | None = None, key: str | None = None) -> int:
        prefix = ENTRY_PREFIX + (f"{_quoted(scope)}:" if scope else "")
        names = await self.store.scan(prefix, limit=1_000_000)
        removed = 0
        for name in names:
            if key is None or name.endswith(f":{key}"):
                removed += bool(await self.store.delete(name))
        return removed


Extend = Callable[[float], Awaitable[None]]


def tenant_scope(identity: Identity, presented: str | None) -> str:
    """Whose answers a request may share: its team, else its key or user."""
    if identity.team:
        return f"team={identity.team}"
    if identity.key_id:
        return f"key={identity.key_id}"
    if identity.user:
        return f"user={identity.user}"
    if presented:
        # Anonymous pass-through callers are kept apart by their own provider key.
        return "anon=" + hashlib.sha256(presented.encode()).hexdigest()[:16]
    return "anon"


def cache_control(headers: Mapping[str, str]) -> tuple[bool, bool]:
    """(read, write) from the request's Cache-Control: no-cache skips the read,
    no-store skips the write."""
    directives = {d.strip().lower() for d in headers.get("cache-control", "").split(",")}
    return "no-cache" not in directives, "no-store" not in directives


class CacheStep:
    """The cache's place in the step order: on for a generating request on a route whose
    profile enables it. Its key is made from the request as the guard left it."""

    def open(self, exchange: Exchange) -> CacheRun | None:
        config, route, request = exchange.profile.cache, exchange.route, exchange.request
        if not config.enabled or route is None or request is None or not route.endpoint.generates:
            return None
        scope = "shared" if config.shared else tenant_scope(exchange.identity, exchange.presented())
        headers = exchange.headers
        # A heavy body's big values count through the worker's digests (extproc/offload.py).
        key = cache_key(
            exchange.dialect.name,
            route.endpoint,
            scope,
            request.key_body(),
            headers,
            config.normalize,
        )
        read, write = cache_control(headers)
        guard = exchange.run_of(GuardRun)
        if guard is not None and guard.masks:
            # The stored answer would hold this request's real values behind placeholders
            # that another request's values map to as well.
            write = False
        return CacheRun(exchange.gw.cache, config, scope, key, exchange.request_id, read, write)


CACHE = CacheStep()


@dataclass
class CacheRun(Run):
    """One request's dealings with the cache, from lookup to write."""

    waits: ClassVar[bool] = True
    closes: ClassVar[bool] = True

    cache: ResponseCache
    config: CacheConfig
    scope: str
    key: str
    owner: str
    read: bool
    write: bool
    result: str = "miss"  # miss | hit | bypass | wait_timeout
    leader: bool = False
    volatile: list[str] = field(default_factory=list)
    volatile_directories: list[str] = field(default_factory=list)  # of `volatile`
    age: float = 0.0
    # A no-cache request of a shared scope (a team) found a fresh entry and, if it stores
    # its own answer, replaces it for everyone: the audit record says so (cache_replaced).
    found_fresh: bool = False
    replaced: bool = False
    stored: bool = False  # this request's answer was stored

    async def request(self, exchange: Exchange, reply: Reply | None) -> Reply | None:
        """Look the answer up (waiting for an identical request in flight); a hit is the
        request's reply."""
        assert exchange.request is not None
        if reply is not None:
            return reply
        body, api, shape = exchange.request.body, exchange.dialect.name, None
        worker = exchange.request.worker
        if exchange.gw.config.cache.hygiene and self.read and exchange.body_size <= SHAPE_MAX_BODY:

            def shape() -> Shape:
                if worker is not None:  # a heavy body's, measured by the worker
                    return worker.shape  # type: ignore[no-any-return]
                return Shape.of(api, body)

        entry = await self.before_upstream(shape, exchange.extend)
        if self.volatile:
            exchange.gw.metrics.cache_volatile.inc()
        if entry is None:
            return None
        headers = (("x-gateway-cache", "hit"), ("age", str(int(self.age))))
        return Reply(entry.answer, "cache_hit", headers, "extproc_cache_hit")

    def answer_headers(self) -> tuple[tuple[str, str], ...]:
        """A fresh answer says it missed (or bypassed) the cache, and why a near miss did."""
        headers: tuple[tuple[str, str], ...] = (
            ("x-gateway-cache", "bypass" if self.result == "bypass" else "miss"),
        )
        if self.volatile:
            hint = "volatile values defeat the cache at " + ", ".join(self.volatile[:5])
            if self.volatile_directories:
                hint += (
                    "; home or temporary directory paths differ at "
                    + ", ".join(self.volatile_directories[:5])
                    + ": add cache.normalize {builtin: paths} to the route's profile"
                )
            headers += (("x-gateway-cache-hint", hint),)
        return headers

    async def close(self, ending: Ending) -> None:
        """Store a fresh complete answer (a hit stores nothing) and free any waiters."""
        if ending.outcome != "cache_hit":
            await self.after_upstream(ending.answer(), ending.api)

    def audit_fields(self, done: object = None) -> dict[str, Any]:
        """The cache step's part of the audit record."""
        fields: dict[str, Any] = {
            "cache": self.result,
            "cache_key": self.key,
            "cache_scope": self.scope,
            "cache_stored": self.stored,
        }
        if self.volatile:
            fields["cache_volatile_paths"] = self.volatile
        if self.volatile_directories:
            fields["cache_volatile_directories"] = self.volatile_directories
        if self.replaced:
            fields["cache_replaced"] = True
        return fields

    async def before_upstream(
        self, shape: Callable[[], Shape] | None, extend: Extend
    ) -> Entry | None:
        """The cached answer, or None after arranging to store this one. `shape` is
        called on a miss only (hygiene)."""
        try:
            return await self._lookup(shape, extend)
        except StoreError as exc:
            log.warning("cache bypassed, store error: %s", exc)
            self.result, self.write, self.leader = "bypass", False, False
            return None

    async def _lookup(self, shape: Callable[[], Shape] | None, extend: Extend) -> Entry | None:
        if not self.read:
            self.result = "bypass"
            if self.write:
                self.found_fresh = await self.cache.exists(self.scope, self.key)
            self.leader = self.write and await self.cache.acquire(self.scope, self.key, self.owner)
            return None
        found = await self.cache.lookup_or_lock(self.scope, self.key, self.owner)
        entry, self.leader = found.entry, found.leader
        if entry is None and not self.leader:
            wait = self.cache.settings.wait_seconds
            await extend(wait + 5)
            waited = await self.cache.wait(self.scope, self.key, self.owner, wait)
            entry, self.leader = waited.entry, waited.leader
            if entry is None and not self.leader:
                self.result = "wait_timeout"
        if entry is not None:
            self.result = "hit"
            self.age = max(0.0, self.cache.wall() - entry.created_at)
            return entry
        if shape is not None:
            made = shape()
            self.volatile = await self.cache.volatile_paths(self.scope, made, self.key)
            if self.volatile:
                self.volatile_directories = made.directory_fields(self.volatile)
        return None

    async def after_upstream(self, answer: dict[str, Any] | None, api: ApiKind) -> bool:
        """Store a complete successful answer (None: nothing to store) and free waiters."""
        stored = False
        owner = self.owner if self.leader else None  # whose lock to free with the write
        try:
            if answer is not None and self.write and self.result != "hit":
                entry = Entry(api=api, answer=answer, created_at=self.cache.wall())
                ttl = self.config.ttl_seconds
                stored = await self.cache.save(self.scope, self.key, entry, ttl, owner)
                self.replaced = stored and self.found_fresh
                self.stored = stored
            elif owner is not None:
                await self.cache.release(self.scope, self.key, owner)
        except StoreError as exc:
            log.warning("cache write skipped, store error: %s", exc)
        return stored
